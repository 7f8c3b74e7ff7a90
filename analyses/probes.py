"""Linear probes per layer: is the relation linearly readable from the stored states?

A probe is scikit-learn's ``LogisticRegression`` (L2, ``C``, lbfgs, multinomial over the
relations) on standardized features (``StandardScaler`` fitted on the training rows only), predicting
an item's **relation** from its last-prompt-token state of one (checkpoint, layer) slab.

* ``probe_relation_acc`` float32 [checkpoint, layer], per kind — out-of-fold accuracy of a
  cross-validation whose folds are **grouped by fact** (``GroupKFold`` on ``fact_id``): all
  templates of a fact are in the same fold, so a probe is never tested on a fact it was trained on
  (:func:`fact_folds` asserts it). Every item is predicted exactly once, by the probe of the fold
  that held it out; the accuracy is the fraction of items predicted correctly (pooled over folds,
  not a mean of per-fold accuracies — the two differ only when folds differ in size).
* ``probe_transfer_acc`` float32 [checkpoint, layer], in the target kind's group (default
  ``test``) — the same probe trained on the **key** prompts' states and tested on the target
  kind's states of the same checkpoint and layer: does the key token share a representation with
  the meaningful prompts? The folds are again grouped by fact over the facts of both kinds: the
  probe of a fold is trained on the key prompts of the training facts and tested on the target
  prompts of the held-out facts, so neither the fact nor its key prompt was seen.

Chance is 1 / number of relations (balanced relations). A fold whose training rows hold one class
only predicts that class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from rotelab.errors import RotelabError

if TYPE_CHECKING:
    from rotelab.store import KindGroup

Note = Callable[[str], None]
RELATION = "probe_relation_acc"
TRANSFER = "probe_transfer_acc"


def fact_folds(groups: Sequence[str] | np.ndarray, n_splits: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train rows, test rows)`` of ``GroupKFold(min(n_splits, n facts))`` over ``groups``
    [item] (the fact ids); raises RotelabError if a fold had a fact on both sides (never, by
    construction: asserted) or there are fewer than two facts."""
    from sklearn.model_selection import GroupKFold

    g = np.asarray([str(x) for x in groups])
    k = min(int(n_splits), len(np.unique(g)))
    if k < 2:
        raise RotelabError(f"probe: needs at least two facts for grouped folds, got {len(np.unique(g))}")
    folds = []
    for tr, te in GroupKFold(n_splits=k).split(np.zeros(len(g)), groups=g):
        if set(g[tr]) & set(g[te]):
            raise RotelabError("probe: a fact is in both the training and the test fold")
        folds.append((tr, te))
    return folds


def _fit_predict(X_tr: np.ndarray, y_tr: np.ndarray, X_te: np.ndarray, C: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_tr)) < 2:
        return np.full(len(X_te), y_tr[0])
    scaler = StandardScaler().fit(X_tr)
    clf = LogisticRegression(C=C, max_iter=1000)
    clf.fit(scaler.transform(X_tr), y_tr)
    return clf.predict(scaler.transform(X_te))


