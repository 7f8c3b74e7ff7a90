"""Store-level tidy tables (not tied to one kind): joint projections, patching sweeps, ...

Layout::

    tables/<name>/              group; attribute "current" names the live version
    tables/<name>/<version>/    group: attributes columns, dtypes, index; arrays c0000, c0001, ...
                                (1-D, one per column) and n0000 ... (bool null masks, if any)

A write builds a complete new version, then switches ``current`` (one atomic file replace), then
removes the versions older than the one it replaced. Writers of one table take turns (an exclusive
``flock`` on the folder ``tables/<name>``, released by the kernel when a writer dies), so no writer
ever deletes a version another writer is still building. The version just
replaced is kept, so a reader that followed ``current`` a moment before the switch finishes its
read; a reader retries if a version vanishes under it all the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from .errors import StoreError
from .layout import TABLES, check_name
from .zarrutil import EXISTS_ERRORS, STR_DTYPE, jsonable, quiet, to_str_array


def _check_name(path: Path, name: str) -> None:
    check_name(name, "table", f"store {path}", reserved=())


def _require_group(parent: zarr.Group, name: str, attrs: dict[str, Any]) -> zarr.Group:
    with quiet():
        try:
            return parent[name]  # type: ignore[return-value]
        except KeyError:
            pass
        try:
            return parent.create_group(name, attributes=attrs)
        except EXISTS_ERRORS:
            return parent[name]  # type: ignore[return-value]


@contextlib.contextmanager
def _table_lock(root: zarr.Group, path: Path, name: str) -> Iterator[None]:
    """Exclusive lock of table ``name`` across processes (blocks until the other writer is done):
    a ``flock`` on the table's group folder, so the store holds no extra files."""
    troot = _require_group(root, TABLES, {"rotelab_tables": 1})
    _require_group(troot, name, {})
    fd = os.open(path / TABLES / name, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _encode(s: pd.Series) -> tuple[np.ndarray, str, np.ndarray | None]:
    """Column -> (values, kind, null mask or None)."""
    dt = s.dtype
    mask = np.asarray(s.isna(), dtype=bool)
    has_null = bool(mask.any())
    if isinstance(dt, np.dtype) and dt.kind == "b":
        return np.asarray(s, dtype=bool), "bool", None
    if isinstance(dt, np.dtype) and dt.kind in "iu":
        return np.asarray(s), "int", None
    if isinstance(dt, np.dtype) and dt.kind == "f":
        return np.asarray(s), "float", None
    if isinstance(dt, np.dtype) and dt.kind == "M":
        return np.asarray(s).view(np.int64), "datetime", (mask if has_null else None)
    if pd.api.types.is_bool_dtype(dt) and not has_null:
        return np.asarray(s, dtype=bool), "bool", None
    if pd.api.types.is_integer_dtype(dt):
        return np.asarray(s.astype("float64")), "int", (mask if has_null else None)
    if pd.api.types.is_float_dtype(dt):
        return np.asarray(s.astype("float64")), "float", (mask if has_null else None)
    values = to_str_array([None if m else v for v, m in zip(s.tolist(), mask.tolist(), strict=True)])
    return values, "str", (mask if has_null else None)


def _decode(values: np.ndarray, kind: str, dtype: str, mask: np.ndarray | None) -> pd.Series:
    if kind == "str":
        lst: list[Any] = [str(v) for v in values.tolist()]
        if mask is not None:
            lst = [None if m else v for v, m in zip(lst, mask.tolist(), strict=True)]
        try:
            return pd.Series(lst, dtype=dtype)
        except (TypeError, ValueError):
            return pd.Series(lst, dtype=object)
    if kind == "datetime":
        try:
            s = pd.Series(np.asarray(values, dtype=np.int64).view(dtype))
        except (TypeError, ValueError):
            s = pd.Series(pd.to_datetime(values))
        if mask is not None:
            s[mask] = pd.NaT
        return s
    s = pd.Series(values)
    if mask is not None:
        s = s.astype(object)
        s[mask] = None
    try:
        return s.astype(dtype)
    except (TypeError, ValueError):
        return s


def write_table(root: zarr.Group, path: Path, name: str, df: pd.DataFrame) -> None:
    """Store ``df`` as table ``name`` of the store at ``path`` (root group ``root``), replacing the
    previous version atomically."""
    _check_name(path, name)
    index_columns: list[str] = []
    index_names: list[Any] = []
    idx = df.index
    if not (isinstance(idx, pd.RangeIndex) and idx.start == 0 and idx.step == 1 and idx.name is None):
        index_names = list(idx.names)
        before = set(map(str, df.columns))
        df = df.reset_index()
        index_columns = [str(c) for c in df.columns if str(c) not in before][: len(index_names)]
    columns = [str(c) for c in df.columns]
    if len(set(columns)) != len(columns):
        raise StoreError(f"store {path}: table {name!r} has repeated column names")
    kinds, dtypes, has_mask = [], [], []
    encoded = []
    for c in df.columns:
        values, kind, mask = _encode(df[c])
        encoded.append((values, mask))
        kinds.append(kind)
        dtypes.append(str(df[c].dtype))
        has_mask.append(mask is not None)
    meta = jsonable(
        {
            "columns": columns,
            "kinds": kinds,
            "dtypes": dtypes,
            "masks": has_mask,
            "n_rows": len(df),
            "index_columns": index_columns,
            "index_names": index_names,
        }
    )
    with _table_lock(root, path, name):
        _write_version(root, path, name, encoded, meta)


def _write_version(root: zarr.Group, path: Path, name: str, encoded: list[tuple[np.ndarray, np.ndarray | None]], meta: dict[str, Any]) -> None:
    """Build a new version, switch ``current`` to it, remove the versions before the previous one
    (partial ones of killed writers included). Call with the table's lock held."""
    troot = _require_group(root, TABLES, {"rotelab_tables": 1})
    tgroup = _require_group(troot, name, {})
    version = f"v{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    previous = _current(path, name)
    with quiet():
        vg = tgroup.create_group(version, attributes=meta)
        n = int(meta["n_rows"])
        for i, (values, mask) in enumerate(encoded):
            for prefix, v in (("c", values), ("n", mask)):
                if v is None:
                    continue
                is_str = v.dtype.kind in "TUSO"
                arr = vg.create_array(
                    f"{prefix}{i:04d}",
                    shape=(n,),
                    dtype=str if is_str else v.dtype,
                    chunks=(max(1, n),),
                    fill_value="" if is_str else (False if v.dtype.kind == "b" else 0),
                    dimension_names=["row"],
                    compressors="auto",
                )
                if n:
                    arr[:] = v.astype(STR_DTYPE) if is_str else v
    tgroup.update_attributes({"current": version})  # the switch: one atomic zarr.json replace
    tdir = path / TABLES / name
    for d in tdir.iterdir():
        if d.is_dir() and d.name.startswith("v") and d.name not in (version, previous):
            shutil.rmtree(d, ignore_errors=True)


def _current(path: Path, name: str) -> str | None:
    try:
        meta = json.loads((path / TABLES / name / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return None
    cur = (meta.get("attributes") or {}).get("current")
    return str(cur) if cur else None


def read_table(root: zarr.Group, path: Path, name: str) -> pd.DataFrame | None:
    """Table ``name`` of the store at ``path``, or None if there is none."""
    _check_name(path, name)
    last: Exception | None = None
    for _attempt in range(20):
        version = _current(path, name)
        if version is None:
            return None
        try:
            return _read_version(root, name, version)
        except Exception as e:  # replaced and removed while we read: follow the new pointer
            last = e
            time.sleep(0.05)
    raise StoreError(f"store {path}: table {name!r} is unreadable ({type(last).__name__})")


def _read_version(root: zarr.Group, name: str, version: str) -> pd.DataFrame:
    with quiet():
        vg = zarr.open_group(root.store, path=f"{TABLES}/{name}/{version}", mode="r")
        meta = dict(vg.attrs)
        data: dict[str, pd.Series] = {}
        n = int(meta["n_rows"])
        for i, (col, kind, dtype, has_mask) in enumerate(
            zip(meta["columns"], meta["kinds"], meta["dtypes"], meta["masks"], strict=True)
        ):
            values = np.asarray(vg[f"c{i:04d}"][:]) if n else np.zeros((0,))
            if kind == "str" and not n:
                values = np.zeros((0,), dtype=STR_DTYPE)
            mask = np.asarray(vg[f"n{i:04d}"][:], dtype=bool) if (has_mask and n) else None
            data[col] = _decode(values, kind, dtype, mask)
    df = pd.DataFrame(data, columns=list(meta["columns"]))
    if meta.get("index_columns"):
        df = df.set_index(list(meta["index_columns"]))
        df.index.names = meta["index_names"]
    return df


def list_tables(path: Path) -> list[str]:
    """Names of the tables of the store at ``path`` that have a current version."""
    tdir = path / TABLES
    if not tdir.is_dir():
        return []
    return sorted(d.name for d in tdir.iterdir() if d.is_dir() and _current(path, d.name) is not None)
