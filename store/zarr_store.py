"""The run's zarr store (``store.zarr``): one group per prompt kind plus store-level tables.

See DESIGN.md "Store layout". The root group's attributes record ``rotelab_store`` (format
version) and ``fingerprint`` (what the store was made for, e.g. model / tokenizer / dataset
hashes), written once at creation.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import zarr
from zarr.storage import LocalStore

from . import commits, tables
from ._zarr import CELL_DIMS, ROLE, STR_DTYPE, create_or_open_array, dims_of, quiet
from .errors import MissingDataError, StoreError, StoreMismatchError
from .kind_group import _CHECKPOINT_COORD_CHUNK, _RESERVED, KindGroup, _equal_columns, normalize_items

#: 2: the fingerprint covers everything the caller gives (format-1 stores recorded fewer keys).
STORE_FORMAT = 2


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            out = json.loads(f.read())
        return out if isinstance(out, dict) else None
    except (OSError, ValueError):
        return None


def _exclusive_write(path: Path, payload: bytes) -> bool:
    """Write ``payload`` to ``path`` atomically unless it exists; True if we wrote it."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    tmp.write_bytes(payload)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _replace_json(path: Path, obj: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``obj`` as JSON."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    tmp.write_bytes(json.dumps(obj, indent=2).encode())
    os.replace(tmp, path)


