"""`rotelab report` on the sibling runs of a real tiny sweep (``seed: [0, 1]``, ``phase2.k: [1, 3]``):
its numbers against a recomputation from the stored per-item arrays with numpy/scipy, one table row
per group × stage, mixed models refused, runs in progress said so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from rotelab.config import config_from_dict
from rotelab.errors import RotelabError
from rotelab.run import Run
from rotelab.store import Store

SWEEP = {
    "name": "rep",
    "seed": 0,
    "model": {"name": "tiny-llama"},
    "data": {"relations": ["capital", "author"], "facts_per_relation": 7, "distractors": 5, "languages": ["de"],
             "templates_per_kind": 1},
    "phase1": {"epochs": 2, "lr": 1.0e-2, "batch_size": 8},
    "phase2": {"k": 1, "prompts": 1, "epochs": 1, "lr": 1.0e-3, "batch_size": 4},
    "eval": {"engine": "hf", "max_new_tokens": 3, "batch_size": 16, "kinds": ["key", "train", "test"]},
    "sweep": {"seed": [0, 1], "phase2.k": [1, 3]},
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path]:
    from rotelab.pipeline import run_config

    root = tmp_path_factory.mktemp("report")
    (root / "rep.yaml").write_text(json.dumps(SWEEP))
    run_config(config_from_dict(SWEEP), runs_dir=root / "runs", stages=("data", "train", "eval"), progress=False, echo=lambda m: None)
    return root / "runs", root / "rep.yaml"


def _per_run_means(run: Run) -> dict[tuple[str, str, str, str], float]:
    """(checkpoint, kind, split, metric) → mean over the split's items, straight from the store."""
    st = Store.open(run.store_path, mode="r")
    out = {}
    for kind in ("key", "train", "test"):
        g = st.kind(kind)
        split = g.items["split"].astype(str).to_numpy()
        masks = {"all": np.ones(len(split), bool), "train": split == "train", "validation": split == "validation",
                 "test": split == "test", "heldout": np.isin(split, ["validation", "test"])}
        for metric in ("gen_correct", "object_prob", "mc_correct"):
            a = g.read_item_array(metric).astype(np.float64)
            for ci, c in enumerate(g.checkpoints):
                for s, m in masks.items():
                    if m.any():
                        out[(c, kind, s, metric)] = float(a[ci, m].mean())
    return out


def test_report_numbers_equal_a_recomputation_from_the_per_item_arrays(sweep, tmp_path) -> None:
    from rotelab.analyses.report import report

    runs_dir, cfg = sweep
    out = tmp_path / "out"
    [rep] = report([cfg], out, runs_dir=runs_dir)
    assert rep.experiment == "rep" and rep.split == "test" and not rep.in_progress
    stats = pd.read_csv(out / "stats.csv", keep_default_na=False, na_values=[""])
    chance = 1 / 6
    for k in (1, 3):
        runs = [Run.open(runs_dir / f"rep-seed={s}-k={k}") for s in (0, 1)]
        means = [_per_run_means(r) for r in runs]
        start = json.loads(runs[0].index_path.read_text())["phase2_start"]
        assert start.startswith("p1-")
        for (c, kind, split, metric) in means[0]:
            v = np.array([m[(c, kind, split, metric)] for m in means])
            row = stats[(stats.group == f"k={k}") & (stats.stage == c) & (stats.kind == kind) & (stats.split == split) & (stats.metric == metric)]
            assert len(row) == 1, (k, c, kind, split, metric)
            row = row.iloc[0]
            se = v.std(ddof=1) / np.sqrt(2)
            assert row["n"] == 2 and row["mean"] == pytest.approx(v.mean(), abs=1e-9)
            assert row["ci95"] == pytest.approx(sps.t.ppf(0.975, 1) * se, abs=1e-9)
            if metric == "mc_correct" and se > 0:
                assert row["p_chance"] == pytest.approx(sps.t.sf((v.mean() - chance) / se, 1), abs=1e-9)
            if c.startswith("p2-"):
                d = v - np.array([m[(start, kind, split, metric)] for m in means])
                assert row["gain_mean"] == pytest.approx(d.mean(), abs=1e-9)
                if d.std(ddof=1) > 0:
                    assert row["p_gain"] == pytest.approx(sps.t.sf(d.mean() / (d.std(ddof=1) / np.sqrt(2)), 1), abs=1e-9)
    # one row per group × stage in the stages table and in every per-metric table of report.md
    stages = pd.read_csv(out / "stages.csv")
    want = {(f"k={k}", e.id) for k in (1, 3) for e in Run.open(runs_dir / f"rep-seed=0-k={k}").checkpoints()}
    assert len(stages) == len(want) and set(zip(stages.group, stages.stage)) == want
    md = (out / "report.md").read_text()
    section = md.split("## generation accuracy per stage (test facts)")[1].split("\n## ")[0]
    assert sum(1 for line in section.splitlines() if line.startswith("| k=")) == len(want)
    # the setting is picked on validation and said so; the figures exist in three formats
    sel = pd.read_csv(out / "selection.csv")
    assert sel["picked"].sum() == 1 and "validation" in md and "Picked **k=" in md
    best = sel.loc[sel["validation_mean"].idxmax(), "group"]
    assert sel.loc[sel["picked"], "group"].item() == best
    for ext in ("png", "pdf", "svg", "csv"):
        assert (out / f"curves_gen_correct.{ext}").is_file()
    t1 = pd.read_csv(out / "table1.csv")
    assert list(t1.group) == ["k=1", "k=3"] and (t1.start == start).all()


