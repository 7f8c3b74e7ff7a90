"""Making a kind group's structure: the item table, the coordinates, the activation arrays, and
growing the checkpoint series. :meth:`KindGroup.ensure` is the entry point; this module only knows
zarr groups and the layout (:mod:`rotelab.store.layout`).

Creation is resumable: the group is made with ``rotelab_kind_pending`` and only gets
``rotelab_kind`` (what readers look for) once its coordinates and item table are written; a later
call completes a group a killed writer left half made. Coordinates are written before any array
that uses them, so such an array never sees an unwritten one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from .cells import create_cell_array
from .errors import StoreError, StoreMismatchError
from .layout import (
    ACTIVATIONS_SPEC,
    CHECKPOINT,
    CHECKPOINT_COORD_CHUNK,
    COORD,
    FINAL_NORM_SPEC,
    INT_ITEM_COLUMNS,
    ITEM,
    ITEM_COLUMNS,
    ITEM_COLUMNS_ATTR,
    ITEM_TABLE,
    KIND_ATTR,
    KIND_PENDING_ATTR,
    LAYER,
    ROLE,
    check_name,
)
from .zarrutil import EXISTS_ERRORS, STR_DTYPE, create_or_open_array, dims_of, quiet, to_str_array


def normalize_items(items: pd.DataFrame, where: str) -> dict[str, np.ndarray]:
    """The item table as column arrays (ints int64, strings StringDType, extra columns kept)."""
    missing = [c for c in ITEM_COLUMNS if c not in items.columns]
    if missing:
        raise StoreError(f"{where}: item table lacks columns {missing}")
    cols: dict[str, np.ndarray] = {}
    names = list(ITEM_COLUMNS) + [str(c) for c in items.columns if c not in ITEM_COLUMNS]
    for c in names:
        s = items[c]
        if c in INT_ITEM_COLUMNS:
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


def equal_columns(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "TUSO" or b.dtype.kind in "TUSO":
        return [str(x) for x in a.tolist()] == [str(x) for x in b.tolist()]
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def ensure_kind_group(
    root: zarr.Group,
    store_path: Path,
    kind: str,
    *,
    checkpoints: Sequence[str],
    layers: Sequence[int],
    items: pd.DataFrame,
    hidden: int | None,
) -> None:
    """Create group ``kind`` of ``root`` or check it against the arguments; append new checkpoint
    ids (see :meth:`Store.ensure_kind`). Raises StoreError / StoreMismatchError."""
    where = f"store {store_path}, kind {kind!r}"
    check_name(kind, "kind", where)
    cps = [str(c) for c in checkpoints]
    if not cps or any(not c for c in cps) or len(set(cps)) != len(cps):
        raise StoreError(f"{where}: checkpoint ids must be non-empty and unique")
    lays = [int(v) for v in layers]
    if not lays or len(set(lays)) != len(lays):
        raise StoreError(f"{where}: layers must be non-empty and unique")
    cols = normalize_items(items, where)
    n = len(cols["item"])
    if n == 0:
        raise StoreError(f"{where}: item table is empty")
    if hidden is not None and int(hidden) <= 0:
        raise StoreError(f"{where}: hidden must be positive")

    gdir = store_path / kind
    if not (gdir / "zarr.json").is_file():
        attrs = {
            KIND_PENDING_ATTR: kind,
            ITEM_COLUMNS_ATTR: list(cols),
            # CF convention: xarray makes the item table coordinates along `item`
            "coordinates": " ".join(c for c in cols if c != ITEM),
        }
        try:
            with quiet():
                root.create_group(kind, attributes=attrs)
        except EXISTS_ERRORS:
            pass
    with quiet():
        g: zarr.Group = root[kind]  # type: ignore[assignment]
    complete = g.attrs.get(KIND_ATTR) == kind
    if not complete and g.attrs.get(KIND_PENDING_ATTR) != kind:
        raise StoreError(f"{where}: group exists but is not a rotelab kind group")
    if [str(c) for c in g.attrs.get(ITEM_COLUMNS_ATTR, [])] != list(cols):
        raise StoreMismatchError(
            f"{where}: item table columns differ (stored {g.attrs.get(ITEM_COLUMNS_ATTR)}, given {list(cols)})"
        )
    _ensure_fixed(g, gdir, lays, cols, where)
    _ensure_checkpoints(g, cps, where)
    if not complete:  # the switch that makes the group visible to readers
        g.update_attributes({KIND_ATTR: kind})
    if hidden is not None:
        h = int(hidden)
        for spec, shape in ((ACTIVATIONS_SPEC, (len(cps), len(lays), n, h)), (FINAL_NORM_SPEC, (len(cps), n, h))):
            arr = create_cell_array(
                g, spec.role, role=spec.role, dims=spec.dims, shape=shape, cell_dims=spec.cell_dims,
                dtype=spec.dtype, fill_value=spec.fill_value,
            )
            if int(arr.shape[-1]) != h:
                raise StoreMismatchError(f"{where}: {spec.role} has hidden {arr.shape[-1]}, not {h}")


def _ensure_fixed(g: zarr.Group, gdir: Path, layers: list[int], cols: dict[str, np.ndarray], where: str) -> None:
    """Item table and layer / item coordinates: written once, then they must match."""
    fixed: dict[str, tuple[np.ndarray, str]] = {LAYER: (np.asarray(layers, dtype=np.int64), LAYER)}
    for c, v in cols.items():
        fixed[c] = (v, ITEM)
    for name, (values, dim) in fixed.items():
        is_str = values.dtype.kind in "TUSO"
        arr = create_or_open_array(
            g,
            name,
            shape=(len(values),),
            dtype=str if is_str else values.dtype,
            chunks=(len(values),),
            fill_value="" if is_str else (False if values.dtype.kind == "b" else 0),
            dims=[dim],
            attributes={ROLE: COORD if name in (LAYER, ITEM) else ITEM_TABLE},
        )
        if (gdir / name / "c" / "0").is_file():
            if not equal_columns(np.asarray(arr[:]), values):
                what = "layers" if name == LAYER else f"item table (column {name!r})"
                raise StoreMismatchError(f"{where}: {what} differs from the stored one")
        else:
            arr[:] = values


def stored_checkpoints(values: Any) -> list[str]:
    """Checkpoint ids of a ``checkpoint`` coordinate's values. A coordinate that was resized but
    not yet filled reads "" at the tail: those are not there yet."""
    ids = [str(x) for x in np.asarray(values).tolist()]
    return ids[: ids.index("")] if "" in ids else ids


def _ensure_checkpoints(g: zarr.Group, cps: list[str], where: str) -> None:
    """The checkpoint coordinate: written on creation, else the stored series must be a prefix of
    ``cps`` (new ids are appended and every array with a checkpoint dim grows)."""
    cp_arr = create_or_open_array(
        g,
        CHECKPOINT,
        shape=(len(cps),),
        dtype=str,
        chunks=(CHECKPOINT_COORD_CHUNK,),
        fill_value="",
        dims=[CHECKPOINT],
        attributes={ROLE: COORD},
    )
    stored = stored_checkpoints(cp_arr[:])
    if not stored:
        if cp_arr.shape[0] != len(cps):
            cp_arr.resize((len(cps),))
        cp_arr[:] = np.array(cps, dtype=STR_DTYPE)
    elif stored != cps:
        if cps[: len(stored)] != stored:
            k = next((i for i, (a, b) in enumerate(zip(stored, cps, strict=False)) if a != b), len(cps))
            raise StoreMismatchError(
                f"{where}: checkpoint series is not an extension of the stored one "
                f"(stored {len(stored)} ids, first difference at position {k})"
            )
        grow(g, len(cps))
        cp_arr = g[CHECKPOINT]  # type: ignore[assignment]
        cp_arr.resize((len(cps),))  # type: ignore[union-attr]
        cp_arr[:] = np.array(cps, dtype=STR_DTYPE)  # type: ignore[index]


def grow(g: zarr.Group, n_checkpoints: int) -> None:
    """Resize every array with a checkpoint dim (except the coordinate, done last by the caller)."""
    with quiet():
        arrays = list(g.arrays())
    for name, arr in arrays:
        if name == CHECKPOINT:
            continue
        dims = dims_of(arr)
        if CHECKPOINT in dims:
            ax = dims.index(CHECKPOINT)
            shape = list(arr.shape)
            if shape[ax] < n_checkpoints:
                shape[ax] = n_checkpoints
                arr.resize(tuple(shape))


def ensure_coord(g: zarr.Group, gdir: Path, dim: str, values: Sequence[Any], where: str) -> zarr.Array:
    """Create coordinate ``dim`` with ``values``, complete one a killed writer left without its
    values, or check an existing one (StoreMismatchError if its values differ)."""
    check_name(dim, "dim", where)
    v = np.asarray(values)
    is_str = v.dtype.kind in "TUSO"
    existed = (gdir / dim / "zarr.json").is_file()
    arr = create_or_open_array(
        g,
        dim,
        shape=(len(v),),
        dtype=str if is_str else v.dtype,
        chunks=(max(1, len(v)),),
        fill_value="" if is_str else 0,
        dims=[dim],
        attributes={ROLE: COORD},
    )
    if existed and coord_written(gdir, dim):
        have = np.asarray(arr[:]).tolist()
        if len(have) != len(v) or [str(x) for x in have] != [str(x) for x in v.tolist()]:
            raise StoreMismatchError(f"{where}: coordinate {dim!r} exists with different values")
        return arr
    if int(arr.shape[0]) != len(v):
        raise StoreMismatchError(f"{where}: coordinate {dim!r} exists with {arr.shape[0]} values, not {len(v)}")
    arr[:] = to_str_array(v) if is_str else v
    return arr


def coord_written(gdir: Path, dim: str) -> bool:
    """Whether the (one-chunk) coordinate ``dim`` has its values written."""
    return (gdir / dim / "c" / "0").is_file()
