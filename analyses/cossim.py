"""ΔCosSim (paper Appendix F.3): how distinctly hidden states cluster by relation.

For each relation r, ``Sim_in(r)`` is the mean cosine similarity over all pairs of distinct items
of r (self-pairs excluded) and ``Sim_out(r)`` the mean cosine between items of r and all items of
the other relations; ``ΔCosSim = mean_r Sim_in(r) − mean_r Sim_out(r)``. It is computed on the raw
hidden states (not on a projection).

Vectorized without an [item, item] matrix: with unit vectors ``u_i`` and the relation sums
``S_r = Σ_{i∈r} u_i``, the sum over ordered within-pairs is ``‖S_r‖² − n_r`` and the sum over
cross pairs is ``S_r · (S − S_r)`` — O(item × hidden) time and memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rotelab.errors import RotelabError


def unit_rows(X: np.ndarray, what: str = "activations") -> np.ndarray:
    """Rows of ``X`` [n, hidden] scaled to unit length (float64); RotelabError on NaN/inf or a zero row."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise RotelabError(f"{what}: expected a 2-D [item, hidden] array, got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise RotelabError(f"{what}: {bad} of {len(X)} rows contain NaN or inf (uncommitted or overflowed slab)")
    norms = np.linalg.norm(X, axis=1)
    if (norms == 0).any():
        raise RotelabError(f"{what}: {int((norms == 0).sum())} rows are all zeros (cosine undefined)")
    return X / norms[:, None]


def relation_similarities(X: np.ndarray, relations: Sequence[str] | np.ndarray) -> pd.DataFrame:
    """Per relation: ``n``, ``sim_in`` and ``sim_out`` (definitions in the module docstring).

    ``X`` [item, hidden]; ``relations`` [item]. Needs at least two relations and two items in each.
    """
    rel = np.asarray([str(r) for r in relations])
    X = np.asarray(X)
    if X.ndim != 2 or len(rel) != X.shape[0]:
        raise RotelabError(f"ΔCosSim: {len(rel)} relation labels for activations of shape {X.shape}")
    names, inverse, counts = np.unique(rel, return_inverse=True, return_counts=True)
    if len(names) < 2:
        raise RotelabError(f"ΔCosSim needs at least two relations, got {len(names)} ({', '.join(names)})")
    if (counts < 2).any():
        raise RotelabError(f"ΔCosSim: relation {names[counts < 2][0]!r} has fewer than two items")
    U = unit_rows(X)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    S = np.add.reduceat(U[order], starts, axis=0)  # [relation, hidden] group sums (no BLAS, no [n, n])
    total = S.sum(axis=0)
    self_dots = np.bincount(inverse, weights=np.einsum("ij,ij->i", U, U), minlength=len(names))  # ≈ n_r
    SS = np.einsum("rh,rh->r", S, S)
    within = (SS - self_dots) / (counts * (counts - 1))
    between = (S @ total - SS) / (counts * (len(U) - counts))
    return pd.DataFrame({"relation": names, "n": counts, "sim_in": within, "sim_out": between})


def delta_cossim(X: np.ndarray, relations: Sequence[str] | np.ndarray) -> float:
    """ΔCosSim of one slab: ``X`` [item, hidden], ``relations`` [item] → float (Appendix F.3).

    RotelabError for fewer than two relations, a relation with one item, NaN/inf or zero rows.
    """
    t = relation_similarities(X, relations)
    return float(t["sim_in"].mean() - t["sim_out"].mean())


__all__ = ["delta_cossim", "relation_similarities", "unit_rows"]
