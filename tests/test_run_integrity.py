"""A run only ever trusts what it wrote itself: a store copied from a run that differs only in its
seed is refused, damaged checkpoint weights are named in one line (eval, train), and train
verifies its last checkpoint before reporting done. Commands run as the installed entry point."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli_helpers import error_line, rotelab
from rotelab.config import config_from_dict
from rotelab.run import Run

pytestmark = pytest.mark.usefixtures("one_thread")

#: A base-only run (no training steps): seconds to set up, and eval has a real store to write.
BASE_ONLY = {
    "model": {"name": "tiny-llama"},
    "data": {"relations": ["capital", "author"], "facts_per_relation": 4, "distractors": 5, "languages": ["de"],
             "templates_per_kind": 1, "seed": 0},
    "phase1": {"epochs": 0},
    "phase2": {"enabled": False},
    "eval": {"engine": "hf", "max_new_tokens": 3},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Two runs that differ only in ``seed`` (same facts via ``data.seed``); ``a`` evaluated."""
    from rotelab.probe.accuracy import evaluate_run
    from rotelab.train import train_run

    root = tmp_path_factory.mktemp("integrity")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        run = Run.create(config_from_dict({**BASE_ONLY, "name": name, "seed": seed}), root / name)
        train_run(run, progress=False)
        out[name] = run
    evaluate_run(out["a"], progress=False)
    return out


def test_store_of_a_run_differing_only_in_seed_is_refused(runs: dict[str, Run], tmp_path: Path) -> None:
    a, b = runs["a"], runs["b"]
    assert a.fingerprint()["dataset"] == b.fingerprint()["dataset"]  # the same facts: only the seed differs
    other = tmp_path / "b"
    shutil.copytree(b.root, other)
    shutil.copytree(a.store_path, other / "store.zarr")
    for stage in ("eval", "capture", "analyze"):
        line = error_line(rotelab(stage, other, "--no-progress"))
        assert "store.zarr" in line and "different fingerprint" in line and "config" in line, line
    # its own store is still accepted by the run that wrote it
    own = rotelab("eval", a.root, "--no-progress")
    assert own.returncode == 0, own.stderr[-2000:]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_weights_are_one_line_naming_the_checkpoint(runs: dict[str, Run], tmp_path: Path) -> None:
    run = tmp_path / "a"
    shutil.copytree(runs["a"].root, run)
    shutil.rmtree(run / "store.zarr")
    weights = run / "checkpoints" / "base" / "model.safetensors"
    _truncate(weights)
    for stage in ("eval", "capture", "train"):
        line = error_line(rotelab(stage, run, "--no-progress"))
        assert str(weights) in line and "'base'" in line and "truncated" in line, line


def test_train_verifies_the_last_checkpoint_against_its_recorded_hash(runs: dict[str, Run], tmp_path: Path) -> None:
    run = tmp_path / "a"
    shutil.copytree(runs["a"].root, run)
    weights = run / "checkpoints" / "base" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, different weights: only the recorded hash can tell
    weights.write_bytes(bytes(data))
    line = error_line(rotelab("train", run, "--no-progress"))
    assert str(weights.parent) in line and "'base'" in line and "sha256" in line, line
