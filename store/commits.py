"""Commit markers.

Design
------
Every data array ``X`` that is written cell by cell has a sibling marker array ``commit_X``:
``uint8``, fill value 0, no compression, one chunk per *cell* (chunk size 1 along each of the
array's cell dims, e.g. ``[checkpoint, layer]`` for ``activations``; a 0-d array when the whole
array is one cell). A writer

1. (if the cell was committed before) clears the marker,
2. writes the data chunk(s) of the cell,
3. writes the marker chunk (the byte ``0x01``).

zarr 3.1's ``LocalStore`` writes every file to a temporary name and renames it into place, so a
chunk file is either absent, the old complete content or the new complete content; a
``kill -9`` leaves at most a stray ``*.partial`` file that nothing reads. A reader trusts a cell
only if its marker file exists and holds exactly ``b"\\x01"``; anything else (absent, empty,
unreadable, other content) is *uncommitted* and is masked as NaN.

Markers are plain zarr arrays with ``dimension_names``, so ``xarray.open_zarr`` shows them as
``commit_X`` variables (1 = committed). Readers here do not go through zarr to read them: a zarr
read of 775 one-byte chunks costs ~0.2 s, while scanning the marker directory costs a few ms. The
chunk-key layout is pinned at creation (``default`` encoding, ``/`` separator), so the file of
cell ``(i, j)`` is ``commit_X/c/i/j`` and of a 0-d marker ``commit_X/c``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MARKER_PREFIX = "commit_"
COMMITTED = b"\x01"


def marker_name(array: str) -> str:
    """Name of the marker array of data array ``array``."""
    return MARKER_PREFIX + array


def is_marker_name(name: str) -> bool:
    return name.startswith(MARKER_PREFIX)


def marker_chunk_path(marker_dir: Path, index: Sequence[int]) -> Path:
    """File of the marker chunk for cell ``index`` (``()`` for a 0-d marker)."""
    p = marker_dir / "c"
    for i in index:
        p = p / str(int(i))
    return p


def read_marker_cell(marker_dir: Path, index: Sequence[int]) -> bool:
    """True iff the marker file of cell ``index`` exists and holds ``0x01``. Never raises."""
    try:
        with open(marker_chunk_path(marker_dir, index), "rb") as f:
            return f.read(2) == COMMITTED
    except OSError:
        return False


def scan_markers(marker_dir: Path, shape: Sequence[int]) -> np.ndarray:
    """Committed mask of all cells: bool array of ``shape`` (the cell dims' sizes).

    Cells outside ``shape`` (a marker written after a resize this reader has not seen yet) are
    ignored; files that are not chunk files (``*.partial``) are skipped. Never raises.
    """
    shape = tuple(int(s) for s in shape)
    out = np.zeros(shape, dtype=bool)
    base = marker_dir / "c"
    if len(shape) == 0:
        out[()] = read_marker_cell(marker_dir, ())
        return out

    def walk(path: Path, prefix: tuple[int, ...]) -> None:
        depth = len(prefix)
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for entry in entries:
            name = entry.name
            if not name.isdigit():
                continue
            i = int(name)
            if i >= shape[depth]:
                continue
            idx = prefix + (i,)
            if depth + 1 == len(shape):
                try:
                    with open(entry.path, "rb") as f:
                        if f.read(2) == COMMITTED:
                            out[idx] = True
                except OSError:
                    pass
            else:
                walk(Path(entry.path), idx)

    walk(base, ())
    return out
