"""Small zarr helpers shared by the store modules: create-or-open, dims, string arrays, JSON."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import zarr
import zarr.errors

from .layout import CHUNK_KEY_ENCODING

STR_DTYPE = np.dtypes.StringDType()

EXISTS_ERRORS = (
    zarr.errors.ContainsArrayError,
    zarr.errors.ContainsGroupError,
    zarr.errors.ContainsArrayAndGroupError,
    FileExistsError,
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence zarr's warnings about stray ``*.partial`` files (left by a killed writer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        yield


def create_or_open_array(
    group: zarr.Group,
    name: str,
    *,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int],
    fill_value: Any,
    dims: Sequence[str],
    attributes: dict[str, Any],
) -> zarr.Array:
    """Create array ``name`` in ``group`` unless it exists (then open it). Race tolerant: two
    processes creating the same array both end with the same array (same metadata)."""
    try:
        return group[name]  # type: ignore[return-value]
    except KeyError:
        pass
    try:
        return group.create_array(
            name,
            shape=tuple(int(s) for s in shape),
            dtype=dtype,
            chunks=tuple(max(1, int(c)) for c in chunks),
            fill_value=fill_value,
            dimension_names=list(dims),
            attributes=attributes,
            compressors=None,
            chunk_key_encoding=CHUNK_KEY_ENCODING,  # type: ignore[arg-type]
            overwrite=False,
        )
    except EXISTS_ERRORS:
        return group[name]  # type: ignore[return-value]


def dims_of(arr: zarr.Array) -> tuple[str, ...]:
    names = arr.metadata.dimension_names  # type: ignore[union-attr]
    return tuple(str(n) for n in names) if names is not None else ()


def is_str_array(arr: zarr.Array) -> bool:
    return np.dtype(arr.dtype).kind in "TUSO"


def to_str_array(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """1-D/N-D array of Python-str-like values as numpy StringDType (None/NaN -> "")."""
    a = np.asarray(values, dtype=object)
    flat = ["" if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in a.ravel()]
    return np.array(flat, dtype=STR_DTYPE).reshape(a.shape)


def jsonable(obj: Any) -> Any:
    """A JSON round trip of ``obj`` (numpy scalars/arrays become plain values)."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.loads(json.dumps(obj, default=default))
