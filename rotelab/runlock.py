"""The per-run writer lock: one process at a time writes a run's shared state (checkpoints, their
index, the loss log, the store's derived arrays and tables, figures, summary).

``with run_lock(run_dir, "train"): …`` holds an exclusive ``flock`` on ``<run>/.rotelab.lock``,
whose content says who holds it. A second writer fails at once with one line::

    run runs/x is being written by pid 4242 on host gpu-3 since 2026-12-01T07:40:50+00:00 (rotelab train); …

The kernel releases the lock when its holder dies (kill -9 included), so a stale lock of a dead
process is simply taken over. The lock is re-entrant within a process (``rotelab run`` holds it
across stages that take it again). Under a launcher only rank 0 takes it (the ranks of one launch
are one writer).

Sharded ``eval`` / ``capture`` (``--shard i/n``, or ``RANK``/``WORLD_SIZE`` of ``torchrun``) write
only their own checkpoints' cells, so several run at once: each holds the run lock *shared* and
its own shard lock ``.rotelab.shard-<i>-of-<n>.lock`` exclusively (:func:`shard_lock`). The rule
(decided: a clear error, at once, never a wait or a corrupt store):

* shards ``0/n … n-1/n`` run together; a second process for the same shard is refused;
* a shard of another count ``m ≠ n`` while shards of ``n`` run is refused (its cells overlap);
* a whole-run writer (``rotelab run``/``train``/``analyze``/``figures``, an unsharded ``eval``
  or ``capture``) is refused while shards run, and shards are refused while it runs.

:func:`store_layout_lock` serialises the creation and growth of the store's layout (groups,
coordinates, resizes) between processes that start at the same moment; it waits (a layout step
takes well under a second), then each process writes its own cells unlocked.
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
                f"run {root} is being written by {_holder(fd) if os.fstat(fd).st_size else _shard_holders(root)}; wait for it to finish or stop it"
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


SHARD_LOCK = ".rotelab.shard-{i}-of-{n}.lock"
LAYOUT_LOCK = ".rotelab.layout.lock"


def _shard_files(root: Path) -> list[Path]:
    return sorted(root.glob(".rotelab.shard-*-of-*.lock"))


def _held_by_other(path: Path) -> bool:
    """Whether a live process holds ``path``'s flock (tested by taking and dropping it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _shard_holders(root: Path) -> str:
    live = []
    for f in _shard_files(root):
        if _held_by_other(f):
            try:
                info = json.loads(f.read_text() or "{}")
                live.append(f"pid {info.get('pid', '?')} ({info.get('what', '?')})")
            except (OSError, ValueError):
                live.append(f.name)
    return "shards " + ", ".join(live) if live else "another process"


@contextmanager
def shard_lock(root: str | Path, what: str, index: int, count: int) -> Iterator[None]:
    """Hold run ``root`` as shard ``index``/``count`` of a sharded eval/capture (module docstring);
    a one-line :class:`RotelabError` when the rule refuses it. ``count == 1`` is the whole run:
    :func:`run_lock`."""
    root = Path(root)
    if count == 1:
        with run_lock(root, what):
            yield
        return
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise RotelabError(f"run {root} is being written by {_holder(fd)}; shards wait for it to finish") from None
        mine = root / SHARD_LOCK.format(i=index, n=count)
        for other in _shard_files(root):
            n_other = other.name.rsplit("-of-", 1)[1].split(".")[0]
            if other != mine and n_other != str(count) and _held_by_other(other):
                raise RotelabError(f"run {root}: shards of another count run now ({other.name}); all shards of a run share one n, not {count}")
        sfd = os.open(mine, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(sfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RotelabError(f"run {root}: shard {index}/{count} is already being written by {_holder(sfd)}") from None
            info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                    "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(sfd, 0)
            os.pwrite(sfd, json.dumps(info).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(sfd, 0)
        finally:
            os.close(sfd)
    finally:
        os.close(fd)


@contextmanager
def store_layout_lock(root: str | Path) -> Iterator[None]:
    """Exclusive, waiting lock for creating or growing run ``root``'s store layout (module docstring)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LAYOUT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
