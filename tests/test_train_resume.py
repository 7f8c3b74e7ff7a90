"""kill -9 in the middle of training, then `rotelab train RUN`: the same series and the same final
weights as an uninterrupted run with the same seed; the index never lists a partial checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rotelab.checkpoints import read_index
from rotelab.config import config_from_dict
from rotelab.run import Run

CFG = {
    "name": "kill",
    "seed": 3,
    "model": {"name": "tiny-llama"},
    "data": {"relations": ["capital", "author", "mother"], "facts_per_relation": 6, "distractors": 10, "languages": ["de"]},
    # 18 facts, batch 2 -> 9 steps per epoch; saving every 4 steps puts points mid-epoch
    "phase1": {"epochs": 4, "lr": 3e-3, "batch_size": 2, "save_every": 4},
    "phase2": {"k": 2, "prompts": 2, "epochs": 2, "lr": 1e-3, "batch_size": 4, "grad_accum": 2},
}


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train(target: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rotelab.cli", "train", str(target), "--no-progress", *extra],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _ids(index: Path) -> list[str]:
    try:
        return [e.id for e in read_index(index)]
    except Exception:  # the index is replaced atomically, but be safe while polling
        return []


def test_kill_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    cfg_path = tmp_path / "kill.yaml"
    cfg_path.write_text(yaml.safe_dump(CFG))
    killed = tmp_path / "killed"
    proc = _train(cfg_path, "--run", str(killed))
    index = killed / "checkpoints" / "index.json"
    deadline = time.time() + 300
    while "p1-s000012" not in _ids(index):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "training did not reach p1-s000012"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _ids(index)
    assert "p2-e02" not in at_kill, "the run finished before it was killed"
    # every listed checkpoint is complete
    for e in read_index(index):
        assert (killed / e.path / "model.safetensors").is_file()

    resumed = _train(killed)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err

    # the uninterrupted reference, in this process
    torch.set_num_threads(1)
    from rotelab.train import train_run

    ref = Run.create(config_from_dict(CFG), tmp_path / "ref")
    train_run(ref, progress=False)

    a, b = read_index(index), ref.checkpoints()
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.id for e in a][:7] == ["base", "p1-s000004", "p1-s000008", "p1-s000012", "p1-s000016", "p1-s000020", "p1-s000024"]
    assert [e.tokens_seen for e in a] == [e.tokens_seen for e in b]
    for ea, eb in zip(a, b):
        assert ea.loss == pytest.approx(eb.loss, rel=1e-4, abs=1e-6) if eb.loss is not None else ea.loss is None
        wa = load_file(str(killed / ea.path / "model.safetensors"))
        wb = load_file(str(ref.root / eb.path / "model.safetensors"))
        for k in wb:
            assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), (ea.id, k)
    # the loss log has each step exactly once, with the same values
    def rows(run_dir: Path) -> list[tuple[str, str]]:
        lines = (run_dir / "logs" / "train_loss.csv").read_text().splitlines()[1:]
        return [(r.split(",")[0], r.split(",")[1]) for r in lines]

    assert rows(killed) == rows(ref.root)
    assert not (killed / "checkpoints" / ".resume").exists()