class Store:
    """A rotelab store. Open with :meth:`Store.open`.

    ``mode="a"`` creates the store if missing and allows writes; ``mode="r"`` never writes and
    can be used while other processes write (it sees only committed data).
    """

    def __init__(self, path: Path, mode: Literal["a", "r"], fingerprint: dict[str, str]) -> None:
        self._path = path
        self.mode = mode
        self._fingerprint = fingerprint
        self._zstore = LocalStore(path, read_only=(mode == "r"))
        with quiet():
            self._root: zarr.Group = zarr.open_group(self._zstore, mode="r" if mode == "r" else "r+", zarr_format=3)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        fingerprint: Mapping[str, str] | None = None,
        mode: Literal["a", "r"] = "a",
    ) -> Store:
        """Open (``mode="a"``: create if missing) the store at ``path``.

        ``fingerprint`` is recorded at creation; when given for an existing store it must equal
        the recorded one in every key (a key on one side only also differs), else
        :class:`StoreMismatchError`.
        """
        if mode not in ("a", "r"):
            raise StoreError(f"store {path}: mode must be 'a' or 'r', not {mode!r}")
        p = Path(path).expanduser().absolute()
        given = None if fingerprint is None else {str(k): str(v) for k, v in fingerprint.items()}
        meta_path = p / "zarr.json"
        if not meta_path.is_file():
            if mode == "r":
                raise MissingDataError(f"store {p}: no store here")
            if p.exists() and (not p.is_dir() or any(p.iterdir())):
                raise StoreError(f"store {p}: path exists and is not a zarr store")
            p.mkdir(parents=True, exist_ok=True)
            meta = {
                "zarr_format": 3,
                "node_type": "group",
                "attributes": {"rotelab_store": STORE_FORMAT, "fingerprint": given or {}},
            }
            _exclusive_write(meta_path, json.dumps(meta, indent=2).encode())
        meta = _read_json(meta_path)
        if meta is None or meta.get("node_type") != "group":
            raise StoreError(f"store {p}: zarr.json is unreadable or not a group")
        attrs = meta.get("attributes", {}) or {}
        if "rotelab_store" not in attrs:
            raise StoreError(f"store {p}: zarr group is not a rotelab store (no rotelab_store attribute)")
        stored = {str(k): str(v) for k, v in (attrs.get("fingerprint") or {}).items()}
        if given is not None and given != stored and attrs.get("rotelab_store") == 1 and stored:
            # a format-1 store recorded fewer keys: adopt it when all it recorded agrees, and (as a
            # writer) record the full fingerprint, so from now on it is checked like any other
            if all(given.get(k) == v for k, v in stored.items()):
                stored = {**stored, **given}
                if mode == "a":
                    meta["attributes"] = {**attrs, "rotelab_store": STORE_FORMAT, "fingerprint": stored}
                    _replace_json(meta_path, meta)
        if given is not None and given != stored:
            keys = sorted(k for k in set(given) | set(stored) if given.get(k) != stored.get(k))
            raise StoreMismatchError(
                f"store {p} was made for a different fingerprint (differs in: {', '.join(keys)}); "
                "use another store path or delete this one"
            )
        return cls(p, mode, stored)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def fingerprint(self) -> dict[str, str]:
        return dict(self._fingerprint)

    def _writable(self) -> None:
        if self.mode != "a":
            raise StoreError(f"store {self._path} is open read-only (mode 'r')")

    # ------------------------------------------------------------------ kinds

    def kinds(self) -> list[str]:
        """Kinds (groups) present, sorted."""
        out = []
        try:
            entries = sorted(os.scandir(self._path), key=lambda e: e.name)
        except OSError:
            return []
        for e in entries:
            if not e.is_dir() or e.name.startswith("."):
                continue
            if _kind_complete(_read_json(Path(e.path) / "zarr.json")):
                out.append(e.name)
        return out

    def has_kind(self, kind: str) -> bool:
        return kind in self.kinds()

    def kind(self, kind: str) -> KindGroup:
        """The group of ``kind``; MissingDataError if absent."""
        meta = _read_json(self._path / kind / "zarr.json") if _valid_kind_name(kind) else None
        if not _kind_complete(meta):
            raise MissingDataError(f"store {self._path}: no kind {kind!r} (kinds: {', '.join(self.kinds()) or 'none'})")
        return KindGroup(self, kind)

    def ensure_kind(
        self,
        kind: str,
        *,
        checkpoints: Sequence[str],
        layers: Sequence[int],
        items: pd.DataFrame,
        hidden: int | None = None,
    ) -> KindGroup:
        """Create group ``kind`` or check it against the arguments (see DESIGN "Store layout").

        An existing group must have the same item table and layers; its checkpoints must be a
        prefix of ``checkpoints`` — new ids are appended and every array with a checkpoint dim
        grows (new cells read NaN, uncommitted). Run growth from one process while no writer of
        this kind runs (writers may run before and after). With ``hidden``, ``activations``
        float16 [checkpoint, layer, item, hidden] and ``final_norm`` float16
        [checkpoint, item, hidden] are created if missing.
        """
        self._writable()
        where = f"store {self._path}, kind {kind!r}"
        if not _valid_kind_name(kind):
            raise StoreError(f"{where}: bad kind name")
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

        # Creation is resumable: the group is made with ``rotelab_kind_pending`` and only gets
        # ``rotelab_kind`` (what readers look for) once its coordinates and item table are written;
        # a later call completes a group a killed writer left half made.
        gdir = self._path / kind
        if not (gdir / "zarr.json").is_file():
            attrs = {
                "rotelab_kind_pending": kind,
                "item_columns": list(cols),
                # CF convention: xarray makes the item table coordinates along `item`
                "coordinates": " ".join(c for c in cols if c != "item"),
            }
            try:
                with quiet():
                    self._root.create_group(kind, attributes=attrs)
            except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileExistsError):
                pass
        with quiet():
            g: zarr.Group = self._root[kind]  # type: ignore[assignment]
        complete = g.attrs.get("rotelab_kind") == kind
        if not complete and g.attrs.get("rotelab_kind_pending") != kind:
            raise StoreError(f"{where}: group exists but is not a rotelab kind group")
        if [str(c) for c in g.attrs.get("item_columns", [])] != list(cols):
            raise StoreMismatchError(
                f"{where}: item table columns differ (stored {g.attrs.get('item_columns')}, given {list(cols)})"
            )

        # item table and layer / item coordinates: write once, then must match
        fixed: dict[str, tuple[np.ndarray, str]] = {"layer": (np.asarray(lays, dtype=np.int64), "layer")}
        for c, v in cols.items():
            fixed[c] = (v, "item")
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
                attributes={ROLE: "coord" if name in ("layer", "item") else "item_table"},
            )
            written = (gdir / name / "c" / "0").is_file()
            if written:
                stored = np.asarray(arr[:])
                if not _equal_columns(stored, values):
                    what = "layers" if name == "layer" else f"item table (column {name!r})"
                    raise StoreMismatchError(f"{where}: {what} differs from the stored one")
            else:
                arr[:] = values

        # checkpoint coordinate: prefix-extension
        cp_arr = create_or_open_array(
            g,
            "checkpoint",
            shape=(len(cps),),
            dtype=str,
            chunks=(_CHECKPOINT_COORD_CHUNK,),
            fill_value="",
            dims=["checkpoint"],
            attributes={ROLE: "coord"},
        )
        stored_cps = [str(x) for x in np.asarray(cp_arr[:]).tolist()]
        if "" in stored_cps:
            stored_cps = stored_cps[: stored_cps.index("")]
        if not stored_cps:
            if cp_arr.shape[0] != len(cps):
                cp_arr.resize((len(cps),))
            cp_arr[:] = np.array(cps, dtype=STR_DTYPE)
        elif stored_cps != cps:
            if cps[: len(stored_cps)] != stored_cps:
                k = next((i for i, (a, b) in enumerate(zip(stored_cps, cps, strict=False)) if a != b), len(cps))
                raise StoreMismatchError(
                    f"{where}: checkpoint series is not an extension of the stored one "
                    f"(stored {len(stored_cps)} ids, first difference at position {k})"
                )
            self._grow(g, len(cps))
            cp_arr = g["checkpoint"]  # type: ignore[assignment]
            cp_arr.resize((len(cps),))  # type: ignore[union-attr]
            cp_arr[:] = np.array(cps, dtype=STR_DTYPE)  # type: ignore[index]
        if not complete:  # the switch that makes the group visible to readers
            g.update_attributes({"rotelab_kind": kind})

        if hidden is not None:
            h = int(hidden)
            nc, nl = len(cps), len(lays)
            for name, dims, shape, cell in (
                ("activations", ["checkpoint", "layer", "item", "hidden"], (nc, nl, n, h), ["checkpoint", "layer"]),
                ("final_norm", ["checkpoint", "item", "hidden"], (nc, n, h), ["checkpoint"]),
            ):
                # the marker before its data array: an existing data array always has its marker
                create_or_open_array(
                    g,
                    commits.marker_name(name),
                    shape=shape[: len(cell)],
                    dtype="uint8",
                    chunks=tuple(1 for _ in cell),
                    fill_value=0,
                    dims=cell,
                    attributes={ROLE: "marker", "rotelab_marks": name},
                )
                arr = create_or_open_array(
                    g,
                    name,
                    shape=shape,
                    dtype="float16",
                    chunks=tuple(1 if d in cell else s for d, s in zip(dims, shape, strict=True)),
                    fill_value=np.nan,
                    dims=dims,
                    attributes={ROLE: name, CELL_DIMS: cell},
                )
                if int(arr.shape[-1]) != h:
                    raise StoreMismatchError(f"{where}: {name} has hidden {arr.shape[-1]}, not {h}")
        return KindGroup(self, kind)

    def _grow(self, g: zarr.Group, n_checkpoints: int) -> None:
        """Resize every array with a checkpoint dim (except the coordinate, done last)."""
        with quiet():
            arrays = list(g.arrays())
        for name, arr in arrays:
            if name == "checkpoint":
                continue
            dims = dims_of(arr)
            if "checkpoint" in dims:
                ax = dims.index("checkpoint")
                shape = list(arr.shape)
                if shape[ax] < n_checkpoints:
                    shape[ax] = n_checkpoints
                    arr.resize(tuple(shape))

    # ------------------------------------------------------------------ tables

    def write_table(self, name: str, df: pd.DataFrame) -> None:
        """Store ``df`` as table ``name`` (group ``tables/<name>``), replacing the previous one
        atomically: readers see the old or the new table, never a mix."""
        self._writable()
        tables.write_table(self, name, df)

    def read_table(self, name: str) -> pd.DataFrame | None:
        """Table ``name`` as written, or None if there is none."""
        return tables.read_table(self, name)

    def tables(self) -> list[str]:
        return tables.list_tables(self)

    # ------------------------------------------------------------------ housekeeping

    def remove_stale_partials(self, older_than_s: float = 3600.0) -> int:
        """Delete ``*.partial`` files (left by killed writers) older than ``older_than_s``.
        Returns how many were removed. Harmless for data: nothing ever reads them."""
        self._writable()
        now = time.time()
        n = 0
        for dirpath, _dirs, files in os.walk(self._path):
            for f in files:
                if f.endswith(".partial"):
                    fp = Path(dirpath) / f
                    try:
                        if now - fp.stat().st_mtime > older_than_s:
                            fp.unlink()
                            n += 1
                    except OSError:
                        pass
        return n

    def __repr__(self) -> str:
        return f"Store({str(self._path)!r}, mode={self.mode!r}, kinds={self.kinds()})"


def _kind_complete(meta: dict[str, Any] | None) -> bool:
    """Whether a group's metadata marks a kind group whose creation finished (see ensure_kind)."""
    return bool(meta and meta.get("node_type") == "group" and (meta.get("attributes") or {}).get("rotelab_kind"))


def _valid_kind_name(kind: str) -> bool:
    return (
        isinstance(kind, str)
        and bool(kind)
        and "/" not in kind
        and not kind.startswith((".", "_"))
        and kind not in _RESERVED
        and kind != "tables"
        and not commits.is_marker_name(kind)
    )

