"""Loaded by every Python process whose PYTHONPATH starts with this folder (tests/test_multirank.py):
an audit hook (PEP 578) that records each write-like file-system call of a process of rank > 0
under ``ROTELAB_AUDIT_ROOT`` into ``ROTELAB_AUDIT_LOG`` (one ``rank event path`` line each).

Recorded events: ``open`` with a writing flag, ``os.mkdir``, ``os.rename``, ``os.replace``,
``os.remove``, ``os.rmdir``, ``os.symlink``, ``os.truncate``, ``shutil.rmtree``. Writes made by
native code that bypasses Python's ``open`` (safetensors' Rust writer) are not seen, but the
folder such a writer fills is created and renamed through ``os.mkdir``/``os.rename``, which are.
Does nothing in processes without ``ROTELAB_AUDIT_LOG`` or of rank 0.
"""

import os
import sys

_LOG = os.environ.get("ROTELAB_AUDIT_LOG")
_RANK = os.environ.get("RANK", "0")
if _LOG and _RANK != "0":
    _root = os.path.realpath(os.environ["ROTELAB_AUDIT_ROOT"])
    _fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _PATH_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.symlink", "os.truncate", "shutil.rmtree"}
    _busy = [False]

    def _under_root(p) -> str | None:
        if isinstance(p, bytes):
            p = p.decode(errors="replace")
        if not isinstance(p, (str, os.PathLike)):
            return None
        full = os.path.realpath(os.path.join(os.getcwd(), os.fspath(p)))
        return full if full == _root or full.startswith(_root + os.sep) else None

    def _hook(event: str, args: tuple) -> None:
        if _busy[0]:
            return
        if event == "open":
            path, _mode, flags = args
            if not isinstance(flags, int) or not flags & _WRITE_FLAGS:
                return
            paths = [path]
        elif event in _PATH_EVENTS:
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        _busy[0] = True
        try:
            for p in paths:
                full = _under_root(p)
                if full is not None:
                    os.write(_fd, f"{_RANK} {event} {full}\n".encode())
        finally:
            _busy[0] = False

    sys.addaudithook(_hook)
