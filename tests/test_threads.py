"""The thread rule (rotelab.threads): the user's setting wins, a process alone takes every free
core, processes of one job split them, busy cores are never taken; and the command line applies it
to real subprocesses (the thread count torch reports inside the process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rotelab.errors import RotelabError
from rotelab.threads import thread_count


def test_user_setting_wins():
    assert thread_count(4, env={"ROTELAB_THREADS": "3", "OMP_NUM_THREADS": "1"}, cores=2, busy=5).threads == 3
    assert thread_count(4, env={"OMP_NUM_THREADS": "2"}, cores=16, busy=0).threads == 2
    with pytest.raises(RotelabError, match="ROTELAB_THREADS"):
        thread_count(env={"ROTELAB_THREADS": "zero"}, cores=2, busy=0)
    with pytest.raises(RotelabError, match="at least 1"):
        thread_count(env={"OMP_NUM_THREADS": "0"}, cores=2, busy=0)


@pytest.mark.parametrize(
    ("cores", "busy", "procs", "local", "want"),
    [
        (2, 0.0, 1, None, 2),  # alone: all cores
        (2, 1.2, 1, None, 1),  # a competing process holds a core: never two threads
        (2, 3.0, 1, None, 1),  # overloaded: still one
        (16, 0.3, 1, None, 16),
        (16, 0.0, 2, None, 8),  # two shards split the cores
        (16, 0.0, 1, "4", 4),  # four ranks of a launcher on this node
        (16, 4.0, 3, None, 4),  # 12 free cores over 3 shards
        (2, 0.0, 2, None, 1),
    ],
)
def test_rule(cores, busy, procs, local, want):
    env = {"LOCAL_WORLD_SIZE": local} if local else {}
    assert thread_count(procs, env=env, cores=cores, busy=busy).threads == want


def _torch_threads_in_cli(extra_env: dict[str, str], args: list[str]) -> int:
    """Run the ``rotelab`` entry point with ARGS in a fresh interpreter, then import torch and print its thread count."""
    code = (
        "import sys\n"
        "from rotelab.cli import main\n"
        f"sys.argv = ['rotelab', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "import torch\n"
        "print('THREADS', torch.get_num_threads(), flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ROTELAB_THREADS", "MKL_NUM_THREADS")}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("THREADS")]
    assert lines, f"no thread report: rc={out.returncode} {out.stderr[-500:]}"
    return int(lines[-1].split()[1])


def test_cli_applies_the_rule_in_a_real_process(tmp_path):
    """torch is imported after the command ran (as a stage would import it): it reads the rule's OMP_NUM_THREADS."""
    cmd = ["data", "make", "--out", str(tmp_path / "d"), "--facts-per-relation", "2", "--relations", "capital"]
    assert _torch_threads_in_cli({"ROTELAB_THREADS": "1"}, cmd) == 1
    from rotelab.threads import thread_count as rule

    expected = rule(1, env={}).threads
    got = _torch_threads_in_cli({}, cmd)
    assert abs(got - expected) <= 1  # the machine's load may move by one between the two decisions
    assert got <= max(1, (os.cpu_count() or 1))


def test_busy_cores_from_two_samples():
    """Δbusy / Δtotal per CPU, summed: one CPU fully busy and one a quarter busy is 1.25 cores."""
    from rotelab.threads import busy_cores

    before = {0: (100, 1000), 1: (50, 1000)}
    after = {0: (200, 1100), 1: (75, 1100)}
    assert busy_cores(before, after) == pytest.approx(1.25)
    assert busy_cores(after, after) == 0.0  # no ticks in between: idle, not an error


def test_busy_now_sees_a_competitor_that_runs_now(tmp_path):
    """A CPU-bound process pinned to one of our cores is counted while it runs, and — unlike the
    1-minute load average — not after it ended."""
    from rotelab.threads import _busy_now

    cpus = sorted(os.sched_getaffinity(0))
    idle_before = _busy_now()
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpus[0]}}})\nwhile True: pass"])
    try:
        import time

        time.sleep(0.5)
        during = _busy_now()
    finally:
        spin.kill()
        spin.wait()
    after = _busy_now()
    assert during >= idle_before + 0.7 or during >= 0.9, (idle_before, during)
    assert after <= during - 0.5, (during, after)