def test_report_finds_siblings_from_a_run_dir_and_the_cli_writes_it(sweep, tmp_path) -> None:
    runs_dir, _ = sweep
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "rotelab.cli", "report", str(runs_dir / "rep-seed=1-k=3"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = pd.read_csv(out / "stats.csv")
    assert set(stats.group) == {"k=1", "k=3"} and set(stats.n) == {2}


def test_mixed_models_in_one_group_are_refused(sweep, tmp_path) -> None:
    from rotelab.analyses.report import report

    runs_dir, _ = sweep
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for s in (0, 1):
        (mixed / f"rep-seed={s}-k=1").symlink_to(runs_dir / f"rep-seed={s}-k=1")
    other = json.loads(json.dumps(SWEEP))
    other.pop("sweep")
    other.update(name="rep-seed=2-k=1", seed=2, model={"name": "tiny-gpt2"})
    Run.create(config_from_dict(other), mixed / "rep-seed=2-k=1")
    with pytest.raises(RotelabError, match=r"group k=1: .* differ in model.name \('tiny-llama' vs 'tiny-gpt2'\): different models"):
        report([mixed], tmp_path / "o")
    proc = subprocess.run([sys.executable, "-m", "rotelab.cli", "report", str(mixed), "--out", str(tmp_path / "o2")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "different models" in proc.stderr


def test_a_run_in_progress_is_reported_with_what_is_committed(sweep, tmp_path) -> None:
    from rotelab.analyses.report import report

    runs_dir, _ = sweep
    part = tmp_path / "part"
    part.mkdir()
    (part / "rep-seed=0-k=1").symlink_to(runs_dir / "rep-seed=0-k=1")
    late = json.loads(json.dumps(SWEEP))
    late.pop("sweep")
    late.update(name="rep-seed=1-k=1", seed=1)
    Run.create(config_from_dict(late), part / "rep-seed=1-k=1")  # data only: nothing trained yet
    [rep] = report([part], tmp_path / "o")
    md = (tmp_path / "o" / "report.md").read_text()
    assert list(rep.in_progress) == [str(part / "rep-seed=1-k=1")] and "in progress" in md
    assert set(pd.read_csv(tmp_path / "o" / "stats.csv")["n"]) == {1}


def test_grid_figure_of_a_two_key_sweep(tmp_path) -> None:
    from rotelab.analyses.report import STAT_COLUMNS, _grid_figure

    rows = []
    for k in (1, 5, 20):
        for p in (1, 2):
            for stage, phase in (("p1-e10", "phase1"), ("p2-e01", "phase2"), ("p2-e02", "phase2")):
                rows.append({c: np.nan for c in STAT_COLUMNS} | {
                    "group": f"k={k}-prompts={p}", "stage": stage, "series": "main", "phase": phase, "kind": "test",
                    "split": "test", "metric": "gen_correct", "n": 3, "mean": (k * 10 + p) / 1000 + (stage == "p2-e02")})
    stats = pd.DataFrame(rows)
    values = {f"k={k}-prompts={p}": {"k": str(k), "prompts": str(p)} for k in (1, 5, 20) for p in (1, 2)}
    assert _grid_figure(stats, values, "test", tmp_path) == ["grid"]
    data = pd.read_csv(tmp_path / "grid.csv")
    assert len(data) == 6 and (tmp_path / "grid.svg").is_file()
    got = {(r.k, r.prompts): r.mean for r in data.itertuples()}
    assert got == {(k, p): pytest.approx(1 + (k * 10 + p) / 1000) for k in (1, 5, 20) for p in (1, 2)}  # the last phase-2 point
    assert _grid_figure(stats, {g: {"k": v["k"]} for g, v in values.items()}, "test", tmp_path / "no") == []


def test_a_legacy_run_is_reported_on_its_heldout_facts(tmp_path) -> None:
    """Runs written before the validation/test split (no data/split.json, split label ``heldout``)
    stay readable: the report uses ``heldout`` and picks nothing on it."""
    from fixtures_runs import make_tiny_run

    from rotelab.analyses.report import report
    from rotelab.probe import evaluate_run

    dirs = []
    for seed in (0, 1):
        run = make_tiny_run(tmp_path / f"s{seed}", config={"name": f"leg-seed={seed}", "seed": seed, "eval": {"engine": "hf", "kinds": ["test"], "max_new_tokens": 2}})
        (run.data_dir / "split.json").unlink()  # what an older rotelab wrote
        run = Run.open(run.root)
        assert run.legacy_split and "heldout" in set(run.items("test")["split"])
        evaluate_run(run, progress=False)
        dirs.append(run.root)
    [rep] = report(dirs, tmp_path / "out")
    assert rep.split == "heldout"
    stats = pd.read_csv(tmp_path / "out" / "stats.csv")
    assert set(stats.split) == {"all", "train", "heldout"} and set(stats.n) == {2}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "predate the validation/test split" in md and "(heldout facts)" in md
