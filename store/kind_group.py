"""One prompt kind of the store: a zarr group that is one xarray Dataset.

Layout of group ``<kind>`` (all arrays carry ``dimension_names``)::

    checkpoint   str   [checkpoint]        checkpoint ids in series order (coordinate)
    layer        int64 [layer]             (coordinate)
    item         int64 [item]              item ids (coordinate)
    fact_id relation text object split  str [item];  template_id int64 [item]   (item table)
    activations  float16 [checkpoint, layer, item, hidden]   chunk (1, 1, n_items, hidden)
    final_norm   float16 [checkpoint, item, hidden]          chunk (1, n_items, hidden)
    <metric>     float32 or str [checkpoint, item]           chunk (1, n_items)
    <derived>    float32 [dims...]                           chunk 1 along its cell dims
    commit_<X>   uint8 [cell dims of X]                      commit markers (see commits.py)

Selections: ``checkpoints`` are checkpoint ids (str), ``layers`` are layer values (int, as in the
``layer`` coordinate) and ``items`` are item ids (the ``item`` coordinate), like ``xarray.sel``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import zarr

from . import commits
from ._zarr import (
    CELL_DIMS,
    ROLE,
    STR_DTYPE,
    VALUE_KIND,
    create_or_open_array,
    dims_of,
    is_str_array,
    jsonable,
    quiet,
    to_str_array,
)
from .errors import MissingDataError, StoreError, StoreMismatchError

if TYPE_CHECKING:
    import xarray

    from .zarr_store import Store

#: Columns every item table has, in this order.
ITEM_COLUMNS: tuple[str, ...] = ("item", "fact_id", "relation", "template_id", "text", "object", "split")
_INT_ITEM_COLUMNS = {"item", "template_id"}
#: Dims a kind group knows the size of.
GROUP_DIMS: tuple[str, ...] = ("checkpoint", "layer", "item", "hidden")
#: Names that data arrays cannot take.
_RESERVED = {"checkpoint", "layer", "item", "hidden", "activations", "final_norm", "tables"}
_CHECKPOINT_COORD_CHUNK = 1024
#: Cells with at least this many values are read chunk by chunk (only committed ones).
BIG_CELL = 65536


def normalize_items(items: pd.DataFrame, where: str) -> dict[str, np.ndarray]:
    """The item table as column arrays (ints int64, strings StringDType, extra columns kept)."""
    missing = [c for c in ITEM_COLUMNS if c not in items.columns]
    if missing:
        raise StoreError(f"{where}: item table lacks columns {missing}")
    cols: dict[str, np.ndarray] = {}
    names = list(ITEM_COLUMNS) + [str(c) for c in items.columns if c not in ITEM_COLUMNS]
    for c in names:
        s = items[c]
        if c in _INT_ITEM_COLUMNS:
            cols[c] = np.asarray(s, dtype=np.int64)
        elif c in ITEM_COLUMNS:
            cols[c] = to_str_array(list(s))
        elif pd.api.types.is_bool_dtype(s):
            cols[c] = np.asarray(s, dtype=bool)
        elif pd.api.types.is_integer_dtype(s):
            cols[c] = np.asarray(s, dtype=np.int64)
        elif pd.api.types.is_float_dtype(s):
            cols[c] = np.asarray(s, dtype=np.float64)
        else:
            cols[c] = to_str_array(list(s))
    ids = cols["item"]
    if len(np.unique(ids)) != len(ids):
        raise StoreError(f"{where}: item ids are not unique")
    return cols


def _equal_columns(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "TUSO" or b.dtype.kind in "TUSO":
        return [str(x) for x in a.tolist()] == [str(x) for x in b.tolist()]
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


class KindGroup:
    """Handle on one kind's group. Get it from :meth:`Store.ensure_kind` or :meth:`Store.kind`.

    The coordinate lists are read when the handle is made; :meth:`refresh` re-reads them (a
    reader that wants to see checkpoints appended by a writer calls it; selections that name an
    unknown checkpoint refresh once by themselves).
    """

    def __init__(self, store: Store, kind: str) -> None:
        self._store = store
        self.kind = kind
        self._dir: Path = store.path / kind
        try:
            with quiet():
                self._zgroup: zarr.Group = store._root[kind]  # type: ignore[assignment]
        except KeyError:
            raise MissingDataError(f"store {store.path}: no kind {kind!r}") from None
        self._arrays: dict[str, zarr.Array] = {}
        self._items_cache: pd.DataFrame | None = None
        self.refresh()

    # ------------------------------------------------------------------ metadata

    def _where(self) -> str:
        return f"store {self._store.path}, kind {self.kind!r}"

    def refresh(self) -> None:
        """Re-read coordinates and array metadata (sees checkpoints appended since)."""
        self._arrays = {}
        try:
            cps = self._array("checkpoint")[:]
            layers = self._array("layer")[:]
            ids = self._array("item")[:]
        except (KeyError, MissingDataError):
            raise MissingDataError(f"{self._where()}: group is incomplete (no coordinates); rerun ensure_kind") from None
        cp_list = [str(c) for c in np.asarray(cps).tolist()]
        # A coordinate that was resized but not yet filled reads "" at the tail: not there yet.
        if "" in cp_list:
            cp_list = cp_list[: cp_list.index("")]
        self._checkpoints = cp_list
        self._cp_pos = {c: i for i, c in enumerate(cp_list)}
        self._layers = [int(x) for x in np.asarray(layers).tolist()]
        self._layer_pos = {v: i for i, v in enumerate(self._layers)}
        self._item_ids = np.asarray(ids, dtype=np.int64)
        self._item_pos = {int(v): i for i, v in enumerate(self._item_ids.tolist())}

    def _array(self, name: str) -> zarr.Array:
        arr = self._arrays.get(name)
        if arr is None:
            try:
                with quiet():
                    arr = self._zgroup[name]
            except KeyError:
                raise MissingDataError(f"{self._where()}: no array {name!r}") from None
            if not isinstance(arr, zarr.Array):
                raise MissingDataError(f"{self._where()}: {name!r} is not an array")
            self._arrays[name] = arr
        return arr

    def array_attrs(self, name: str) -> dict[str, Any]:
        """A copy of array ``name``'s user attributes (e.g. ``provenance/<checkpoint>`` of metrics)."""
        return dict(self._array(name).attrs)

    def _has(self, name: str) -> bool:
        if name in self._arrays:
            return True
        return (self._dir / name / "zarr.json").is_file()

    def _writable(self) -> None:
        if self._store.mode != "a":
            raise StoreError(f"store {self._store.path} is open read-only (mode 'r')")

    def _arrays_by_role(self, role: str) -> list[str]:
        with quiet():
            names = [n for n, a in self._zgroup.arrays() if a.attrs.get(ROLE) == role]
        return sorted(names)

    @property
    def checkpoints(self) -> list[str]:
        """Checkpoint ids in series order."""
        return list(self._checkpoints)

    @property
    def layers(self) -> list[int]:
        return list(self._layers)

    @property
    def n_items(self) -> int:
        return len(self._item_ids)

    @property
    def items(self) -> pd.DataFrame:
        """The item table: columns item, fact_id, relation, template_id, text, object, split (+ extra)."""
        if self._items_cache is None:
            cols = self._zgroup.attrs.get("item_columns", list(ITEM_COLUMNS))
            data: dict[str, Any] = {}
            for c in cols:
                v = np.asarray(self._array(str(c))[:])
                data[str(c)] = [str(x) for x in v.tolist()] if v.dtype.kind in "TUSO" else v
            self._items_cache = pd.DataFrame(data)
        return self._items_cache.copy()

    @property
    def hidden(self) -> int | None:
        """Hidden size (last dim of ``activations`` / ``final_norm``), None if neither exists."""
        for name in ("activations", "final_norm"):
            if self._has(name):
                return int(self._array(name).shape[-1])
        return None

    def item_arrays(self) -> list[str]:
        """Names of the per-checkpoint item arrays (metrics)."""
        return self._arrays_by_role("item_array")

    def derived_arrays(self) -> list[str]:
        return self._arrays_by_role("derived")

    def arrays(self) -> list[str]:
        """All data array names (no coordinates, item table or markers)."""
        with quiet():
            return sorted(
                n
                for n, a in self._zgroup.arrays()
                if a.attrs.get(ROLE) in ("activations", "final_norm", "item_array", "derived")
            )

    # ------------------------------------------------------------------ positions

    def _cp_index(self, checkpoint: str) -> int:
        pos = self._cp_pos.get(str(checkpoint))
        if pos is None:
            self.refresh()
            pos = self._cp_pos.get(str(checkpoint))
        if pos is None:
            raise MissingDataError(f"{self._where()}: unknown checkpoint {checkpoint!r} (call ensure_kind with it first)")
        return pos

    def _layer_index(self, layer: int) -> int:
        pos = self._layer_pos.get(int(layer))
        if pos is None:
            raise MissingDataError(f"{self._where()}: unknown layer {layer!r} (layers {self._layers[:1]}..{self._layers[-1:]})")
        return pos

    def _item_index(self, item: int) -> int:
        pos = self._item_pos.get(int(item))
        if pos is None:
            raise MissingDataError(f"{self._where()}: unknown item id {item!r}")
        return pos

    def _coord_positions(self, dim: str, labels: Sequence[Any]) -> list[int]:
        if dim == "checkpoint":
            return [self._cp_index(c) for c in labels]
        if dim == "layer":
            return [self._layer_index(v) for v in labels]
        if dim == "item":
            return [self._item_index(v) for v in labels]
        if self._has(dim):
            values = [str(x) if isinstance(x, str) else x for x in np.asarray(self._array(dim)[:]).tolist()]
            pos = {v: i for i, v in enumerate(values)}
            out = []
            for lab in labels:
                key = lab.item() if isinstance(lab, np.generic) else lab
                if key not in pos:
                    raise MissingDataError(f"{self._where()}: {dim}={lab!r} not in coordinate {dim}")
                out.append(pos[key])
            return out
        return [int(x) for x in labels]

    # ------------------------------------------------------------------ generic cells

    def _spec(self, name: str) -> tuple[zarr.Array, tuple[str, ...], tuple[str, ...]]:
        arr = self._array(name)
        dims = dims_of(arr)
        cell = tuple(str(d) for d in arr.attrs.get(CELL_DIMS, []))
        return arr, dims, cell

    def _marker(self, name: str) -> zarr.Array:
        """The marker array of data array ``name``, for a writer: created if a killed writer of an
        older version left the data array without it (markers are now made before their array)."""
        mname = commits.marker_name(name)
        if self._has(mname):
            return self._array(mname)
        arr, dims, cell = self._spec(name)
        return self._create_marker(name, cell, self._cell_shape(arr, dims, cell))

    def _create_marker(self, name: str, cell_dims: Sequence[str], shape: Sequence[int]) -> zarr.Array:
        arr = create_or_open_array(
            self._zgroup,
            commits.marker_name(name),
            shape=tuple(shape),
            dtype="uint8",
            chunks=tuple(1 for _ in shape),
            fill_value=0,
            dims=list(cell_dims),
            attributes={ROLE: "marker", "rotelab_marks": name},
        )
        self._arrays[commits.marker_name(name)] = arr
        return arr

    def _cell_shape(self, arr: zarr.Array, dims: tuple[str, ...], cell: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(int(arr.shape[dims.index(d)]) for d in cell)

    def committed(self, array: str) -> np.ndarray:
        """Committed mask of ``array`` over its cell dims: bool ``[checkpoint, layer]`` for
        ``activations``, ``[checkpoint]`` for ``final_norm`` and item arrays, the cell dims for
        derived arrays. All False for an array that does not exist yet."""
        if not self._has(array):
            if array == "activations":
                return np.zeros((len(self._checkpoints), len(self._layers)), dtype=bool)
            return np.zeros((len(self._checkpoints),), dtype=bool)
        arr, dims, cell = self._spec(array)
        mask = commits.scan_markers(self._dir / commits.marker_name(array), self._cell_shape(arr, dims, cell))
        if "checkpoint" in cell:  # never report beyond the checkpoints this handle knows
            ax = cell.index("checkpoint")
            mask = np.take(mask, np.arange(min(mask.shape[ax], len(self._checkpoints))), axis=ax)
        return mask

    def is_committed(self, array: str, checkpoint: str | None = None, layer: int | None = None, **labels: Any) -> bool:
        """Whether one cell of ``array`` is committed (``checkpoint``/``layer`` as needed by its
        cell dims; other cell dims by keyword)."""
        if not self._has(array):
            return False
        arr, dims, cell = self._spec(array)
        given = dict(labels)
        if checkpoint is not None:
            given["checkpoint"] = checkpoint
        if layer is not None:
            given["layer"] = layer
        missing = [d for d in cell if d not in given]
        if missing:
            raise StoreError(f"{self._where()}: is_committed({array!r}) needs {missing}")
        try:
            idx = tuple(self._coord_positions(d, [given[d]])[0] for d in cell)
        except MissingDataError:
            return False
        return commits.read_marker_cell(self._dir / commits.marker_name(array), idx)

    def _write_cells(self, name: str, index: Mapping[str, int], data: np.ndarray) -> None:
        """Write ``data`` into the cells of ``name`` picked by ``index`` (dim -> position, cell
        dims only; absent cell dims mean all), then commit those cells."""
        arr, dims, cell = self._spec(name)
        bad = [d for d in index if d not in cell]
        if bad:
            raise StoreError(f"{self._where()}: {name!r} can only be indexed by its cell dims {list(cell)}, not {bad}")
        region = tuple(int(index[d]) if d in index else slice(None) for d in dims)
        expected = tuple(int(arr.shape[k]) for k, d in enumerate(dims) if d not in index)
        data = np.asarray(data)
        if data.shape != expected:
            raise StoreError(
                f"{self._where()}: data for {name!r} has shape {data.shape}, expected {expected} "
                f"(dims {[d for d in dims if d not in index]})"
            )
        marker = self._marker(name)
        mregion = tuple(int(index[d]) if d in index else slice(None) for d in cell)
        mdir = self._dir / commits.marker_name(name)
        if all(d in index for d in cell):
            was = commits.read_marker_cell(mdir, tuple(int(index[d]) for d in cell))
        else:
            was = bool(commits.scan_markers(mdir, self._cell_shape(arr, dims, cell))[mregion].any())
        if was:  # rewriting committed data: uncommit first so no reader trusts a mix
            marker[mregion] = 0
        if is_str_array(arr):
            arr[region] = to_str_array(data)
        else:
            arr[region] = data.astype(arr.dtype, copy=False)
        marker[mregion] = 1

    def _read_masked(self, name: str, sel: Mapping[str, Sequence[int] | None]) -> np.ndarray:
        """Read ``name`` with positions ``sel`` per dim (None = all); uncommitted cells NaN ("")."""
        arr, dims, cell = self._spec(name)
        shape = tuple(int(s) for s in arr.shape)
        pos: list[np.ndarray] = []
        for k, d in enumerate(dims):
            p = sel.get(d)
            if d == "checkpoint" and p is None:
                p = list(range(min(shape[k], len(self._checkpoints))))
            pos.append(np.arange(shape[k]) if p is None else np.asarray(list(p), dtype=np.int64))
        out_shape = tuple(len(p) for p in pos)
        as_str = is_str_array(arr)
        cshape = self._cell_shape(arr, dims, cell)
        mask_full = commits.scan_markers(self._dir / commits.marker_name(name), cshape)
        cell_pos = [pos[dims.index(d)] for d in cell]
        mask = mask_full[np.ix_(*cell_pos)] if cell else mask_full
        # broadcast the cell mask over the non-cell dims
        bshape = [out_shape[k] if d in cell else 1 for k, d in enumerate(dims)]
        mask_b = np.broadcast_to(mask.reshape(bshape), out_shape)

        def empty() -> np.ndarray:
            if as_str:
                return np.full(out_shape, "", dtype=STR_DTYPE)
            return np.full(out_shape, np.nan, dtype=np.float32)

        if not mask.any() or 0 in out_shape:
            return empty()
        cell_size = int(np.prod([s for d, s in zip(dims, shape, strict=True) if d not in cell]))
        if cell and cell_size >= BIG_CELL:
            # big cells (activation slabs): read the committed cells one chunk at a time, straight
            # into the output (one float16 -> float32 pass, nothing uncommitted is read)
            return self._read_cells(arr, dims, cell, pos, mask, out_shape)
        try:
            sel_t = tuple(
                slice(None) if len(p) == shape[k] and np.array_equal(p, np.arange(shape[k])) else p
                for k, p in enumerate(pos)
            )
            data = np.asarray(arr.get_orthogonal_selection(sel_t))
            if as_str:
                data = to_str_array(data)
                data[~mask_b] = ""
                return data
            data = data.astype(np.float32, copy=False)
            data[~mask_b] = np.nan
            return data
        except Exception:  # an unreadable (corrupt) chunk somewhere: read committed cells one by one
            return self._read_cells(arr, dims, cell, pos, mask, out_shape)

    def _read_cells(
        self,
        arr: zarr.Array,
        dims: tuple[str, ...],
        cell: tuple[str, ...],
        pos: list[np.ndarray],
        mask: np.ndarray,
        out_shape: tuple[int, ...],
    ) -> np.ndarray:
        """The selection (shape ``out_shape``) read cell by cell: committed cells from their
        chunks, everything else (and a chunk that cannot be read) NaN / ""."""
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

    def _positions(
        self,
        checkpoints: Sequence[str] | None,
        layers: Sequence[int] | None,
        items: Sequence[int] | None,
    ) -> dict[str, list[int] | None]:
        return {
            "checkpoint": None if checkpoints is None else self._coord_positions("checkpoint", _as_list(checkpoints)),
            "layer": None if layers is None else self._coord_positions("layer", _as_list(layers)),
            "item": None if items is None else self._coord_positions("item", _as_list(items)),
        }

    # ------------------------------------------------------------------ activations

    def write_slab(self, checkpoint: str, layer: int, data: np.ndarray) -> None:
        """Write one activations slab ``data`` [item, hidden] (any float dtype; stored float16),
        then its commit marker. Rewriting a slab (committed or not) overwrites it."""
        self._writable()
        if not self._has("activations"):
            raise MissingDataError(f"{self._where()}: no activations array (ensure_kind with hidden=...)")
        self._write_cells(
            "activations",
            {"checkpoint": self._cp_index(checkpoint), "layer": self._layer_index(layer)},
            np.asarray(data),
        )

    def write_final_norm(self, checkpoint: str, data: np.ndarray) -> None:
        """Write ``final_norm`` for one checkpoint: ``data`` [item, hidden], then its marker."""
        self._writable()
        if not self._has("final_norm"):
            raise MissingDataError(f"{self._where()}: no final_norm array (ensure_kind with hidden=...)")
        self._write_cells("final_norm", {"checkpoint": self._cp_index(checkpoint)}, np.asarray(data))

    def read_slab(self, checkpoint: str, layer: int) -> np.ndarray:
        """One committed slab as float32 [item, hidden]; MissingDataError if not committed."""
        ci, li = self._cp_index(checkpoint), self._layer_index(layer)
        if not self._has("activations") or not commits.read_marker_cell(
            self._dir / commits.marker_name("activations"), (ci, li)
        ):
            raise MissingDataError(f"{self._where()}: activations slab ({checkpoint!r}, layer {layer}) is not committed")
        arr = self._array("activations")
        try:
            return np.asarray(arr[ci, li], dtype=np.float32)
        except Exception as e:
            raise MissingDataError(
                f"{self._where()}: activations slab ({checkpoint!r}, layer {layer}) is unreadable: {type(e).__name__}"
            ) from None

    def read_activations(
        self,
        checkpoints: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
        items: Sequence[int] | None = None,
    ) -> np.ndarray:
        """float32 [checkpoint, layer, item, hidden] for the selection (None = all; checkpoints
        by id, layers by value, items by id); NaN where not committed."""
        if not self._has("activations"):
            raise MissingDataError(f"{self._where()}: no activations array")
        return self._read_masked("activations", self._positions(checkpoints, layers, items))

    def read_final_norm(self, checkpoints: Sequence[str] | None = None, items: Sequence[int] | None = None) -> np.ndarray:
        """float32 [checkpoint, item, hidden]; NaN where not committed."""
        if not self._has("final_norm"):
            raise MissingDataError(f"{self._where()}: no final_norm array")
        return self._read_masked("final_norm", self._positions(checkpoints, None, items))

    # ------------------------------------------------------------------ per-checkpoint item arrays

    def _check_new_name(self, name: str, role: str) -> None:
        if not name or "/" in name or name.startswith((".", "_")) or commits.is_marker_name(name):
            raise StoreError(f"{self._where()}: bad array name {name!r}")
        cols = {str(c) for c in self._zgroup.attrs.get("item_columns", ITEM_COLUMNS)}
        if name in _RESERVED or name in cols:
            raise StoreError(f"{self._where()}: array name {name!r} is reserved")
        if self._has(name):
            have = self._array(name).attrs.get(ROLE)
            if have != role:
                raise StoreMismatchError(f"{self._where()}: {name!r} exists as {have}, not {role}")

    def _merge_attrs(self, name: str, attrs: Mapping[str, Any] | None) -> None:
        """Merge ``attrs`` into the array's attrs, writing metadata only if something changes."""
        if not attrs:
            return
        new = jsonable(dict(attrs))
        bad = [k for k in new if str(k).startswith("rotelab_")]
        if bad:
            raise StoreError(f"{self._where()}: attribute names {bad} are reserved")
        arr = self._array(name)
        if all(arr.attrs.get(k) == v for k, v in new.items()):
            return
        # re-read the metadata right before the update so a concurrent resize is not undone
        self._arrays.pop(name, None)
        arr = self._array(name)
        arr.update_attributes(new)

    def write_item_arrays(
        self,
        checkpoint: str,
        arrays: Mapping[str, np.ndarray | Sequence[Any]],
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Write per-checkpoint item arrays (metrics), each [item], for ``checkpoint``.

        Numbers and bools are stored float32 (missing reads NaN), strings as strings (missing
        reads ""). Arrays are created on first write with dims [checkpoint, item], one chunk per
        checkpoint row. All arrays are written first, then one commit marker per array.
        ``attrs`` are merged into every array's attrs (metadata is rewritten only on change).
        """
        self._writable()
        ci = self._cp_index(checkpoint)
        n = self.n_items
        prepared: dict[str, np.ndarray] = {}
        for name, values in arrays.items():
            self._check_new_name(name, "item_array")
            v = np.asarray(values)
            if v.shape != (n,):
                raise StoreError(f"{self._where()}: item array {name!r} has shape {v.shape}, expected ({n},)")
            is_str = v.dtype.kind in "TUSO" and not (
                v.dtype.kind == "O" and all(isinstance(x, (bool, int, float, np.generic)) or x is None for x in v.tolist())
            )
            if is_str:
                prepared[name] = to_str_array(v)
            else:
                prepared[name] = np.asarray(
                    [np.nan if x is None else x for x in v.tolist()] if v.dtype.kind == "O" else v, dtype=np.float32
                )
            value_kind = "str" if is_str else "float"
            if not self._has(name):  # the marker first: an existing data array always has one
                self._create_marker(name, ["checkpoint"], (len(self._checkpoints),))
            arr = create_or_open_array(
                self._zgroup,
                name,
                shape=(len(self._checkpoints), n),
                dtype=str if is_str else "float32",
                chunks=(1, n),
                fill_value="" if is_str else np.nan,
                dims=["checkpoint", "item"],
                attributes={ROLE: "item_array", CELL_DIMS: ["checkpoint"], VALUE_KIND: value_kind},
            )
            self._arrays[name] = arr
            if arr.attrs.get(VALUE_KIND) != value_kind:
                raise StoreMismatchError(
                    f"{self._where()}: item array {name!r} holds {arr.attrs.get(VALUE_KIND)} values, got {value_kind}"
                )
        mdir = {name: self._dir / commits.marker_name(name) for name in prepared}
        for name in prepared:  # uncommit rows being rewritten
            if commits.read_marker_cell(mdir[name], (ci,)):
                self._marker(name)[ci] = 0
        for name, v in prepared.items():
            self._array(name)[ci, :] = v
        for name in prepared:
            self._marker(name)[ci] = 1
        for name in prepared:
            self._merge_attrs(name, attrs)

    def read_item_array(
        self, name: str, checkpoints: Sequence[str] | None = None, items: Sequence[int] | None = None
    ) -> np.ndarray:
        """[checkpoint, item]: float32 with NaN where not committed, or strings with ""."""
        if not self._has(name):
            raise MissingDataError(f"{self._where()}: no item array {name!r}")
        out = self._read_masked(name, self._positions(checkpoints, None, items))
        if out.dtype.kind == "T":  # fixed-width numpy str for callers
            return np.array(out.tolist(), dtype=str).reshape(out.shape)
        return out

    # ------------------------------------------------------------------ derived arrays

    def _dim_size(self, dim: str) -> int | None:
        if dim == "checkpoint":
            return len(self._checkpoints)
        if dim == "layer":
            return len(self._layers)
        if dim == "item":
            return self.n_items
        if dim == "hidden":
            return self.hidden
        if self._has(dim):
            return int(self._array(dim).shape[0])
        return None

    def write_derived(
        self,
        name: str,
        dims: tuple[str, ...],
        data: np.ndarray,
        *,
        index: Mapping[str, int | str] | None = None,
        extra_coords: Mapping[str, Sequence[Any]] | None = None,
        attrs: Mapping[str, Any] | None = None,
        cell_dims: Sequence[str] | None = None,
        dtype: str = "float32",
    ) -> None:
        """Write a derived array (created on first write, ``dtype`` float32 by default, NaN fill;
        an integer ``dtype`` fills with -1, and reads still give float32 with NaN where uncommitted).

        ``dims`` may use the group's dims (checkpoint, layer, item, hidden) and new dims whose
        coordinates come from ``extra_coords`` (created once as coordinate arrays; a new dim
        without coordinates gets ``0..n-1``). ``index`` (labels: checkpoint id, layer value, or a
        coordinate value) writes one cell and commits it: ``data`` then has the remaining dims.
        Without ``index`` the whole array is written and committed. The array is chunked and
        committed per cell of its *cell dims*: by default those of checkpoint/layer it has;
        ``cell_dims`` (first write only) can name others. Index keys must be cell dims.
        """
        self._writable()
        self._check_new_name(name, "derived")
        dims = tuple(str(d) for d in dims)
        if len(set(dims)) != len(dims):
            raise StoreError(f"{self._where()}: derived {name!r} has repeated dims {dims}")
        index = dict(index or {})
        extra = {str(k): list(v) for k, v in (extra_coords or {}).items()}
        data = np.asarray(data)
        data_dims = [d for d in dims if d not in index]
        if data.ndim != len(data_dims):
            raise StoreError(f"{self._where()}: data for {name!r} has {data.ndim} dims, expected {data_dims}")
        # sizes and coordinates of the dims
        shape: list[int] = []
        for d in dims:
            size = self._dim_size(d)
            if d in extra:
                if d in GROUP_DIMS:
                    raise StoreError(f"{self._where()}: extra_coords cannot redefine group dim {d!r}")
                self._ensure_coord(d, extra[d])
                size = len(extra[d])
            if size is None:
                if d in index:
                    raise StoreError(f"{self._where()}: cannot index new dim {d!r} without extra_coords")
                size = int(data.shape[data_dims.index(d)])
                self._ensure_coord(d, list(range(size)))
            elif d not in GROUP_DIMS and d not in extra and not (self._dir / d / "c" / "0").is_file():
                self._ensure_coord(d, list(range(size)))  # completes a default coordinate left unwritten
            shape.append(int(size))
        if self._has(name):
            arr, have_dims, cell = self._spec(name)
            if have_dims != dims or tuple(int(s) for s in arr.shape) != tuple(shape):
                raise StoreMismatchError(
                    f"{self._where()}: derived {name!r} exists with dims {have_dims} shape {arr.shape}, "
                    f"got dims {dims} shape {tuple(shape)}"
                )
        else:
            cell = tuple(cell_dims) if cell_dims is not None else tuple(d for d in dims if d in ("checkpoint", "layer"))
            if any(d not in dims for d in cell):
                raise StoreError(f"{self._where()}: cell_dims {cell} not all in dims {dims}")
            cell = tuple(d for d in dims if d in cell)  # keep dims order
            # the marker first: an existing data array always has its marker
            self._create_marker(name, cell, [s for d, s in zip(dims, shape, strict=True) if d in cell])
            arr = create_or_open_array(
                self._zgroup,
                name,
                shape=shape,
                dtype=dtype,
                chunks=[1 if d in cell else s for d, s in zip(dims, shape, strict=True)],
                fill_value=np.nan if np.dtype(dtype).kind == "f" else -1,  # integers: -1 (masked on read anyway)
                dims=dims,
                attributes={ROLE: "derived", CELL_DIMS: list(cell)},
            )
            self._arrays[name] = arr
        pos = {d: self._coord_positions(d, [lab])[0] for d, lab in index.items()}
        self._write_cells(name, pos, data)
        self._merge_attrs(name, attrs)

    def _ensure_coord(self, dim: str, values: Sequence[Any]) -> None:
        """Create coordinate ``dim`` with ``values``, complete one a killed writer left without its
        values, or check an existing one (StoreMismatchError if its values differ). Coordinates are
        written before any array that uses them, so such an array never sees an unwritten one."""
        if dim in _RESERVED or commits.is_marker_name(dim) or "/" in dim:
            raise StoreError(f"{self._where()}: bad dim name {dim!r}")
        v = np.asarray(values)
        is_str = v.dtype.kind in "TUSO"
        existed = self._has(dim)
        arr = create_or_open_array(
            self._zgroup,
            dim,
            shape=(len(v),),
            dtype=str if is_str else v.dtype,
            chunks=(max(1, len(v)),),
            fill_value="" if is_str else 0,
            dims=[dim],
            attributes={ROLE: "coord"},
        )
        self._arrays[dim] = arr
        if existed and (self._dir / dim / "c" / "0").is_file():
            have = np.asarray(arr[:]).tolist()
            if len(have) != len(v) or [str(x) for x in have] != [str(x) for x in v.tolist()]:
                raise StoreMismatchError(f"{self._where()}: coordinate {dim!r} exists with different values")
            return
        if int(arr.shape[0]) != len(v):
            raise StoreMismatchError(f"{self._where()}: coordinate {dim!r} exists with {arr.shape[0]} values, not {len(v)}")
        arr[:] = to_str_array(v) if is_str else v

    def read_derived(
        self,
        name: str,
        checkpoints: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
        items: Sequence[int] | None = None,
    ) -> np.ndarray:
        """The derived array (float32, its own dims) for the selection; NaN where uncommitted."""
        if not self._has(name):
            raise MissingDataError(f"{self._where()}: no derived array {name!r}")
        return self._read_masked(name, self._positions(checkpoints, layers, items))

    def dims(self, name: str) -> tuple[str, ...]:
        """Dimension names of array ``name``."""
        return dims_of(self._array(name))

    def coord(self, dim: str) -> np.ndarray:
        """Values of coordinate ``dim`` (checkpoint, layer, item or an extra coordinate)."""
        if dim == "checkpoint":
            return np.asarray(self._checkpoints, dtype=str)
        v = np.asarray(self._array(dim)[:])
        return np.array(v.tolist(), dtype=str) if v.dtype.kind == "T" else v

    # ------------------------------------------------------------------ xarray

    def to_xarray(self) -> xarray.Dataset:
        """The group as a lazily opened ``xarray.Dataset`` (raw: uncommitted cells are not
        masked there; the ``commit_<X>`` variables say which cells are committed)."""
        import xarray as xr

        with quiet():
            return xr.open_zarr(self._store.path, group=self.kind, consolidated=False, zarr_format=3)

    def __repr__(self) -> str:
        return (
            f"KindGroup({self.kind!r}, checkpoints={len(self._checkpoints)}, layers={len(self._layers)}, "
            f"items={self.n_items}, hidden={self.hidden})"
        )


def _as_list(x: Any) -> list[Any]:
    if isinstance(x, (str, int, np.integer)):
        return [x]
    return list(x)


__all__ = ["ITEM_COLUMNS", "KindGroup", "normalize_items"]
