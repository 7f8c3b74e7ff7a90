"""Exit codes and one-line failures of the installed ``rotelab`` entry point (real subprocesses, not
typer's test runner): usage errors are one line and exit 2, user errors one line and exit 2, Ctrl-C
one line and exit 130 — a shell ``&&`` chain stops in every case."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import yaml

from cli_helpers import error_line, popen, rotelab

USAGE = [
    (["capture", "somewhere", "--bogus"], "No such option: --bogus"),
    (["eval"], "Missing argument"),
    (["train", "x.yaml", "--run"], "requires an argument"),
    (["eval", "x.yaml", "--shard"], "requires an argument"),
    (["data", "make", "--out", "d", "--facts-per-relation", "0"], "--facts-per-relation"),
    (["frobnicate"], "No such command"),
]


@pytest.mark.parametrize(("args", "says"), USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_are_one_line_exit_2(args: list[str], says: str, tmp_path: Path) -> None:
    line = error_line(rotelab(*args, cwd=tmp_path))
    assert says in line, line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "missing.yaml"], "missing.yaml: config file not found"),
        (["eval", "missing.yaml", "--shard", "x"], "missing.yaml"),
        (["figures", "."], "not a run directory"),
    ],
)
def test_user_errors_are_one_line_exit_2(args: list[str], says: str, tmp_path: Path) -> None:
    line = error_line(rotelab(*args, cwd=tmp_path))
    assert says in line, line


def test_every_stage_takes_the_common_options(tmp_path: Path) -> None:
    for stage in ("run", "train", "eval", "capture", "analyze", "figures"):
        out = rotelab(stage, "--help", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "--no-progress" in out.stdout and "--run" in out.stdout, (stage, out.stdout)


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path: Path) -> None:
    cfg = {
        "name": "long",
        "model": {"name": "tiny-llama"},
        "data": {"relations": ["capital"], "facts_per_relation": 4, "distractors": 5, "languages": ["de"]},
        "phase1": {"epochs": 2000, "batch_size": 4, "save_every": 1000},
        "phase2": {"enabled": False},
    }
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(cfg))
    proc = popen("train", "long.yaml", "--run", "r", "--no-progress", cwd=tmp_path)
    log = tmp_path / "r" / "logs" / "train_loss.csv"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) > 3):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == "rotelab: interrupted"
    assert err.count("rotelab: interrupted") == 1
