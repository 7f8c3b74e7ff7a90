"""One prompt kind of the store: a zarr group that is one xarray Dataset (layout in
:mod:`rotelab.store.layout`), with its domain API — activation slabs, final norm, per-checkpoint
item arrays (metrics), derived arrays and coordinates. Committed-cell reading and writing is
:mod:`rotelab.store.cells`; creating and growing the group is :mod:`rotelab.store.kind_schema`.

Selections: ``checkpoints`` are checkpoint ids (str), ``layers`` are layer values (int, as in the
``layer`` coordinate) and ``items`` are item ids (the ``item`` coordinate), like ``xarray.sel``.

This file is over 400 lines because it is the one public handle of a kind (every read and write
method callers use, with its docstring); the work behind them lives in the modules named above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import zarr

from . import kind_schema
from .cells import CellArray, create_cell_array, write_cells
from .errors import MissingDataError, StoreError, StoreMismatchError
from .layout import (
    ACTIVATIONS,
    DATA_ROLES,
    DERIVED,
    FINAL_NORM,
    GROUP_DIMS,
    ITEM_ARRAY,
    ITEM_ARRAY_CELL_DIMS,
    ITEM_ARRAY_DIMS,
    ITEM_COLUMNS,
    ITEM_COLUMNS_ATTR,
    RESERVED,
    RESERVED_ATTR_PREFIX,
    ROLE,
    VALUE_KIND,
    check_name,
    default_cell_dims,
    marker_name,
)
from .zarrutil import dims_of, jsonable, quiet, to_str_array

if TYPE_CHECKING:
    import xarray


class KindGroup:
    """Handle on one kind's group. Get it from :meth:`Store.ensure_kind` or :meth:`Store.kind`
    (or make one with :meth:`KindGroup.ensure` / ``KindGroup(root, store_path, kind)``).

    ``root`` is the store's root zarr group, ``store_path`` its folder; ``writable`` False makes
    every write raise StoreError. The coordinate lists are read when the handle is made;
    :meth:`refresh` re-reads them (a reader that wants to see checkpoints appended by a writer
    calls it; selections that name an unknown checkpoint refresh once by themselves).
    """

    def __init__(self, root: zarr.Group, store_path: Path, kind: str, *, writable: bool = True) -> None:
        self._store_path = Path(store_path)
        self._writable_flag = writable
        self.kind = kind
        self._dir: Path = self._store_path / kind
        try:
            with quiet():
                self._zgroup: zarr.Group = root[kind]  # type: ignore[assignment]
        except KeyError:
            raise MissingDataError(f"store {self._store_path}: no kind {kind!r}") from None
        self._arrays: dict[str, zarr.Array] = {}
        self._items_cache: pd.DataFrame | None = None
        self.refresh()

    @classmethod
    def ensure(
        cls,
        root: zarr.Group,
        store_path: Path,
        kind: str,
        *,
        checkpoints: Sequence[str],
        layers: Sequence[int],
        items: pd.DataFrame,
        hidden: int | None = None,
    ) -> KindGroup:
        """Create group ``kind`` or check it against the arguments, appending new checkpoint ids
        (the semantics are :meth:`Store.ensure_kind`'s, which calls this); a writable handle."""
        kind_schema.ensure_kind_group(
            root, Path(store_path), kind, checkpoints=checkpoints, layers=layers, items=items, hidden=hidden
        )
        return cls(root, store_path, kind)

    @property
    def store_path(self) -> Path:
        """The folder of the store this group belongs to."""
        return self._store_path

    # ------------------------------------------------------------------ metadata

    def _where(self) -> str:
        return f"store {self._store_path}, kind {self.kind!r}"

    def refresh(self) -> None:
        """Re-read coordinates and array metadata (sees checkpoints appended since)."""
        self._arrays = {}
        try:
            cps = self._array("checkpoint")[:]
            layers = self._array("layer")[:]
            ids = self._array("item")[:]
        except (KeyError, MissingDataError):
            raise MissingDataError(f"{self._where()}: group is incomplete (no coordinates); rerun ensure_kind") from None
        cp_list = kind_schema.stored_checkpoints(cps)
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
        if not self._writable_flag:
            raise StoreError(f"store {self._store_path} is open read-only (mode 'r')")

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
            cols = self._zgroup.attrs.get(ITEM_COLUMNS_ATTR, list(ITEM_COLUMNS))
            data: dict[str, Any] = {}
            for c in cols:
                v = np.asarray(self._array(str(c))[:])
                data[str(c)] = [str(x) for x in v.tolist()] if v.dtype.kind in "TUSO" else v
            self._items_cache = pd.DataFrame(data)
        return self._items_cache.copy()

    @property
    def hidden(self) -> int | None:
        """Hidden size (last dim of ``activations`` / ``final_norm``), None if neither exists."""
        for name in (ACTIVATIONS, FINAL_NORM):
            if self._has(name):
                return int(self._array(name).shape[-1])
        return None

    def item_arrays(self) -> list[str]:
        """Names of the per-checkpoint item arrays (metrics)."""
        return self._arrays_by_role(ITEM_ARRAY)

    def derived_arrays(self) -> list[str]:
        return self._arrays_by_role(DERIVED)

    def arrays(self) -> list[str]:
        """All data array names (no coordinates, item table or markers)."""
        with quiet():
            return sorted(
                n
                for n, a in self._zgroup.arrays()
                if a.attrs.get(ROLE) in DATA_ROLES
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

    def _cells(self, name: str) -> CellArray:
        """Committed-cell access to data array ``name`` (MissingDataError if absent)."""
        mname = marker_name(name)
        marker = self._arrays.get(mname)
        if marker is None and self._writable_flag and self._has(mname):
            marker = self._array(mname)
        ca = CellArray(self._zgroup, self._dir, name, self._array(name), self._where(), marker)
        return ca

    def _remember_marker(self, ca: CellArray) -> None:
        if ca.marker is not None:
            self._arrays[marker_name(ca.name)] = ca.marker

    def committed(self, array: str) -> np.ndarray:
        """Committed mask of ``array`` over its cell dims: bool ``[checkpoint, layer]`` for
        ``activations``, ``[checkpoint]`` for ``final_norm`` and item arrays, the cell dims for
        derived arrays. All False for an array that does not exist yet."""
        if not self._has(array):
            if array == ACTIVATIONS:
                return np.zeros((len(self._checkpoints), len(self._layers)), dtype=bool)
            return np.zeros((len(self._checkpoints),), dtype=bool)
        ca = self._cells(array)
        mask = ca.committed()
        if "checkpoint" in ca.cell_dims:  # never report beyond the checkpoints this handle knows
            ax = ca.cell_dims.index("checkpoint")
            mask = np.take(mask, np.arange(min(mask.shape[ax], len(self._checkpoints))), axis=ax)
        return mask

    def is_committed(self, array: str, checkpoint: str | None = None, layer: int | None = None, **labels: Any) -> bool:
        """Whether one cell of ``array`` is committed (``checkpoint``/``layer`` as needed by its
        cell dims; other cell dims by keyword). Opens only that cell's marker file."""
        if not self._has(array):
            return False
        ca = self._cells(array)
        given = dict(labels)
        if checkpoint is not None:
            given["checkpoint"] = checkpoint
        if layer is not None:
            given["layer"] = layer
        missing = [d for d in ca.cell_dims if d not in given]
        if missing:
            raise StoreError(f"{self._where()}: is_committed({array!r}) needs {missing}")
        try:
            idx = tuple(self._coord_positions(d, [given[d]])[0] for d in ca.cell_dims)
        except MissingDataError:
            return False
        return ca.is_committed(idx)

    def _write_cells(self, name: str, index: Mapping[str, int], data: np.ndarray) -> None:
        """Write ``data`` into the cells of ``name`` picked by ``index`` (dim -> position, cell
        dims only; absent cell dims mean all), then commit those cells."""
        ca = self._cells(name)
        ca.write(index, data)
        self._remember_marker(ca)

    def _read_masked(self, name: str, sel: Mapping[str, Sequence[int] | None]) -> np.ndarray:
        """Read ``name`` with positions ``sel`` per dim (None = all; ``checkpoint`` None = the
        checkpoints this handle knows); uncommitted cells NaN ("")."""
        ca = self._cells(name)
        shape = ca.shape
        pos: list[np.ndarray] = []
        for k, d in enumerate(ca.dims):
            p = sel.get(d)
            if d == "checkpoint" and p is None:
                p = list(range(min(shape[k], len(self._checkpoints))))
            pos.append(np.arange(shape[k]) if p is None else np.asarray(list(p), dtype=np.int64))
        return ca.read(pos)

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
        if not self._has(ACTIVATIONS) or not self._cells(ACTIVATIONS).is_committed((ci, li)):
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
        cols = {str(c) for c in self._zgroup.attrs.get(ITEM_COLUMNS_ATTR, ITEM_COLUMNS)}
        check_name(name, "array", self._where(), RESERVED | cols)
        if self._has(name):
            have = self._array(name).attrs.get(ROLE)
            if have != role:
                raise StoreMismatchError(f"{self._where()}: {name!r} exists as {have}, not {role}")

    def merge_attrs(self, name: str, attrs: Mapping[str, Any]) -> None:
        """Merge ``attrs`` into the attrs of array ``name`` (e.g. the provenance of capture slabs)."""
        self._writable()
        if not self._has(name):
            raise MissingDataError(f"{self._where()}: no array {name!r}")
        self._merge_attrs(name, attrs)

    def _merge_attrs(self, name: str, attrs: Mapping[str, Any] | None) -> None:
        """Merge ``attrs`` into the array's attrs, writing metadata only if something changes."""
        if not attrs:
            return
        new = jsonable(dict(attrs))
        bad = [k for k in new if str(k).startswith(RESERVED_ATTR_PREFIX)]
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
            self._check_new_name(name, ITEM_ARRAY)
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
            self._arrays.pop(name, None)  # an existing array: fresh metadata (another writer may have grown it)
            if self._has(name):
                arr = self._array(name)
            else:
                arr = self._arrays[name] = create_cell_array(
                    self._zgroup, name, role=ITEM_ARRAY, dims=ITEM_ARRAY_DIMS, shape=(len(self._checkpoints), n),
                    cell_dims=ITEM_ARRAY_CELL_DIMS, dtype=str if is_str else "float32",
                    fill_value="" if is_str else np.nan, attributes={VALUE_KIND: value_kind},
                )
            if arr.attrs.get(VALUE_KIND) != value_kind:
                raise StoreMismatchError(
                    f"{self._where()}: item array {name!r} holds {arr.attrs.get(VALUE_KIND)} values, got {value_kind}"
                )
        cells = {name: self._cells(name) for name in prepared}
        write_cells([(cells[name], {"checkpoint": ci}, v) for name, v in prepared.items()])
        for ca in cells.values():
            self._remember_marker(ca)
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
        self._check_new_name(name, DERIVED)
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
            elif d not in GROUP_DIMS and d not in extra and not kind_schema.coord_written(self._dir, d):
                self._ensure_coord(d, list(range(size)))  # completes a default coordinate left unwritten
            shape.append(int(size))
        if self._has(name):
            arr = self._array(name)
            have_dims = dims_of(arr)
            if have_dims != dims or tuple(int(s) for s in arr.shape) != tuple(shape):
                raise StoreMismatchError(
                    f"{self._where()}: derived {name!r} exists with dims {have_dims} shape {arr.shape}, "
                    f"got dims {dims} shape {tuple(shape)}"
                )
        else:
            cell = tuple(cell_dims) if cell_dims is not None else default_cell_dims(dims)
            if any(d not in dims for d in cell):
                raise StoreError(f"{self._where()}: cell_dims {cell} not all in dims {dims}")
            cell = tuple(d for d in dims if d in cell)  # keep dims order
            self._arrays[name] = create_cell_array(
                self._zgroup, name, role=DERIVED, dims=dims, shape=shape, cell_dims=cell, dtype=dtype,
                fill_value=np.nan if np.dtype(dtype).kind == "f" else -1,  # integers: -1 (masked on read anyway)
            )
        pos = {d: self._coord_positions(d, [lab])[0] for d, lab in index.items()}
        self._write_cells(name, pos, data)
        self._merge_attrs(name, attrs)

    def _ensure_coord(self, dim: str, values: Sequence[Any]) -> None:
        """Coordinate ``dim`` with ``values`` (see :func:`kind_schema.ensure_coord`)."""
        self._arrays[dim] = kind_schema.ensure_coord(self._zgroup, self._dir, dim, values, self._where())

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
            return xr.open_zarr(self._store_path, group=self.kind, consolidated=False, zarr_format=3)

    def __repr__(self) -> str:
        return (
            f"KindGroup({self.kind!r}, checkpoints={len(self._checkpoints)}, layers={len(self._layers)}, "
            f"items={self.n_items}, hidden={self.hidden})"
        )


def _as_list(x: Any) -> list[Any]:
    if isinstance(x, (str, int, np.integer)):
        return [x]
    return list(x)


__all__ = ["ITEM_COLUMNS", "KindGroup"]
