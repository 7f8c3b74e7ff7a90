"""`rotelab run` end to end on the tiny ablation configs: the paper's SFT baseline and sft-k, C1
injection, repurposing and memorized MC distractors (configs/tiny-ablations.yaml), and C3
(configs/tiny-meaningful.yaml). Every stage runs in a real subprocess, as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rotelab.run import Run
from rotelab.store import Store

ROOT = Path(__file__).parents[1]


def _run(runs: Path, name: str) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "rotelab.cli", "run", str(ROOT / "configs" / f"{name}.yaml"), "--runs-dir", str(runs)],
        capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return runs / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def test_tiny_ablations_end_to_end(runs: Path) -> None:
    root = _run(runs, "tiny-ablations")
    index = json.loads((root / "checkpoints" / "index.json").read_text())["checkpoints"]
    ids = [e["id"] for e in index]
    assert ids == ["base", *[f"p1-e{i:02d}" for i in range(1, 7)], "p2-e01", "p2-e02", "inj-e01", "inj-e02", "inj-e03",
                   "sft-e01", "sft-e02", "sftk-e01", "sftk-e02"]
    by = {e["id"]: e for e in index}
    assert by["inj-e03"]["total_tokens"] == by["p2-e02"]["total_tokens"] + by["inj-e03"]["tokens_seen"]
    assert by["p2-e02"]["total_tokens"] == by["p1-e06"]["total_tokens"] + by["p2-e02"]["tokens_seen"]
    assert {by[i]["series"] for i in ("sft-e01", "sftk-e01")} == {"sft", "sft-k"}
    # SFT trains all 18 facts x P=1, sft-k the 9 phase-2 facts: twice the tokens per epoch here
    assert by["sft-e01"]["step"] == 5 and by["sftk-e01"]["step"] == 3  # ceil(18 / 4), ceil(9 / 4)
    run = Run.open(root)
    st = Store.open(run.store_path, mode="r")
    assert {"repurposed", "icl", "icl-translated-de", "reverse"} <= set(st.kinds())
    rep = st.kind("repurposed").items
    assert set(rep["relation"]) == {"mother"} and set(rep["split"]) == {"train", "validation", "test", "injected"}
    # every checkpoint of every series is evaluated; the injected facts have their own split
    test = st.kind("test")
    assert test.checkpoints == ids
    mc = test.read_item_array("mc_correct")
    assert np.isfinite(mc).all()
    assert set(test.items["split"]) == {"train", "validation", "test", "injected"}
    assert json.loads((root / "data" / "distractors.json").read_text())["distractors_from"] == "memorized"
    for f in ("tokens_gen_correct.png", "curves_gen_correct_sft.png", "curves_gen_correct.png"):
        assert (root / "figures" / f).is_file(), f
    summary = (root / "summary.md").read_text()
    assert "Injected facts" in summary and "SFT (paper) (last) (`sft-e02`)" in summary and "| repurposed |" in summary


def test_tiny_meaningful_end_to_end(runs: Path) -> None:
    root = _run(runs, "tiny-meaningful")
    run = Run.open(root)
    assert "meaningful" in run.kinds() and "key" not in run.kinds()
    assert json.loads((root / "checkpoints" / "index.json").read_text())["key_token_ids"] == {}
    st = Store.open(run.store_path, mode="r")
    mem, train = st.kind("meaningful").items, st.kind("train").items
    assert set(mem["template_id"]) == {0} and set(train["template_id"]) == {1}  # train-1 memorized, train-2 in phase 2
    assert set(mem["text"]).isdisjoint(set(train["text"]))
    assert np.isfinite(st.kind("meaningful").read_item_array("object_prob")).all()
    ids = [e.id for e in run.checkpoints()]
    assert ids[-2:] == ["sft-e01", "sft-e02"]
