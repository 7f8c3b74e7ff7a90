"""The one prerequisite rule of the stage commands (rotelab.pipeline.NEEDS), through real
``rotelab`` subprocesses on a tiny config: given a config or a run directory, a stage first does
the missing stages it reads; a sharded stage never trains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from cli_helpers import error_line, rotelab
from rotelab.config import config_from_dict
from rotelab.run import Run
from rotelab.store import Store

TINY = {
    "name": "prereq",
    "model": {"name": "tiny-llama"},
    "data": {"relations": ["capital", "author"], "facts_per_relation": 4, "distractors": 5, "languages": ["de"],
             "templates_per_kind": 1},
    "phase1": {"epochs": 2, "batch_size": 8},
    "phase2": {"k": 2, "epochs": 1, "batch_size": 4},
    "eval": {"engine": "hf", "max_new_tokens": 3, "kinds": ["key"]},
    "capture": {"kinds": ["key"]},
}


def _ids(run_dir: Path) -> list[str]:
    return [e["id"] for e in json.loads((run_dir / "checkpoints" / "index.json").read_text())["checkpoints"]]


def test_capture_given_a_config_trains_first(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINY))
    run_dir = tmp_path / "r"
    p = rotelab("capture", tmp_path / "c.yaml", "--run-dir", run_dir, "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ids = _ids(run_dir)
    assert ids[0] == "base" and any(i.startswith("p1-") for i in ids) and any(i.startswith("p2-") for i in ids)
    kg = Store.open(run_dir / "store.zarr", mode="r").kind("key")
    assert kg.checkpoints == ids and kg.committed("activations").all()
    assert not np.isnan(kg.read_activations()).any()


def test_eval_given_an_untrained_run_directory_trains_first_and_a_shard_refuses(tmp_path: Path) -> None:
    run = Run.create(config_from_dict(TINY), tmp_path / "r")
    assert not run.index_path.exists()
    line = error_line(rotelab("capture", run.root, "--shard", "0/2", "--no-progress"))
    assert "no checkpoints yet" in line and "rotelab train" in line, line
    assert not run.index_path.exists()  # the shard trained nothing
    p = rotelab("eval", run.root, "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    ids = _ids(run.root)
    g = Store.open(run.store_path, mode="r").kind("key")
    assert g.checkpoints == ids and not np.isnan(g.read_item_array("object_prob")).any()
