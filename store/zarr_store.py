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

import pandas as pd
import zarr
from zarr.storage import LocalStore

from . import tables
from .errors import MissingDataError, StoreError, StoreMismatchError
from .kind_group import KindGroup
from .layout import FINGERPRINT_ATTR, KIND_ATTR, STORE_ATTR, valid_name
from .zarrutil import quiet

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
                "attributes": {STORE_ATTR: STORE_FORMAT, FINGERPRINT_ATTR: given or {}},
            }
            _exclusive_write(meta_path, json.dumps(meta, indent=2).encode())
        meta = _read_json(meta_path)
        if meta is None or meta.get("node_type") != "group":
            raise StoreError(f"store {p}: zarr.json is unreadable or not a group")
        attrs = meta.get("attributes", {}) or {}
        if STORE_ATTR not in attrs:
            raise StoreError(f"store {p}: zarr group is not a rotelab store (no rotelab_store attribute)")
        stored = {str(k): str(v) for k, v in (attrs.get(FINGERPRINT_ATTR) or {}).items()}
        if given is not None and given != stored and attrs.get(STORE_ATTR) == 1 and stored:
            # a format-1 store recorded fewer keys: adopt it when all it recorded agrees, and (as a
            # writer) record the full fingerprint, so from now on it is checked like any other
            if all(given.get(k) == v for k, v in stored.items()):
                stored = {**stored, **given}
                if mode == "a":
                    meta["attributes"] = {**attrs, STORE_ATTR: STORE_FORMAT, FINGERPRINT_ATTR: stored}
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

    @property
    def writable(self) -> bool:
        return self.mode == "a"

    def _writable(self) -> None:
        if not self.writable:
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
        meta = _read_json(self._path / kind / "zarr.json") if valid_name(kind) else None
        if not _kind_complete(meta):
            raise MissingDataError(f"store {self._path}: no kind {kind!r} (kinds: {', '.join(self.kinds()) or 'none'})")
        return KindGroup(self._root, self._path, kind, writable=self.writable)

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
        return KindGroup.ensure(
            self._root, self._path, kind, checkpoints=checkpoints, layers=layers, items=items, hidden=hidden
        )

    # ------------------------------------------------------------------ tables

    def write_table(self, name: str, df: pd.DataFrame) -> None:
        """Store ``df`` as table ``name`` (group ``tables/<name>``), replacing the previous one
        atomically: readers see the old or the new table, never a mix."""
        self._writable()
        tables.write_table(self._root, self._path, name, df)

    def read_table(self, name: str) -> pd.DataFrame | None:
        """Table ``name`` as written, or None if there is none."""
        return tables.read_table(self._root, self._path, name)

    def tables(self) -> list[str]:
        return tables.list_tables(self._path)

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
    return bool(meta and meta.get("node_type") == "group" and (meta.get("attributes") or {}).get(KIND_ATTR))

