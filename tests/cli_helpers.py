"""Helpers for tests that run the installed ``rotelab`` entry point in real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

#: The console script pip installed beside this interpreter (what a user runs).
ROTELAB = str(Path(sys.executable).with_name("rotelab"))


def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def rotelab(*args: str | Path, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``rotelab ARGS…`` to its end; stdout and stderr captured."""
    return subprocess.run([ROTELAB, *map(str, args)], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def _default_sigint() -> None:
    # a test run started in the background of a shell has SIGINT ignored, and children inherit
    # that; the command under test must see Ctrl-C as a terminal would deliver it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(*args: str | Path, cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start ``rotelab ARGS…`` (SIGINT at its default, as from a terminal)."""
    return subprocess.Popen([ROTELAB, *map(str, args)], cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``rotelab: error: …`` line of a failed command (asserts exit 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rotelab: error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]
