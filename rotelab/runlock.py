"""The per-run writer lock: one process at a time writes a run's shared state (checkpoints, their
index, the loss log, the store's derived arrays and tables, figures, summary).

``with run_lock(run_dir, "train"): …`` holds an exclusive ``flock`` on ``<run>/.rotelab.lock``,
whose content says who holds it. A second writer fails at once with one line::

    run runs/x is being written by pid 4242 on host gpu-3 since 2026-12-01T07:40:50+00:00 (rotelab train); …

The kernel releases the lock when its holder dies (kill -9 included), so a stale lock of a dead
process is simply taken over. The lock is re-entrant within a process (``rotelab run`` holds it
across stages that take it again). Under a launcher only rank 0 takes it (the ranks of one launch
are one writer). Stages that write only their own cells (sharded ``eval`` / ``capture``) do not
take it and may run beside a writer.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from rotelab.errors import RotelabError

LOCK_NAME = ".rotelab.lock"
_held: dict[Path, int] = {}  # resolved run dir -> depth of this process's holds


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')} ({info.get('what', '?')})"
    except (OSError, ValueError, AttributeError):
        return "another process"


@contextmanager
def run_lock(root: str | Path, what: str) -> Iterator[None]:
    """Hold the writer lock of run ``root`` for ``what`` (e.g. ``rotelab train``); a one-line
    :class:`RotelabError` if another live process holds it."""
    root = Path(root)
    key = root.resolve()
    if os.environ.get("RANK", "0") != "0":  # a rank > 0 of a launch: rank 0 holds it
        yield
        return
    if key in _held:  # re-entered by the holder
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RotelabError(f"{root / LOCK_NAME}: cannot lock the run ({err.strerror})") from None
            raise RotelabError(
                f"run {root} is being written by {_holder(fd)}; wait for it to finish or stop it"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
