"""The experiment catalogue (``configs/experiments/``): every config validates, expands into its
sweep with three seeds, says its estimate and GPU scaling in its header, and ``rotelab run CONFIG
--stages data`` writes every sibling's data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rotelab.config import expand_sweep, load_config
from rotelab.pipeline import run_config
from rotelab.run import Run

ROOT = Path(__file__).parents[1]
CATALOGUE = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
EXPECTED = {"table1a-memorize-more", "table1b-one-fact", "fig2-k-by-p", "fig3-4-8-generalization", "fig5-vs-sft", "fig6-icl",
            "fig7-representations", "fig9-11-ablations", "fig13-languages", "fig21-reverse", "fig22-repurpose"}


def test_the_catalogue_is_complete() -> None:
    assert {p.stem for p in CATALOGUE} == EXPECTED


@pytest.mark.parametrize("path", CATALOGUE, ids=lambda p: p.stem)
def test_catalogue_config_validates_and_writes_its_data(path: Path, tmp_path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "Estimated wall time" in header and "ESTIMATE" not in header and "on GPUs" in header and "rotelab report" in header
    cfg = load_config(path)
    assert cfg.name == path.stem and cfg.sweep["seed"] == [0, 1, 2]
    siblings = expand_sweep(cfg)
    assert len({c.name for c in siblings}) == len(siblings)
    results = run_config(cfg, runs_dir=tmp_path, stages=("data",), progress=False, echo=lambda m: None)
    assert len(results) == len(siblings)
    for c in siblings:
        run = Run.open(tmp_path / c.name)
        assert (run.data_dir / "facts.jsonl").is_file() and (run.data_dir / "split.json").is_file()
        kinds = set(run.kinds())
        assert set(c.eval.kinds or []) <= kinds, (c.name, set(c.eval.kinds or []) - kinds)
        assert {"validation", "test"} <= set(run.split.values())
        if c.phase2.start != "last":  # a phase-1 point the schedule saves (train/loop.plan_points)
            from rotelab.train.pipeline import phase2_start_id

            assert phase2_start_id(run) == c.phase2.start


def test_rotelab_run_stages_data_from_the_command_line(tmp_path: Path) -> None:
    path = ROOT / "configs" / "experiments" / "fig9-11-ablations.yaml"
    proc = subprocess.run([sys.executable, "-m", "rotelab.cli", "run", str(path), "--stages", "data", "--runs-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"fig9-11-ablations-seed={s}-case={c}" for s in (0, 1, 2) for c in ("C1-inject", "C2-no-key", "C3-meaningful"))
