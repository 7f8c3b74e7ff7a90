"""Committed cells: commit markers, and reading / writing a data array cell by cell.

Design
------
Every data array ``X`` that is written cell by cell has a sibling marker array ``commit_X``:
``uint8``, fill value 0, no compression, one chunk per *cell* (chunk size 1 along each of the
array's cell dims, e.g. ``[checkpoint, layer]`` for ``activations``; a 0-d array when the whole
array is one cell). The marker is created before its data array, so an existing data array always
has one. A writer (:meth:`CellArray.write`)

1. (if the cell was committed before) clears the marker,
2. writes the data chunk(s) of the cell,
3. writes the marker chunk (the byte ``0x01``).

zarr 3.1's ``LocalStore`` writes every file to a temporary name and renames it into place, so a
chunk file is either absent, the old complete content or the new complete content; a
``kill -9`` leaves at most a stray ``*.partial`` file that nothing reads. A reader trusts a cell
only if its marker file exists and holds exactly ``b"\\x01"``; anything else (absent, empty,
unreadable, other content) is *uncommitted* and is masked as NaN ("" for strings).

Markers are plain zarr arrays with ``dimension_names``, so ``xarray.open_zarr`` shows them as
``commit_X`` variables (1 = committed). Readers here do not go through zarr to read them: a zarr
read of 775 one-byte chunks costs ~0.2 s, while scanning the marker directory costs a few ms, and
a selection of a few cells (one slab) opens only those cells' marker files. The chunk-key layout is
pinned at creation (``default`` encoding, ``/`` separator), so the file of cell ``(i, j)`` is
``commit_X/c/i/j`` and of a 0-d marker ``commit_X/c``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .errors import StoreError
from .layout import CELL_DIMS, MARKER, MARKS, ROLE, cell_chunks, marker_name
from .zarrutil import STR_DTYPE, create_or_open_array, dims_of, is_str_array, quiet, to_str_array

COMMITTED = b"\x01"
#: Cells with at least this many values are read chunk by chunk (only committed ones).
BIG_CELL = 65536


# ---------------------------------------------------------------------------- marker files
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
    if len(shape) == 0:
        out[()] = read_marker_cell(marker_dir, ())
        return out

    def walk(path: str, prefix: tuple[int, ...]) -> None:
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
                walk(entry.path, idx)

    walk(str(marker_dir / "c"), ())
    return out


def committed_cells(marker_dir: Path, shape: Sequence[int], cell_pos: Sequence[Sequence[int]]) -> np.ndarray:
    """Committed mask of the cells picked by ``cell_pos`` (positions per cell dim, each inside
    ``shape``): bool ``[len(p) for p in cell_pos]``. A selection of few cells (one slab, one row)
    opens only those cells' marker files; a larger one scans the marker directory once."""
    shape = tuple(int(s) for s in shape)
    pos = [np.asarray(p, dtype=np.int64) for p in cell_pos]
    out_shape = tuple(len(p) for p in pos)
    n_sel, n_all = int(np.prod(out_shape)), int(np.prod(shape))
    if n_sel * 2 > n_all or n_sel > 4096:
        full = scan_markers(marker_dir, shape)
        return full[np.ix_(*pos)] if pos else full
    out = np.zeros(out_shape, dtype=bool)
    for k in np.ndindex(*out_shape):
        out[k] = read_marker_cell(marker_dir, [int(p[j]) for j, p in zip(k, pos, strict=True)])
    return out


def create_marker(group: zarr.Group, name: str, cell_dims: Sequence[str], shape: Sequence[int]) -> zarr.Array:
    """Create (or open) the marker array of data array ``name`` over its cell dims."""
    return create_or_open_array(
        group,
        marker_name(name),
        shape=tuple(shape),
        dtype="uint8",
        chunks=tuple(1 for _ in shape),
        fill_value=0,
        dims=list(cell_dims),
        attributes={ROLE: MARKER, MARKS: name},
    )


def create_cell_array(
    group: zarr.Group,
    name: str,
    *,
    role: str,
    dims: Sequence[str],
    shape: Sequence[int],
    cell_dims: Sequence[str],
    dtype: Any,
    fill_value: Any,
    attributes: Mapping[str, Any] | None = None,
) -> zarr.Array:
    """Create (or open) data array ``name`` chunked by 1 along ``cell_dims`` and, before it, its
    marker (so an existing data array always has its marker). Returns the data array."""
    dims, cell_dims = list(dims), list(cell_dims)
    create_marker(group, name, cell_dims, [int(s) for d, s in zip(dims, shape, strict=True) if d in cell_dims])
    return create_or_open_array(
        group,
        name,
        shape=shape,
        dtype=dtype,
        chunks=cell_chunks(dims, shape, cell_dims),
        fill_value=fill_value,
        dims=dims,
        attributes={ROLE: role, CELL_DIMS: cell_dims, **dict(attributes or {})},
    )


