"""Smaller states that used to stick: a run dir left by a failed data check, a relative facts file
read from the working directory, ``figures`` on a corrupt index, a loss log cut mid-line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from cli_helpers import error_line, rotelab
from rotelab.config import Config, config_from_dict, load_config
from rotelab.errors import RotelabError
from rotelab.facts import read_facts
from rotelab.run import Run

SMALL = {"model": {"name": "tiny-llama"}, "data": {"relations": ["capital", "author"], "facts_per_relation": 4,
                                                   "distractors": 5, "languages": ["de"]},
         "phase2": {"k": 2}}


def test_a_failed_data_check_leaves_no_run_dir(tmp_path: Path) -> None:
    bad = config_from_dict({**SMALL, "data": {**SMALL["data"], "relations": ["capital", "no_such_relation"]}})
    with pytest.raises(RotelabError, match="no_such_relation"):
        Run.create(bad, tmp_path / "r")
    assert not (tmp_path / "r").exists()
    run = Run.create(config_from_dict(SMALL), tmp_path / "r")  # the corrected config is accepted
    assert run.config_path.is_file() and len(run.facts) == 8


def test_relative_facts_file_resolves_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = Run.create(config_from_dict(SMALL), tmp_path / "src")
    folder = tmp_path / "cfgs"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "mine.jsonl").write_bytes((src.data_dir / "facts.jsonl").read_bytes())
    cfg = {**SMALL, "data": {**SMALL["data"], "facts_file": "data/mine.jsonl"}}
    (folder / "c.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = Run.create(load_config(Path("..") / "cfgs" / "c.yaml"), tmp_path / "r")
    assert [f.subject for f in run.facts] == [f.subject for f in read_facts(folder / "data" / "mine.jsonl")]
    # the stored config names the file absolutely: the run dir works from any folder
    assert Path(Run.open(tmp_path / "r").config.data.facts_file) == (folder / "data" / "mine.jsonl").resolve()


def test_figures_on_a_corrupt_index_is_an_error(tmp_path: Path) -> None:
    run = Run.create(config_from_dict(SMALL), tmp_path / "r")
    run.checkpoints_dir.mkdir()
    run.index_path.write_text('{"checkpoints": [{"id": "base", "pha')
    line = error_line(rotelab("figures", run.root))
    assert str(run.index_path) in line and "not a valid checkpoint index" in line, line


def test_a_loss_log_cut_mid_line_is_repaired_on_resume(tmp_path: Path) -> None:
    from rotelab.train.loop import LOSS_FIELDS, _append_loss, _truncate_loss_log

    run = Run(tmp_path / "r", Config())
    log = run.logs_dir / "train_loss.csv"
    log.parent.mkdir(parents=True)
    rows = [{"stage": "phase1", "step": s, "epoch": f"{s / 4:.4f}", "loss": "1.0", "lr": "1e-3", "tokens_seen": 10 * s,
             "seconds": "0.1"} for s in range(1, 6)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(LOSS_FIELDS))
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue()
    log.write_text(text[: text.rfind("phase1,5,") + len("phase1,5,1.2")])  # killed while writing step 5
    _truncate_loss_log(run, "phase1", 4)  # the resumed stage starts after step 4
    _append_loss(run, rows[4])
    with open(log, newline="") as fh:
        got = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in got] == [1, 2, 3, 4, 5]
    assert all(None not in r and len(r) == len(LOSS_FIELDS) for r in got)
    assert json.dumps(got[4]) == json.dumps({k: str(v) for k, v in rows[4].items()})
