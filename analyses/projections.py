"""2-D projections of hidden states (Appendix F.2): StandardScaler + PCA, and UMAP.

Pure functions first (``fit_projection`` / ``project``), then the store driver
:func:`project_kinds` that writes, per kind group, the derived arrays ``proj_pca`` / ``proj_umap``
float32 [checkpoint, layer, item, component] (component = 0, 1), and for several kinds fitted in
one space ``proj_pca_joint`` / ``proj_umap_joint`` in each of those kinds' groups.

``fit_on``: ``"per-slab"`` fits each (checkpoint, layer) slab on its own; a checkpoint id fits on
that checkpoint's slab of the same layer and applies the fit to every checkpoint, so movement
across training is visible in one frame. The choice is recorded in the array's attributes; a
different choice recomputes the array.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from rotelab.errors import RotelabError

Method = Literal["pca", "umap"]


class Projection:
    """A fitted 2-D projection: ``transform(X [n, hidden]) -> [n, 2]``."""

    def __init__(self, method: Method, scaler: Any, model: Any):
        self.method, self.scaler, self.model = method, scaler, model

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = _check(X)
        return np.asarray(self.model.transform(self.scaler.transform(X)), dtype=np.float32)

    @property
    def explained_variance_ratio(self) -> list[float] | None:
        r = getattr(self.model, "explained_variance_ratio_", None)
        return None if r is None else [float(x) for x in r]


def _check(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise RotelabError(f"projection: expected [item, hidden], got shape {X.shape}")
    if not np.isfinite(X).all():
        raise RotelabError("projection: activations contain NaN or inf (uncommitted or overflowed slab)")
    if len(X) < 3:
        raise RotelabError(f"projection: needs at least 3 items, got {len(X)}")
    return X


def fit_projection(X: np.ndarray, method: Method = "pca", seed: int = 0) -> Projection:
    """Fit StandardScaler + PCA(2) (``pca``) or StandardScaler + UMAP(2) (``umap``, seeded) on
    ``X`` [item, hidden]."""
    from sklearn.preprocessing import StandardScaler

    X = _check(X)
    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X)
    if method == "pca":
        import warnings

        from sklearn.decomposition import PCA

        with warnings.catch_warnings():  # identical rows (e.g. key tokens at layer 0): zero variance, all-zero projection
            warnings.simplefilter("ignore", RuntimeWarning)
            model = PCA(n_components=2, random_state=seed).fit(Z)
    elif method == "umap":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap

            model = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(X) - 1)).fit(Z)
    else:
        raise RotelabError(f"unknown projection {method!r} (pca, umap)")
    return Projection(method, scaler, model)


def project(X: np.ndarray, method: Method = "pca", seed: int = 0) -> np.ndarray:
    """Fit on ``X`` [item, hidden] and project it → float32 [item, 2]."""
    p = fit_projection(X, method, seed)
    if method == "umap":
        return np.asarray(p.model.embedding_, dtype=np.float32)
    return p.transform(X)


def project_slabs(
    slabs: Sequence[np.ndarray],
    method: Method = "pca",
    seed: int = 0,
    reference: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Project several slabs that share one space: fit on their concatenation (or on
    ``reference`` [n, hidden] when given) → one float32 [n_i, 2] per slab."""
    if reference is None:
        cat = np.concatenate([np.asarray(s) for s in slabs], axis=0)
        out = project(cat, method, seed)
    else:
        p = fit_projection(reference, method, seed)
        out = np.concatenate([p.transform(np.asarray(s)) for s in slabs], axis=0)
    bounds = np.cumsum([0] + [len(s) for s in slabs])
    return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def project_kinds(
    store: Any,
    kinds: Sequence[str],
    method: Method = "pca",
    *,
    name: str | None = None,
    fit_on: str = "per-slab",
    layers: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    note: Callable[[str], None] = print,
) -> int:
    """Write projections of ``kinds`` (one kind: its own space; several: one joint space) for every
    (checkpoint, layer) whose activations are committed in all of them.

    ``name`` defaults to ``proj_<method>`` for one kind and ``proj_<method>_joint`` for several.
    Cells already committed with the same settings are skipped. Returns the number of cells written.
    """
    from tqdm.auto import tqdm

    groups = [store.kind(k) for k in kinds]
    name = name or (f"proj_{method}" if len(kinds) == 1 else f"proj_{method}_joint")
    g0 = groups[0]
    for g in groups[1:]:
        if g.checkpoints != g0.checkpoints or g.layers != g0.layers:
            raise RotelabError(f"joint projection: kinds {kinds[0]!r} and {g.kind!r} have different checkpoints or layers")
    settings = {"method": method, "fit_on": fit_on, "kinds": list(kinds), "seed": seed}
    if fit_on != "per-slab" and fit_on not in g0.checkpoints:
        raise RotelabError(f"projection fit_on={fit_on!r}: not 'per-slab' and not a checkpoint id ({', '.join(g0.checkpoints)})")
    lays = list(g0.layers) if layers is None else [int(v) for v in layers]
    for v in lays:
        if v not in g0.layers:
            raise RotelabError(f"projection: layer {v} out of range (layers {g0.layers[0]}..{g0.layers[-1]})")
    masks = [g.committed("activations") for g in groups]
    ready = np.logical_and.reduce(masks)
    done = []
    for g in groups:
        if name in g.derived_arrays():
            attrs = g.array_attrs(name)
            same = {k: attrs.get(k) for k in settings} == settings
            done.append(g.committed(name) if same else np.zeros_like(ready))
        else:
            done.append(np.zeros_like(ready))
    todo_cells = [
        (ci, c, v)
        for ci, c in enumerate(g0.checkpoints)
        for v in lays
        if ready[ci, g0.layers.index(v)] and not all(d[ci, g0.layers.index(v)] for d in done)
    ]
    if fit_on != "per-slab":
        ri = g0.checkpoints.index(fit_on)
        missing = sorted({v for _, _, v in todo_cells if not ready[ri, g0.layers.index(v)]})
        if missing:
            note(f"{name} ({', '.join(kinds)}): reference checkpoint {fit_on!r} not captured at layers {missing}; skipped")
            todo_cells = [t for t in todo_cells if t[2] not in missing]
    fits: dict[int, Projection] = {}
    written = 0
    for ci, c, v in tqdm(todo_cells, desc=f"{name} [{','.join(kinds)}]", disable=not progress or not todo_cells):
        slabs = [g.read_slab(c, v) for g in groups]
        try:
            if fit_on == "per-slab":
                outs = project_slabs(slabs, method, seed)
            else:
                if v not in fits:
                    ref = np.concatenate([g.read_slab(fit_on, v) for g in groups], axis=0)
                    fits[v] = fit_projection(ref, method, seed)
                outs = [fits[v].transform(s) for s in slabs]
        except RotelabError as e:
            note(f"{name} ({c}, layer {v}): {e}; left empty")
            continue
        for g, out in zip(groups, outs):
            g.write_derived(
                name, ("checkpoint", "layer", "item", "component"), out,
                index={"checkpoint": c, "layer": v}, extra_coords={"component": [0, 1]}, attrs=settings,
            )
        written += 1
    return written


__all__ = ["Projection", "fit_projection", "project", "project_kinds", "project_slabs"]
