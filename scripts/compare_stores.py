"""Compare two rotelab run stores array by array and table by table; exit 1 on any difference.

Usage::

    python scripts/compare_stores.py [--ignore-attr KEY]... RUN_OR_STORE_A RUN_OR_STORE_B

``--ignore-attr KEY`` leaves attribute ``KEY`` and ``KEY/…`` out at any depth, e.g.
``--ignore-attr probe_pass`` to compare a fused probe pass with separate eval and capture stages
(the attrs say which pass wrote each array; the values must not differ).

Each argument is a run directory (its ``store.zarr`` is used) or a ``store.zarr`` folder. Compared:

* every array of every group outside ``tables/`` (kind groups: activations, final norm, metrics,
  derived arrays, item table, coordinates, commit markers): data type, shape, and the values *bit
  for bit* (the raw bytes of numeric arrays, so NaN payloads and signed zeros count; string and
  object arrays element by element);
* every array's and group's attributes, except keys that hold times (any key containing ``time``,
  ``date``, ``created`` or ``timestamp``, at any nesting depth);
* every store table (``Store.read_table``: the live version; version folder names contain a
  timestamp, so tables are compared as data frames): columns, dtypes, and values (NaN equal to
  NaN, floats bit for bit).

Prints one line per difference and a summary line; exit status 0 when identical, 1 otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

_TIME_WORDS = ("time", "date", "created", "timestamp")


def _store_path(arg: str) -> Path:
    p = Path(arg)
    if (p / "store.zarr").is_dir():
        return p / "store.zarr"
    if (p / "zarr.json").is_file():
        return p
    raise SystemExit(f"compare_stores: {arg}: neither a run directory nor a store.zarr folder")


def _strip_times(obj: Any, ignore: Sequence[str] = ()) -> Any:
    """``obj`` without time keys and without the keys in ``ignore`` (a key ``k`` also drops
    ``k/<anything>``), at any nesting depth."""

    def dropped(k: object) -> bool:
        k = str(k)
        return any(w in k.lower() for w in _TIME_WORDS) or any(k == i or k.startswith(i + "/") for i in ignore)

    if isinstance(obj, dict):
        return {k: _strip_times(v, ignore) for k, v in obj.items() if not dropped(k)}
    if isinstance(obj, list):
        return [_strip_times(v, ignore) for v in obj]
    return obj


def _walk(group: zarr.Group, prefix: str = "") -> tuple[dict[str, zarr.Array], dict[str, zarr.Group]]:
    """All arrays and groups below ``group`` (outside ``tables/``), by path."""
    arrays: dict[str, zarr.Array] = {}
    groups: dict[str, zarr.Group] = {prefix or "/": group}
    for name, node in group.members():
        path = f"{prefix}/{name}" if prefix else name
        if not prefix and name == "tables":
            continue
        if isinstance(node, zarr.Array):
            arrays[path] = node
        else:
            a, g = _walk(node, path)
            arrays.update(a)
            groups.update(g)
    return arrays, groups


def _same_values(a: np.ndarray, b: np.ndarray) -> tuple[bool, str]:
    if a.dtype.kind in "biufc" and b.dtype.kind in "biufc":
        if np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes():
            return True, ""
        with np.errstate(invalid="ignore"):
            diff = a != b
            if a.dtype.kind in "fc":
                diff &= ~(np.isnan(a) & np.isnan(b))
        n = int(np.count_nonzero(diff))
        if n == 0:
            return False, "same values but different bits (NaN payload or signed zero)"
        bad = np.argwhere(diff)[0]
        extra = ""
        if a.dtype.kind in "fc":
            fin = diff & np.isfinite(a) & np.isfinite(b)
            if fin.any():
                extra = f", max |a-b| {float(np.max(np.abs(a[fin].astype(np.float64) - b[fin].astype(np.float64)))):.3g}"
        return False, f"{n} of {a.size} values differ (first at {tuple(int(i) for i in bad)}: {a[tuple(bad)]!r} vs {b[tuple(bad)]!r}{extra})"
    fa, fb = a.ravel().tolist(), b.ravel().tolist()
    bad = [i for i, (x, y) in enumerate(zip(fa, fb)) if not (x == y or (x != x and y != y))]
    if not bad:
        return True, ""
    return False, f"{len(bad)} of {len(fa)} values differ (first at flat index {bad[0]}: {fa[bad[0]]!r} vs {fb[bad[0]]!r})"


def _compare_frames(name: str, a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    out: list[str] = []
    if list(a.columns) != list(b.columns):
        return [f"table {name}: columns differ: {list(a.columns)} vs {list(b.columns)}"]
    if len(a) != len(b):
        return [f"table {name}: {len(a)} rows vs {len(b)} rows"]
    for c in a.columns:
        if str(a[c].dtype) != str(b[c].dtype):
            out.append(f"table {name}: column {c}: dtype {a[c].dtype} vs {b[c].dtype}")
            continue
        ok, why = _same_values(a[c].to_numpy(), b[c].to_numpy())
        if not ok:
            out.append(f"table {name}: column {c}: {why}")
    if list(a.index) != list(b.index):
        out.append(f"table {name}: index differs")
    return out


def compare(path_a: Path, path_b: Path, ignore_attrs: Sequence[str] = ()) -> tuple[list[str], int, int]:
    """``(differences, arrays compared, tables compared)``; attribute keys in ``ignore_attrs``
    (and ``key/…``) are not compared, at any depth (e.g. ``probe_pass``: which pass wrote a cell)."""
    from rotelab.store import Store

    ga, gb = zarr.open_group(path_a, mode="r"), zarr.open_group(path_b, mode="r")
    arrays_a, groups_a = _walk(ga)
    arrays_b, groups_b = _walk(gb)
    diffs: list[str] = []
    for p in sorted(set(groups_a) ^ set(groups_b)):
        diffs.append(f"group {p}: only in {'A' if p in groups_a else 'B'}")
    for p in sorted(set(groups_a) & set(groups_b)):
        if _strip_times(dict(groups_a[p].attrs), ignore_attrs) != _strip_times(dict(groups_b[p].attrs), ignore_attrs):
            diffs.append(f"group {p}: attributes differ")
    for p in sorted(set(arrays_a) ^ set(arrays_b)):
        diffs.append(f"array {p}: only in {'A' if p in arrays_a else 'B'}")
    common = sorted(set(arrays_a) & set(arrays_b))
    for p in common:
        a, b = arrays_a[p], arrays_b[p]
        if a.dtype != b.dtype:
            diffs.append(f"array {p}: dtype {a.dtype} vs {b.dtype}")
            continue
        if a.shape != b.shape:
            diffs.append(f"array {p}: shape {a.shape} vs {b.shape}")
            continue
        attrs_a, attrs_b = _strip_times(dict(a.attrs), ignore_attrs), _strip_times(dict(b.attrs), ignore_attrs)
        if attrs_a != attrs_b:
            keys = sorted(k for k in set(attrs_a) | set(attrs_b) if attrs_a.get(k) != attrs_b.get(k))
            diffs.append(f"array {p}: attributes differ: {', '.join(keys)}")
        ok, why = _same_values(a[...], b[...])
        if not ok:
            diffs.append(f"array {p}: {why}")
    tables = 0
    store_a, store_b = Store.open(path_a, mode="r"), Store.open(path_b, mode="r")
    names_a, names_b = set(store_a.tables()), set(store_b.tables())
    for n in sorted(names_a ^ names_b):
        diffs.append(f"table {n}: only in {'A' if n in names_a else 'B'}")
    for n in sorted(names_a & names_b):
        tables += 1
        diffs += _compare_frames(n, store_a.read_table(n), store_b.read_table(n))
    return diffs, len(common), tables


def main(argv: list[str]) -> int:
    ignore: list[str] = []
    args: list[str] = []
    it = iter(argv)
    for x in it:
        if x == "--ignore-attr":
            ignore.append(next(it, ""))
        else:
            args.append(x)
    if len(args) != 2 or "" in ignore:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: compare_stores.py [--ignore-attr KEY]... RUN_OR_STORE_A RUN_OR_STORE_B", file=sys.stderr)
        return 2
    a, b = _store_path(args[0]), _store_path(args[1])
    diffs, n_arrays, n_tables = compare(a, b, ignore)
    for d in diffs:
        print(d)
    if diffs:
        print(f"DIFFERENT: {len(diffs)} differences ({n_arrays} arrays and {n_tables} tables in both compared)")
        return 1
    print(f"IDENTICAL: {n_arrays} arrays and {n_tables} tables, values bit for bit, dtypes, shapes and attributes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