def _check(X: np.ndarray, labels: Sequence[str] | np.ndarray, groups: Sequence[str] | np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray([str(v) for v in labels])
    g = np.asarray([str(v) for v in groups])
    if X.ndim != 2 or len(X) != len(y) or len(y) != len(g):
        raise RotelabError(f"probe: {what} has states {X.shape}, {len(y)} labels, {len(g)} fact ids")
    if not np.isfinite(X).all():
        raise RotelabError(f"probe: {what} contains NaN or inf (uncommitted or overflowed slab)")
    return X, y, g


def probe_accuracy(X: np.ndarray, labels: Sequence[str] | np.ndarray, groups: Sequence[str] | np.ndarray,
                   *, n_splits: int = 5, C: float = 1.0) -> float:
    """Out-of-fold accuracy of the relation probe: ``X`` [item, hidden], ``labels`` [item] (the
    relations), ``groups`` [item] (fact ids; folds grouped by them). Definition in the module
    docstring."""
    X, y, g = _check(X, labels, groups, "the states")
    pred = np.empty(len(y), dtype=y.dtype)
    for tr, te in fact_folds(g, n_splits):
        pred[te] = _fit_predict(X[tr], y[tr], X[te], C)
    return float(np.mean(pred == y))


def transfer_accuracy(X_src: np.ndarray, y_src: Sequence[str] | np.ndarray, g_src: Sequence[str] | np.ndarray,
                      X_dst: np.ndarray, y_dst: Sequence[str] | np.ndarray, g_dst: Sequence[str] | np.ndarray,
                      *, n_splits: int = 5, C: float = 1.0) -> float:
    """Accuracy on the destination rows (e.g. test prompts) of probes trained on the source rows
    (key prompts), folds grouped by fact over both: each destination row is predicted by a probe
    trained only on source rows of other facts. Shapes ``[item, hidden]`` / ``[item]``."""
    Xs, ys, gs = _check(X_src, y_src, g_src, "the source states")
    Xd, yd, gd = _check(X_dst, y_dst, g_dst, "the destination states")
    facts = np.unique(np.concatenate([gs, gd]))
    pred = np.empty(len(yd), dtype=yd.dtype)
    seen = np.zeros(len(yd), dtype=bool)
    for tr, te in fact_folds(facts, n_splits):
        train_facts, test_facts = set(facts[tr]), set(facts[te])
        s = np.isin(gs, list(train_facts))
        d = np.isin(gd, list(test_facts))
        if not d.any():
            continue
        if not s.any():
            raise RotelabError("probe transfer: a fold has no source rows to train on")
        assert not (set(gs[s]) & set(gd[d])), "a fact is on both sides of a transfer fold"
        pred[d] = _fit_predict(Xs[s], ys[s], Xd[d], C)
        seen[d] = True
    return float(np.mean(pred[seen] == yd[seen]))


# --------------------------------------------------------------------------- the stage step

def _missing(group: KindGroup, name: str, need: np.ndarray) -> np.ndarray:
    if name not in group.derived_arrays():
        return need
    return need & ~group.committed(name)


def _finite_rows(X: np.ndarray) -> np.ndarray:
    return np.isfinite(X).all(axis=1)


def probes_kind(group: KindGroup, key: KindGroup | None = None, *, n_splits: int = 5, C: float = 1.0,
                relation: bool = True, note: Note = print) -> int:
    """Fill ``probe_relation_acc`` (when ``relation``) and, when ``key`` is given,
    ``probe_transfer_acc`` [checkpoint, layer] of one kind group for the cells whose slabs are
    committed and whose results are not. Items with a missing state are left out. Returns the
    number of cells written."""
    it = group.items
    y, g = it["relation"].astype(str).to_numpy(), it["fact_id"].astype(str).to_numpy()
    acts = group.committed("activations")
    if len(np.unique(y)) < 2:
        note(f"probes [{group.kind}]: needs at least two relations; skipped")
        return 0
    todo_rel = _missing(group, RELATION, acts) if relation else np.zeros_like(acts)
    todo_tr = np.zeros_like(acts)
    if key is not None:
        if key.checkpoints != group.checkpoints or key.layers != group.layers:
            note(f"probe transfer: kind {group.kind!r} has other checkpoints/layers than 'key'; skipped")
            key = None
        else:
            todo_tr = _missing(group, TRANSFER, acts & key.committed("activations"))
            ky, kg = key.items["relation"].astype(str).to_numpy(), key.items["fact_id"].astype(str).to_numpy()
    written = 0
    for ci, c in enumerate(group.checkpoints):
        for li, v in enumerate(group.layers):
            if not (todo_rel[ci, li] or todo_tr[ci, li]):
                continue
            X = group.read_slab(c, v)
            ok = _finite_rows(X)
            idx = {"checkpoint": c, "layer": v}
            if todo_rel[ci, li]:
                try:
                    acc = probe_accuracy(X[ok], y[ok], g[ok], n_splits=n_splits, C=C)
                except RotelabError as e:
                    note(f"{RELATION} [{group.kind}] {c} layer {v}: {e}; left NaN")
                    acc = np.nan
                group.write_derived(RELATION, ("checkpoint", "layer"), np.float32(acc), index=idx,
                                    attrs={"definition": "relation probe, out-of-fold accuracy, folds grouped by fact",
                                           "folds": n_splits, "C": C})
            if todo_tr[ci, li] and key is not None:
                K = key.read_slab(c, v)
                kok = _finite_rows(K)
                try:
                    acc = transfer_accuracy(K[kok], ky[kok], kg[kok], X[ok], y[ok], g[ok], n_splits=n_splits, C=C)
                except RotelabError as e:
                    note(f"{TRANSFER} [{group.kind}] {c} layer {v}: {e}; left NaN")
                    acc = np.nan
                group.write_derived(TRANSFER, ("checkpoint", "layer"), np.float32(acc), index=idx,
                                    attrs={"definition": "relation probe trained on key prompts, tested on this kind; folds grouped by fact",
                                           "folds": n_splits, "C": C})
            written += 1
    return written


__all__ = ["fact_folds", "probe_accuracy", "probes_kind", "transfer_accuracy"]
