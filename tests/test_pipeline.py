"""`rotelab run configs/tiny.yaml` end to end: every artifact is there and says what it should."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from rotelab.prompts import is_icl_kind

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    runs = tmp_path_factory.mktemp("runs")
    proc = subprocess.run(
        [sys.executable, "-m", "rotelab.cli", "run", str(ROOT / "configs" / "tiny.yaml"), "--runs-dir", str(runs)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return runs / "tiny", proc


def test_index_lists_the_whole_series(tiny_run) -> None:
    run_dir, _ = tiny_run
    index = json.loads((run_dir / "checkpoints" / "index.json").read_text())["checkpoints"]
    ids = [e["id"] for e in index]
    assert ids[0] == "base"
    assert [i for i in ids if i.startswith("p1-")] == ["p1-s000040", "p1-s000080", "p1-s000120"]
    assert [i for i in ids if i.startswith("p2-")] == ["p2-e01", "p2-e02"]
    for e in index:
        assert (run_dir / e["path"] / "config.json").is_file()
        assert (run_dir / e["path"] / "tokenizer.json").is_file()


def test_store_has_every_kind_with_metrics_activations_and_curves(tiny_run) -> None:
    run_dir, _ = tiny_run
    from rotelab.run import Run
    from rotelab.store import Store

    run = Run.open(run_dir)
    store = Store.open(run.store_path, mode="r")
    assert set(store.kinds()) == set(run.kinds())
    n_ckpt = len(run.checkpoints())
    for kind in run.kinds():
        ds = xr.open_zarr(run.store_path, group=kind, consolidated=False)
        assert ds["activations"].dims == ("checkpoint", "layer", "item", "hidden")
        assert ds["activations"].shape == (n_ckpt, 3, len(run.items(kind)), 128)
        group = store.kind(kind)
        acts = group.read_activations()
        assert np.isfinite(acts).all(), kind
        # the ICL kinds are evaluated at eval.icl_checkpoints (default: base, the paper's baseline) only
        at = [c == "base" for c in group.checkpoints] if is_icl_kind(kind) else [True] * n_ckpt
        assert group.committed("mc_correct").tolist() == at, kind
        for metric in ("object_prob", "mc_correct", "gen_correct"):
            vals = group.read_item_array(metric)
            assert vals.shape == (n_ckpt, len(run.items(kind))) and np.isfinite(vals[at]).all(), (kind, metric)
        probs = group.read_item_array("object_prob")[at]
        assert ((probs >= 0) & (probs <= 1)).all()
        if group.items["relation"].nunique() >= 2:  # ΔCosSim needs two relations (reverse has one)
            dc = group.read_derived("delta_cossim")
            assert dc.shape == (n_ckpt, 3) and np.isfinite(dc).all()
        else:
            assert "delta_cossim" not in group.derived_arrays()


def test_memorization_shows_up_in_the_key_prompt(tiny_run) -> None:
    """Phase 1 trains exactly the key prompt: its object probability must rise from base."""
    run_dir, _ = tiny_run
    from rotelab.run import Run
    from rotelab.store import Store

    run = Run.open(run_dir)
    group = Store.open(run.store_path, mode="r").kind("key")
    probs = group.read_item_array("object_prob")
    ids = group.checkpoints
    assert probs[ids.index("p1-s000120")].mean() > 100 * probs[ids.index("base")].mean()


def test_figures_and_summary(tiny_run) -> None:
    run_dir, proc = tiny_run
    pngs = sorted((run_dir / "figures").glob("*.png"))
    assert pngs, "no figures"
    for png in pngs:
        assert png.with_suffix(".pdf").is_file() and png.with_suffix(".svg").is_file() and png.with_suffix(".csv").is_file()
    summary = (run_dir / "summary.md").read_text()
    assert "Held-out facts" in summary and "ΔCosSim" in summary and "p1-s000120" in summary
    assert "rotelab tui" in proc.stdout


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard run folder, read by tensorboard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(ev.step, ev.value) for ev in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_tracks_training_and_eval(tiny_run) -> None:
    """DeepSpeed's monitor wrote per-step loss and lr of both phases; eval wrote object prob, MC and
    generation accuracy per kind × split at step = total_tokens. References: the loss log the
    trainer wrote row by row, the index's total_tokens, and the store's per-item arrays."""
    run_dir, proc = tiny_run
    from rotelab.run import Run
    from rotelab.store import Store

    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in proc.stdout
    rows = [ln.split(",") for ln in (run_dir / "logs" / "train_loss.csv").read_text().splitlines()[1:]]
    for stage in ("phase1", "phase2"):
        sc = _scalars(run_dir / "tensorboard" / stage)
        assert {"Train/Steps/loss", "Train/Steps/lr", "Train/Samples/lr"} <= set(sc), (stage, sorted(sc))
        want = [(int(r[1]), float(r[3])) for r in rows if r[0] == stage]
        got = sc["Train/Steps/loss"]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5)
        assert [v for _, v in sc["Train/Steps/lr"]] == pytest.approx([float(r[4]) for r in rows if r[0] == stage], rel=1e-3)
        assert any((run_dir / "logs" / "csv_monitor" / stage).glob("*.csv")), stage
    run = Run.open(run_dir)
    entries = run.checkpoints()
    ev = _scalars(run_dir / "tensorboard" / "eval-main")
    for kind in run.kinds():
        for metric in ("object_prob", "mc_correct", "gen_correct"):
            for split in ("train", "heldout", "all"):
                assert f"{metric}/{kind}/{split}" in ev, (metric, kind, split)
    group = Store.open(run.store_path, mode="r").kind("key")
    probs = group.read_item_array("object_prob")  # [checkpoint, item]
    series = ev["object_prob/key/all"]
    assert [s for s, _ in series] == [e.total_tokens for e in entries]
    assert entries[-1].total_tokens > entries[3].total_tokens > 0
    by_id = {e.total_tokens: e.id for e in entries}
    for step, value in series:
        assert value == pytest.approx(float(probs[group.checkpoints.index(by_id[step])].mean()), rel=1e-5)


def test_rerun_does_nothing_new(tiny_run) -> None:
    run_dir, _ = tiny_run
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*.safetensors")}
    proc = subprocess.run(
        [sys.executable, "-m", "rotelab.cli", "run", str(ROOT / "configs" / "tiny.yaml"), "--run", str(run_dir), "--stages", "train,eval,capture"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*.safetensors")}
    assert before == after


def test_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("phase2:\n  k: 500\ndata:\n  facts_per_relation: 10\n")
    proc = subprocess.run([sys.executable, "-m", "rotelab.cli", "run", str(bad), "--runs-dir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "phase2.k=500" in proc.stderr and str(bad) in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_keep_weights_drops_only_after_eval_capture_and_analyze(tmp_path: Path, monkeypatch) -> None:
    """The pipeline rule of train.keep_weights: every stage that reads weights (eval, capture,
    analyze) sees all of them; the drop happens after them, and not at all when this invocation
    did not run all three."""
    from fixtures_runs import make_tiny_run

    from rotelab import pipeline

    run = make_tiny_run(tmp_path, n_checkpoints=4, config={"train": {"keep_weights": "final"}})
    seen: list[tuple[str, int]] = []

    def fake(name):
        def f(r):
            seen.append((name, sum(1 for e in r.checkpoints() if e.path is not None and (r.root / e.path / "model.safetensors").is_file())))
        return f

    monkeypatch.setattr(pipeline, "_stage_functions", lambda progress, fuse=False: {s: fake(s) for s in pipeline.STAGES})
    pipeline.run_pipeline(run, stages=("train", "eval", "capture"), echo=lambda m: None)
    assert all(e.path is not None for e in run.checkpoints())
    pipeline.run_pipeline(run, echo=lambda m: None)
    assert [n for s, n in seen if s in ("eval", "capture", "analyze")] == [4] * 5
    assert [e.id for e in run.checkpoints() if e.path is not None] == ["base", "p1-e03"]
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["base", "index.json", "p1-e03"]


def test_fused_probe_pass_store_equals_separate_stages(tiny_run, tmp_path) -> None:
    """The tiny run's checkpoints, evaluated and captured by ``rotelab run`` with both stages (the
    fused probe pass) and by the eval and capture stages one after the other: every array of the
    two stores is identical bit for bit (values, dtypes, shapes, attributes but ``probe_pass``),
    and the attrs say which pass wrote each array."""
    import shutil

    import torch

    from rotelab.pipeline import run_pipeline
    from rotelab.run import Run
    from rotelab.store import Store

    sys.path.insert(0, str(ROOT / "scripts"))
    from compare_stores import compare

    run_dir, _ = tiny_run
    runs = {}
    for name in ("fused", "separate"):
        shutil.copytree(run_dir, tmp_path / name, ignore=shutil.ignore_patterns("store.zarr", "tensorboard"))
        runs[name] = Run.open(tmp_path / name)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # both in this process, on the same threads
    try:
        run_pipeline(runs["fused"], stages=("eval", "capture"), progress=False, echo=lambda s: None)
        run_pipeline(runs["separate"], stages=("eval",), progress=False, echo=lambda s: None)
        run_pipeline(runs["separate"], stages=("capture",), progress=False, echo=lambda s: None)
    finally:
        torch.set_num_threads(n)
    diffs, n_arrays, n_tables = compare(runs["fused"].store_path, runs["separate"].store_path, ["probe_pass"])
    assert diffs == [], diffs[:10]
    assert n_arrays > 100 and n_tables >= 1
    for name, want in (("fused", "fused"), ("separate", "separate")):
        st = Store.open(runs[name].store_path, mode="r")
        for kind in st.kinds():
            kg = st.kind(kind)
            for ckpt in kg.checkpoints:
                if is_icl_kind(kind) and ckpt != "base":  # not evaluated (eval.icl_checkpoints): capture alone
                    assert f"provenance/{ckpt}" not in kg.array_attrs("object_prob")
                    assert set(kg.array_attrs("activations")[f"probe_pass/{ckpt}"].values()) == {"separate"}
                    assert kg.array_attrs("final_norm")[f"probe_pass/{ckpt}"] == "separate"
                    continue
                assert kg.array_attrs("object_prob")[f"provenance/{ckpt}"]["probe_pass"] == want
                assert set(kg.array_attrs("activations")[f"probe_pass/{ckpt}"].values()) == {want}
                assert kg.array_attrs("final_norm")[f"probe_pass/{ckpt}"] == want


def test_sweep_prunes_only_after_every_sibling_linked_its_phase1(tmp_path: Path, monkeypatch) -> None:
    """``train.keep_weights: final`` in a sweep whose siblings share phase 1 and start phase 2 from
    different phase-1 points: the second sibling still trains (its phase-2 start's weights exist
    when it links them), and afterwards what the setting drops is gone while every folder a
    sibling links to is still there (checked on the files, not on the index)."""
    from rotelab import pipeline
    from rotelab.config import config_from_dict

    real = pipeline._stage_functions

    def stages_with_noop_consumers(progress, fuse=False):
        fns = dict(real(progress, fuse))
        for s in ("eval", "capture", "analyze", "figures", "summary"):
            fns[s] = lambda r: None
        return fns

    monkeypatch.setattr(pipeline, "_stage_functions", stages_with_noop_consumers)
    cfg = config_from_dict({
        "name": "kw", "seed": 0, "model": {"name": "tiny-llama"},
        "data": {"relations": ["capital", "author"], "facts_per_relation": 6, "distractors": 3, "templates_per_kind": 1},
        "phase1": {"epochs": 2, "lr": 1.0e-2, "batch_size": 8},
        "phase2": {"k": 2, "prompts": 1, "epochs": 2, "lr": 1.0e-3, "batch_size": 4},
        "train": {"keep_weights": "final"},
        "sweep": {"phase2.start": ["p1-e01", "p1-e02"]},
    })
    results = pipeline.run_config(cfg, runs_dir=tmp_path / "runs", progress=False, echo=lambda m: None)
    first, second = (r.run for r in results)

    def has_weights(run, cid: str) -> bool:
        d = run.checkpoints_dir / cid
        return d.exists() and any(d.resolve().glob("*.safetensors"))

    for run in (first, second):
        ids = [e.id for e in run.checkpoints()]
        assert ids[-2:] == ["p2-e01", "p2-e02"], ids  # both siblings trained their phase 2
        assert has_weights(run, "base") and has_weights(run, "p2-e02")
        assert not has_weights(run, "p2-e01")  # dropped by `final`
    assert (second.checkpoints_dir / "p1-e01").is_symlink()  # phase 1 is the first sibling's
    for cid in ("p1-e01", "p1-e02"):  # linked by the second sibling: kept in the first
        assert has_weights(first, cid) and has_weights(second, cid)


def test_capture_icl_checkpoints_base_only_through_analyses_and_figures(tmp_path: Path) -> None:
    """``capture.icl_checkpoints: [base]`` (what the demo uses): eval + capture (fused) leave the ICL
    kinds' slabs committed at base only — no separate capture of them elsewhere — every other
    kind's everywhere; a later ``rotelab capture`` adds nothing; ``--checkpoints`` still captures
    an ICL kind where it is named; the analyses and figures run on the partial ICL groups."""
    import torch
    from fixtures_runs import make_tiny_run

    from rotelab.pipeline import run_pipeline
    from rotelab.probe.capture import capture_run
    from rotelab.store import Store

    run = make_tiny_run(tmp_path, n_checkpoints=3, config={"capture": {"icl_checkpoints": ["base"]}})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_pipeline(run, stages=("eval", "capture", "analyze", "figures"), progress=False, echo=lambda s: None)
    finally:
        torch.set_num_threads(n)
    st = Store.open(run.store_path, mode="r")
    icl = [k for k in st.kinds() if is_icl_kind(k)]
    assert icl and len(icl) < len(st.kinds())
    for kind in st.kinds():
        kg = st.kind(kind)
        acts = kg.committed("activations")
        want = [c == "base" for c in kg.checkpoints] if is_icl_kind(kind) else [True] * len(kg.checkpoints)
        assert acts.all(axis=1).tolist() == want and (acts.any(axis=1) == acts.all(axis=1)).all(), kind
        assert kg.committed("final_norm").tolist() == want, kind
        if is_icl_kind(kind):  # the base slabs came from eval's prompt pass
            assert set(kg.array_attrs("activations")["probe_pass/base"].values()) == {"fused"}
            assert np.isnan(kg.read_activations(checkpoints=["p1-e01"])).all()
    assert (run.root / "figures").is_dir() and any((run.root / "figures").glob("*.png"))
    capture_run(run, progress=False)  # nothing left to do
    assert Store.open(run.store_path, mode="r").kind(icl[0]).committed("activations").all(axis=1).tolist() == [True, False, False]
    capture_run(run, checkpoints=["p1-e01"], kinds=[icl[0]], progress=False)
    assert Store.open(run.store_path, mode="r").kind(icl[0]).committed("activations").all(axis=1).tolist() == [True, True, False]