# ---------------------------------------------------------------------------- cell I/O
def _as_slice(p: np.ndarray, n: int) -> slice | np.ndarray:
    """Positions ``p`` along a dim of size ``n`` as a slice when they are one ascending run (all,
    or e.g. the one cell of a single-cell read), else unchanged."""
    if len(p) == n and np.array_equal(p, np.arange(n)):
        return slice(None)
    if len(p) and int(p[-1]) - int(p[0]) == len(p) - 1 and bool(np.all(np.diff(p) == 1)):
        return slice(int(p[0]), int(p[-1]) + 1)
    return p


class CellArray:
    """One data array of a group with its marker: committed masks, cell writes, masked reads.

    ``data`` is the (cached) zarr array, ``group`` / ``group_dir`` its group and folder; ``where``
    prefixes error messages. Cheap to make: it holds no state beyond the arrays' metadata.
    """

    def __init__(
        self, group: zarr.Group, group_dir: Path, name: str, data: zarr.Array, where: str, marker: zarr.Array | None = None
    ) -> None:
        self.group, self.name, self.data, self.where = group, name, data, where
        self.marker = marker
        """The marker array if the caller has it open (writers open or create it otherwise)."""
        self.dims = dims_of(data)
        self.cell_dims = tuple(str(d) for d in data.attrs.get(CELL_DIMS, []))
        self.marker_dir = group_dir / marker_name(name)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def cell_shape(self) -> tuple[int, ...]:
        """Sizes of the cell dims (the marker's shape)."""
        return tuple(int(self.data.shape[self.dims.index(d)]) for d in self.cell_dims)

    def committed(self) -> np.ndarray:
        """bool [cell dims]: which cells are committed."""
        return scan_markers(self.marker_dir, self.cell_shape)

    def is_committed(self, index: Sequence[int]) -> bool:
        """Whether cell ``index`` (one position per cell dim) is committed."""
        return read_marker_cell(self.marker_dir, index)

    def _marker_for_write(self) -> zarr.Array:
        """The marker array, created if a killed writer of an older version left the data array
        without it (markers are now made before their array)."""
        if self.marker is not None:
            return self.marker
        try:
            with quiet():
                arr = self.group[marker_name(self.name)]
            if isinstance(arr, zarr.Array):
                self.marker = arr
                return arr
        except KeyError:
            pass
        self.marker = create_marker(self.group, self.name, self.cell_dims, self.cell_shape)
        return self.marker

    def write(self, index: Mapping[str, int], data: np.ndarray) -> None:
        """Write ``data`` into the cells picked by ``index`` (cell dim -> position; absent cell
        dims mean all), then commit those cells. ``data`` has the array's other dims."""
        write_cells([(self, index, data)])

    def _region(self, index: Mapping[str, int], data: np.ndarray) -> tuple[tuple[Any, ...], tuple[Any, ...], np.ndarray]:
        """(data region, marker region, data) of a write, checked."""
        dims, cell = self.dims, self.cell_dims
        bad = [d for d in index if d not in cell]
        if bad:
            raise StoreError(f"{self.where}: {self.name!r} can only be indexed by its cell dims {list(cell)}, not {bad}")
        expected = tuple(int(self.data.shape[k]) for k, d in enumerate(dims) if d not in index)
        data = np.asarray(data)
        if data.shape != expected:
            raise StoreError(
                f"{self.where}: data for {self.name!r} has shape {data.shape}, expected {expected} "
                f"(dims {[d for d in dims if d not in index]})"
            )
        region = tuple(int(index[d]) if d in index else slice(None) for d in dims)
        mregion = tuple(int(index[d]) if d in index else slice(None) for d in cell)
        return region, mregion, data

    def _any_committed(self, index: Mapping[str, int]) -> bool:
        cshape = self.cell_shape
        cell_pos = [[int(index[d])] if d in index else range(s) for d, s in zip(self.cell_dims, cshape, strict=True)]
        return bool(committed_cells(self.marker_dir, cshape, cell_pos).any())

    def read(self, pos: Sequence[np.ndarray]) -> np.ndarray:
        """The selection ``pos`` (positions per dim, in dims order): float32 with NaN where not
        committed, or StringDType with "" for a string array."""
        arr, dims, cell = self.data, self.dims, self.cell_dims
        shape = self.shape
        out_shape = tuple(len(p) for p in pos)
        as_str = is_str_array(arr)
        cell_pos = [pos[dims.index(d)] for d in cell]
        mask = committed_cells(self.marker_dir, self.cell_shape, cell_pos)
        # broadcast the cell mask over the non-cell dims
        bshape = [out_shape[k] if d in cell else 1 for k, d in enumerate(dims)]
        mask_b = np.broadcast_to(mask.reshape(bshape), out_shape)
        if not mask.any() or 0 in out_shape:
            if as_str:
                return np.full(out_shape, "", dtype=STR_DTYPE)
            return np.full(out_shape, np.nan, dtype=np.float32)
        cell_size = int(np.prod([s for d, s in zip(dims, shape, strict=True) if d not in cell]))
        if cell and cell_size >= BIG_CELL:
            # big cells (activation slabs): read the committed cells one chunk at a time, straight
            # into the output (one float16 -> float32 pass, nothing uncommitted is read)
            return self._read_cells(pos, mask, out_shape)
        try:
            sel_t = tuple(_as_slice(p, shape[k]) for k, p in enumerate(pos))
            if all(isinstance(x, slice) for x in sel_t):  # zarr's basic indexing is the cheaper path
                data = np.asarray(arr[sel_t])
            else:
                data = np.asarray(arr.get_orthogonal_selection(sel_t))
            if as_str:
                data = to_str_array(data)
                data[~mask_b] = ""
                return data
            data = data.astype(np.float32, copy=False)
            data[~mask_b] = np.nan
            return data
        except Exception:  # an unreadable (corrupt) chunk somewhere: read committed cells one by one
            return self._read_cells(pos, mask, out_shape)

    def _read_cells(self, pos: Sequence[np.ndarray], mask: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
        """The selection (shape ``out_shape``) read cell by cell: committed cells from their
        chunks, everything else (and a chunk that cannot be read) NaN / ""."""
        arr, dims, cell = self.data, self.dims, self.cell_dims
        as_str = is_str_array(arr)
        # np.empty + per-cell fill: np.full of a large float32 output costs more than the reads
        out = np.full(out_shape, "", dtype=STR_DTYPE) if as_str else np.empty(out_shape, dtype=np.float32)
        rest_k = [k for k, d in enumerate(dims) if d not in cell]
        rest_full = all(len(pos[k]) == arr.shape[k] and np.array_equal(pos[k], np.arange(arr.shape[k])) for k in rest_k)
        for cidx in np.ndindex(*mask.shape):
            cmap = dict(zip(cell, cidx, strict=True))
            dst = tuple(int(cmap[d]) if d in cmap else slice(None) for d in dims)
            ok = False
            if mask[cidx]:
                src = tuple(int(pos[k][cmap[d]]) if d in cmap else slice(None) for k, d in enumerate(dims))
                try:
                    chunk = np.asarray(arr[src])
                    if not rest_full:
                        chunk = chunk[np.ix_(*[pos[k] for k in rest_k])]
                    out[dst] = to_str_array(chunk) if as_str else chunk
                    ok = True
                except Exception:
                    ok = False
            if not ok:
                out[dst] = "" if as_str else np.nan
        return out


def write_cells(writes: Sequence[tuple[CellArray, Mapping[str, int], np.ndarray]]) -> None:
    """Write several cells (of one or more arrays) and commit them together: every write is
    checked first, then cells committed before are uncommitted (so no reader trusts a mix), then
    all data is written, then all markers. ``writes``: (array, index, data) as in
    :meth:`CellArray.write`."""
    planned = [(ca, *ca._region(index, data), ca._any_committed(index)) for ca, index, data in writes]
    for ca, _region, mregion, _data, was in planned:
        if was:
            ca._marker_for_write()[mregion] = 0
    for ca, region, _mregion, data, _was in planned:
        if is_str_array(ca.data):
            ca.data[region] = to_str_array(data)
        else:
            ca.data[region] = data.astype(ca.data.dtype, copy=False)
    for ca, _region, mregion, _data, _was in planned:
        ca._marker_for_write()[mregion] = 1
