"""The one rule for how many CPU threads a rotelab process computes with.

Why a rule at all: torch's default is one intra-op thread per physical core, and its parallel
regions wait for their slowest thread. When another CPU-bound process holds one of the cores, every
region waits for a thread that is not running: measured on this project's 2-core machine, a tiny
model's training step got up to ~20× slower with 2 threads than with 1 (BENCHMARKS.md,
"Training"), and several sharded or multi-rank processes each taking every core oversubscribe the
machine the same way.

The rule (:func:`thread_count`), decided once when a command starts:

1. ``ROTELAB_THREADS`` if set (an integer ≥ 1), else ``OMP_NUM_THREADS`` if set: the user decides.
2. Otherwise ``free = cores − busy``, where ``cores`` are the cores this process may run on
   (``os.sched_getaffinity``) and ``busy`` how many of them other processes keep busy *now*: the
   non-idle share of each of those cores over a 0.3 s window (``/proc/stat``), summed and rounded
   to the nearest integer. (Not the 1-minute load average: it still counts work that has just
   ended — the pip install of ``make demo``'s setup, a finished test run — and made a demo
   started on a machine that had just gone quiet run on one of its two cores.)
3. ``threads = max(1, free // procs)``, where ``procs`` is how many rotelab processes of the same
   job share the machine: the number of shards of a sharded eval/capture (``--shard i/n``) and the
   launcher's ``LOCAL_WORLD_SIZE`` (torchrun, deepspeed), whichever is larger.

So a process alone on the machine uses all its cores, several processes of one job split them, and
a process that starts next to a busy core never takes it. The rule is applied (:func:`apply`)
by the command line before any stage imports torch (``OMP_NUM_THREADS`` is set, so subprocesses
such as vLLM's engine inherit it) and, where torch is already imported (the Python API, tests),
through ``torch.set_num_threads``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from rotelab.errors import RotelabError


@dataclass(frozen=True)
class ThreadChoice:
    """How many threads, and the one-line reason (shown with ``-v``-style notices)."""

    threads: int
    reason: str


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise RotelabError(f"environment variable {name}={raw!r}: not an integer") from None
    if value < 1:
        raise RotelabError(f"environment variable {name}={raw!r}: must be at least 1")
    return value


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """``{cpu: (busy jiffies, total jiffies)}`` from ``/proc/stat`` for the CPUs in ``cpus``."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            cpu = int(name[3:])
            if cpu in cpus:
                v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                out[cpu] = (sum(v) - v[3] - v[4], sum(v))
    return out


def busy_cores(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> float:
    """How many cores were busy between two :func:`_cpu_times` samples: the sum over CPUs of
    Δbusy / Δtotal (a CPU without ticks in between counts as idle)."""
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        if t1 > t0:
            busy += (b1 - b0) / (t1 - t0)
    return busy


def _busy_now(window: float = 0.3) -> float:
    """Cores of this process's affinity set that other processes keep busy now (this process
    sleeps during the window)."""
    import time

    try:
        cpus = set(os.sched_getaffinity(0))
        before = _cpu_times(cpus)
        time.sleep(window)
        return busy_cores(before, _cpu_times(cpus))
    except (OSError, ValueError, IndexError, AttributeError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def thread_count(
    procs: int = 1,
    *,
    env: Mapping[str, str] | None = None,
    cores: int | None = None,
    busy: float | None = None,
) -> ThreadChoice:
    """Threads for one process under the rule in the module docstring.

    ``procs``: rotelab processes of this job on this machine (shards); ``LOCAL_WORLD_SIZE`` in
    ``env`` raises it. ``cores`` / ``busy`` default to this machine's (for tests).
    """
    env = os.environ if env is None else env
    for name in ("ROTELAB_THREADS", "OMP_NUM_THREADS"):
        forced = _env_int(env, name)
        if forced is not None:
            return ThreadChoice(forced, f"{name}={forced}")
    local = _env_int(env, "LOCAL_WORLD_SIZE") or 1
    procs = max(1, int(procs), local)
    cores = _cores() if cores is None else int(cores)
    busy = _busy_now() if busy is None else float(busy)
    free = max(1, cores - int(round(busy)))
    threads = max(1, free // procs)
    return ThreadChoice(threads, f"{cores} cores, {busy:.1f} busy, {procs} process(es) of this job -> {threads} thread(s) each")


#: The thread settings the user started us with (before :func:`apply` writes ``OMP_NUM_THREADS``).
_USER_ENV = {k: v for k, v in os.environ.items() if k in ("ROTELAB_THREADS", "OMP_NUM_THREADS")}


def apply(procs: int = 1) -> ThreadChoice:
    """Decide with :func:`thread_count` (on the settings the process started with, so a second call
    with more ``procs`` re-decides) and make it so for this process and its children."""
    launcher = {k: v for k, v in os.environ.items() if k == "LOCAL_WORLD_SIZE"}
    choice = thread_count(procs, env={**_USER_ENV, **launcher})
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    os.environ.setdefault("MKL_NUM_THREADS", str(choice.threads))
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(choice.threads)
    return choice
