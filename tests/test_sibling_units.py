"""Sweep siblings copy the eval units of the checkpoints they link (probe/sibling_units.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from rotelab.config import config_from_dict
from rotelab.probe import evaluate_run
from rotelab.probe.accuracy_metrics import METRIC_ARRAYS
from rotelab.probe.engines.hf import HFEngine
from rotelab.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sweep_sibling_copies_the_units_of_linked_checkpoints(tmp_path: Path, monkeypatch) -> None:
    """Four siblings share one phase 1 (trained by the first, linked into the others). A sibling with
    the first one's eval settings computes only its own phase-2 points and copies the linked units
    (provenance ``copied_from``); those copies equal a fresh computation on a copy of the run with
    real folders (nothing to copy from there). Siblings whose ``eval.max_new_tokens`` differs
    compute every unit."""
    from rotelab import pipeline

    calls: list[tuple[str, str]] = []
    orig = HFEngine.evaluate_plan

    def spy(self, plan, *a, **k):
        calls.append((Path(self.checkpoint).parent.parent.name, Path(self.checkpoint).name))
        return orig(self, plan, *a, **k)

    monkeypatch.setattr(HFEngine, "evaluate_plan", spy)
    cfg = config_from_dict({
        "name": "sib", "seed": 0, "model": {"name": "tiny-llama"},
        "data": {"relations": ["capital", "author"], "facts_per_relation": 6, "distractors": 3, "templates_per_kind": 1, "languages": ["de"]},
        "phase1": {"epochs": 2, "lr": 1.0e-2, "batch_size": 8},
        "phase2": {"k": 2, "prompts": 1, "epochs": 1, "lr": 1.0e-3, "batch_size": 4},
        "eval": {"engine": "hf", "kinds": ["key", "test", "icl"]},
        "sweep": {"phase2.lr": [1.0e-3, 2.0e-3], "eval.max_new_tokens": [4, 5]},
    })
    results = pipeline.run_config(cfg, runs_dir=tmp_path / "runs", stages=("data", "train", "eval"), progress=False, echo=lambda m: None)
    runs = {(r.run.config.phase2.lr, r.run.config.eval.max_new_tokens): r.run for r in results}
    first, same, other_a, other_b = runs[(1e-3, 4)], runs[(2e-3, 4)], runs[(1e-3, 5)], runs[(2e-3, 5)]
    linked = [e.id for e in same.checkpoints() if e.phase in ("base", "phase1")]
    own = [e.id for e in same.checkpoints() if e.phase == "phase2"]
    assert linked == ["base", "p1-e01", "p1-e02"] and own and (same.checkpoints_dir / "p1-e01").is_symlink()

    def computed(run) -> set[str]:
        return {c for r, c in calls if r == run.root.name}

    # every run's checkpoint folders resolve into the first run for base/phase 1
    assert computed(first) == set(linked) | {e.id for e in first.checkpoints() if e.phase == "phase2"}
    assert computed(same) == set(own)  # nothing linked was computed again
    for r in (other_a, other_b):  # another max_new_tokens: other generations, so computed
        assert computed(r) >= set(linked)

    st = Store.open(same.store_path, mode="r")
    for kind in ("key", "test", "icl"):
        kg = st.kind(kind)
        for c in (linked if kind != "icl" else ["base"]):
            prov = kg.array_attrs("object_prob")[f"provenance/{c}"]
            assert prov["copied_from"] == first.root.name and prov["engine"] == "hf"
        if kind != "icl":  # ICL: base only (eval.icl_checkpoints)
            for c in own:
                assert "copied_from" not in kg.array_attrs("object_prob")[f"provenance/{c}"]

    # the reference: the same run with real folders and no store, every unit computed afresh
    ref_root = tmp_path / "ref"
    shutil.copytree(same.root, ref_root, symlinks=False, ignore=shutil.ignore_patterns("store.zarr", "tensorboard"))
    from rotelab.run import Run

    ref = Run.open(ref_root)
    assert not (ref.checkpoints_dir / "p1-e01").is_symlink()
    evaluate_run(ref, engine="hf", kinds=["key", "test", "icl"], progress=False)
    assert computed(ref) == set(linked) | set(own)
    rs = Store.open(ref.store_path, mode="r")
    for kind in ("key", "test", "icl"):
        for name in METRIC_ARRAYS:
            got = st.kind(kind).read_item_array(name)
            want = rs.kind(kind).read_item_array(name)
            if got.dtype.kind in "US":
                assert (got == want).all(), (kind, name)
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{kind}/{name}")
