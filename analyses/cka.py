"""CKA drift: how much a layer's representation of the same items changes between checkpoints.

Linear CKA (Kornblith et al. 2019, "Similarity of neural network representations revisited",
eq. 4) between two representations of the same n items, ``X`` [n, p] and ``Y`` [n, q]:

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)),   K = X Xᵀ, L = Y Yᵀ,
    HSIC(K, L) = tr(K H L H) / (n − 1)²,                     H = I − 11ᵀ / n.

With column-centred ``X̄ = H X``, ``Ȳ = H Y`` this is ``‖Ȳᵀ X̄‖²_F / (‖X̄ᵀ X̄‖_F · ‖Ȳᵀ Ȳ‖_F)``, computed
here in float64 through whichever of the [n, n] Gram matrices or the [p, q] cross-covariances is
smaller. CKA is 1 for identical inputs and invariant to orthogonal transforms and isotropic scaling
of either side (not to arbitrary invertible linear maps).

Stored per kind: ``cka_prev`` float32 [checkpoint, layer] — CKA between a checkpoint's slab and
its *previous* checkpoint's slab of the same layer (:func:`previous_checkpoints`: the preceding
checkpoint of the same series; phase 2 continues from its start checkpoint, a baseline series from
``base``; NaN for the first checkpoint) — and ``cka_base`` float32 [checkpoint, layer] against the
``base`` checkpoint (1 at base itself). Items whose state is missing in either slab are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from rotelab.errors import RotelabError

if TYPE_CHECKING:
    from rotelab.run import Run
    from rotelab.store import KindGroup

Note = Callable[[str], None]
DEFINITION = "linear CKA (Kornblith et al. 2019) over the kind's items, last prompt token"


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA of ``X`` [n, p] and ``Y`` [n, q] (module docstring). RotelabError for fewer than
    two rows, different row counts, non-finite values or a constant representation."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise RotelabError(f"CKA: need two [item, hidden] arrays with the same items, got {X.shape} and {Y.shape}")
    if len(X) < 2:
        raise RotelabError("CKA: needs at least two items")
    if not (np.isfinite(X).all() and np.isfinite(Y).all()):
        raise RotelabError("CKA: NaN or inf in the states")
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    n = len(X)
    if n <= max(X.shape[1], Y.shape[1]):
        K, L = X @ X.T, Y @ Y.T
        xy, xx, yy = float(np.sum(K * L)), float(np.sum(K * K)), float(np.sum(L * L))
    else:
        C = Y.T @ X
        xy = float(np.sum(C * C))
        xx = float(np.sum((X.T @ X) ** 2))
        yy = float(np.sum((Y.T @ Y) ** 2))
    if xx <= 0 or yy <= 0:
        raise RotelabError("CKA: a representation is constant over the items")
    return xy / np.sqrt(xx * yy)


def previous_checkpoints(run: Run, ids: Sequence[str]) -> dict[str, str | None]:
    """Checkpoint id → the checkpoint it was trained from, for the CKA drift: the preceding entry
    of its series in index order; the first phase-2 checkpoint follows ``phase2.start`` (``last``:
    the last phase-1 checkpoint); the first entry of another series (baselines) follows ``base``.
    Only ids in ``ids`` (the store's checkpoints) are returned or referred to."""
    entries = [e for e in run.checkpoints() if e.id in set(ids)]
    base = next((e.id for e in entries if e.phase == "base"), None)
    out: dict[str, str | None] = {}
    last_in: dict[str, str] = {}
    p1 = [e.id for e in entries if e.series == "main" and e.phase == "phase1"]
    start = run.config.phase2.start
    p2_from = (p1[-1] if p1 else base) if start == "last" else (start if start in ids else None)
    for e in entries:
        prev = last_in.get(e.series)
        if e.series == "main" and e.phase == "phase2" and prev is not None and not prev.startswith("p2"):
            prev = p2_from
        if prev is None and e.id != base:
            prev = base
        out[e.id] = prev
        last_in[e.series] = e.id
    return out


def _pair_cka(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    return linear_cka(a[ok], b[ok])


def cka_kind(run: Run, group: KindGroup, *, note: Note = print) -> int:
    """Fill ``cka_prev`` and ``cka_base`` [checkpoint, layer] of one kind group: a cell is computed
    and committed once both its slabs are committed (until then it stays uncommitted, reading NaN;
    an undefined CKA, e.g. a constant representation, is committed as NaN with a note). Returns
    the number of (checkpoint, layer) cells written (both arrays together)."""
    acts = group.committed("activations")
    cps, layers = group.checkpoints, group.layers
    pos = {c: i for i, c in enumerate(cps)}
    prev = previous_checkpoints(run, cps)
    base = next((e.id for e in run.checkpoints() if e.phase == "base" and e.id in pos), None)
    refs = {"cka_prev": prev, "cka_base": {c: base for c in cps}}
    done_of = {name: group.committed(name) if name in group.derived_arrays() else np.zeros_like(acts) for name in refs}
    written = 0
    cache: dict[tuple[str, int], np.ndarray] = {}

    def slab(c: str, v: int) -> np.ndarray:
        if (c, v) not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[(c, v)] = group.read_slab(c, v)
        return cache[(c, v)]

    for li, v in enumerate(layers):
        for ci, c in enumerate(cps):
            if not acts[ci, li]:
                continue
            wrote = False
            for name, ref in refs.items():
                done = done_of[name]
                r = ref.get(c)
                ready = r is not None and acts[pos[r], li]
                if done[ci, li] or not ready:
                    continue
                try:
                    val = np.float32(_pair_cka(slab(c, v), slab(r, v)))
                except RotelabError as e:
                    note(f"{name} [{group.kind}] {c} layer {v}: {e}; left NaN")
                    val = np.float32(np.nan)
                group.write_derived(name, ("checkpoint", "layer"), val, index={"checkpoint": c, "layer": v},
                                    attrs={"definition": DEFINITION, "reference": "previous checkpoint" if name == "cka_prev" else base})
                wrote = True
            written += wrote
    return written


__all__ = ["cka_kind", "linear_cka", "previous_checkpoints"]
