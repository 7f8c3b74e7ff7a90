"""The store's on-disk layout in one place: attribute keys, array roles, names, dimension names,
chunking and the one name rule.

A store (``store.zarr``) is a zarr v3 group::

    zarr.json                   attributes rotelab_store (format), fingerprint
    <kind>/                     one group per prompt kind (an xarray Dataset, see kind_group.py)
    tables/<name>/              store-level tidy tables (see tables.py)

and a kind group holds (all arrays carry ``dimension_names``)::

    checkpoint   str   [checkpoint]        checkpoint ids in series order (coordinate)
    layer        int64 [layer]             (coordinate)
    item         int64 [item]              item ids (coordinate)
    fact_id relation text object split  str [item];  template_id int64 [item]   (item table)
    activations  float16 [checkpoint, layer, item, hidden]   chunk (1, 1, n_items, hidden)
    final_norm   float16 [checkpoint, item, hidden]          chunk (1, n_items, hidden)
    <metric>     float32 or str [checkpoint, item]           chunk (1, n_items)
    <derived>    float32 [dims...]                           chunk 1 along its cell dims
    <dim>        [dim]                                       coordinate of a derived array's own dim
    commit_<X>   uint8 [cell dims of X]                      commit markers (see cells.py)

A *cell* of a data array is one index along its *cell dims* (``[checkpoint, layer]`` for
activations, ``[checkpoint]`` for final norm and metrics); the array is chunked by 1 along them, so
a cell is whole chunks, and it is committed as a unit by its marker.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .errors import StoreError

# ---------------------------------------------------------------------------- attribute keys
STORE_ATTR = "rotelab_store"
"""Root attribute: the store format version."""
FINGERPRINT_ATTR = "fingerprint"
KIND_ATTR = "rotelab_kind"
"""Group attribute that makes a kind group visible to readers (set once its creation finished)."""
KIND_PENDING_ATTR = "rotelab_kind_pending"
"""Group attribute of a kind group whose creation has not finished (resumable)."""
ITEM_COLUMNS_ATTR = "item_columns"
ROLE = "rotelab_role"
"""Array attribute: one of :data:`ROLES`."""
CELL_DIMS = "rotelab_cell_dims"
"""Array attribute: dims along which the array is chunked by 1 and committed per cell."""
VALUE_KIND = "rotelab_value_kind"
"""Item array attribute: ``"float"`` or ``"str"``."""
MARKS = "rotelab_marks"
"""Marker array attribute: the data array it marks."""
RESERVED_ATTR_PREFIX = "rotelab_"
"""User attributes may not start with this."""

# ---------------------------------------------------------------------------- roles
COORD = "coord"
ITEM_TABLE = "item_table"
ACTIVATIONS = "activations"
FINAL_NORM = "final_norm"
ITEM_ARRAY = "item_array"
DERIVED = "derived"
MARKER = "marker"
ROLES = (COORD, ITEM_TABLE, ACTIVATIONS, FINAL_NORM, ITEM_ARRAY, DERIVED, MARKER)
DATA_ROLES = (ACTIVATIONS, FINAL_NORM, ITEM_ARRAY, DERIVED)
"""Roles of arrays that hold data committed per cell (each has a marker)."""

# ---------------------------------------------------------------------------- names and dims
TABLES = "tables"
"""The root group's folder of tables (not a kind)."""
MARKER_PREFIX = "commit_"
CHECKPOINT, LAYER, ITEM, HIDDEN = "checkpoint", "layer", "item", "hidden"
GROUP_DIMS: tuple[str, ...] = (CHECKPOINT, LAYER, ITEM, HIDDEN)
"""Dims a kind group knows the size of."""
ITEM_COLUMNS: tuple[str, ...] = ("item", "fact_id", "relation", "template_id", "text", "object", "split")
"""Columns every item table has, in this order."""
INT_ITEM_COLUMNS = frozenset({"item", "template_id"})
RESERVED: frozenset[str] = frozenset({*GROUP_DIMS, ACTIVATIONS, FINAL_NORM, TABLES})
"""Names that kinds, data arrays and extra dims cannot take."""
CHECKPOINT_COORD_CHUNK = 1024
"""Chunk length of the ``checkpoint`` coordinate (it grows when checkpoints are appended)."""
CHUNK_KEY_ENCODING = {"name": "default", "separator": "/"}
"""Pinned at creation, so the chunk file of cell ``(i, j)`` is ``<array>/c/i/j``."""


def marker_name(array: str) -> str:
    """Name of the marker array of data array ``array``."""
    return MARKER_PREFIX + array


def is_marker_name(name: str) -> bool:
    return name.startswith(MARKER_PREFIX)


def _well_formed(name: object) -> bool:
    return (
        isinstance(name, str)
        and bool(name)
        and "/" not in name
        and not name.startswith((".", "_"))
        and not is_marker_name(name)
    )


def valid_name(name: object, reserved: Collection[str] = RESERVED) -> bool:
    """The one name rule of the store (kinds, data arrays, extra dims, tables): a non-empty str
    without ``/``, not starting with ``.`` or ``_``, not a marker name, not in ``reserved``."""
    return _well_formed(name) and name not in reserved


def check_name(name: object, what: str, where: str, reserved: Collection[str] = RESERVED) -> None:
    """:func:`valid_name`, else StoreError ``"<where>: bad <what> name '<name>'"`` (or ``"... is
    reserved"``)."""
    if not _well_formed(name):
        raise StoreError(f"{where}: bad {what} name {name!r}")
    if name in reserved:
        raise StoreError(f"{where}: {what} name {name!r} is reserved")


# ---------------------------------------------------------------------------- array specs
@dataclass(frozen=True)
class CellArraySpec:
    """Shape rule of a data array committed per cell: its dims, cell dims, dtype and fill."""

    role: str
    dims: tuple[str, ...]
    cell_dims: tuple[str, ...]
    dtype: str
    fill_value: float | str | int

    def chunks(self, shape: Sequence[int]) -> tuple[int, ...]:
        return cell_chunks(self.dims, shape, self.cell_dims)


def cell_chunks(dims: Sequence[str], shape: Sequence[int], cell_dims: Sequence[str]) -> tuple[int, ...]:
    """Chunk shape of a cell-committed array: 1 along the cell dims, the full size elsewhere."""
    return tuple(1 if d in cell_dims else int(s) for d, s in zip(dims, shape, strict=True))


def default_cell_dims(dims: Sequence[str]) -> tuple[str, ...]:
    """Cell dims of a derived array unless given: those of checkpoint / layer it has, in order."""
    return tuple(d for d in dims if d in (CHECKPOINT, LAYER))


ACTIVATIONS_SPEC = CellArraySpec(ACTIVATIONS, (CHECKPOINT, LAYER, ITEM, HIDDEN), (CHECKPOINT, LAYER), "float16", float("nan"))
FINAL_NORM_SPEC = CellArraySpec(FINAL_NORM, (CHECKPOINT, ITEM, HIDDEN), (CHECKPOINT,), "float16", float("nan"))
ITEM_ARRAY_DIMS: tuple[str, ...] = (CHECKPOINT, ITEM)
ITEM_ARRAY_CELL_DIMS: tuple[str, ...] = (CHECKPOINT,)
