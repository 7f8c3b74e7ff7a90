"""Generalization onset: per fact and kind, the first checkpoint from which generation is correct
and stays correct.

Definitions (the issue says "becomes correct (and stays correct)"; the precise rule is ours):

* A fact's **accuracy at a checkpoint** is the mean of ``gen_correct`` (greedy generation contains
  the object, see :mod:`rotelab.probe.accuracy_metrics`) over the fact's templates of the kind that
  were evaluated there. The fact is **correct** at that checkpoint when this accuracy is at least
  ``threshold`` (default 0.5: at least half of its templates — with one template, that template).
* The **onset** is the first checkpoint ``c`` of the ``main`` series (base → phase 1 → phase 2, in
  index order) at which the fact is correct *and* is correct at every later evaluated checkpoint of
  the series ("stays correct" = through the end of the series; a checkpoint where the fact was not
  evaluated neither breaks nor confirms it). A fact that is wrong at the last evaluated checkpoint
  has no onset (``never``). A fact correct from ``base`` on has onset ``base``.
* ``first_correct`` is the first checkpoint where the fact is correct at all (it may fall back
  later: ``first_correct`` earlier than ``onset`` means it did).

The store table ``onset`` has one row per (kind, fact): ``kind, fact_id, relation, split, onset``
(checkpoint id, "" for never), ``onset_index`` (position in the main series, -1 for never),
``onset_phase``, ``first_correct``, ``n_evaluated`` (checkpoints with a value) and ``final_acc``
(accuracy at the last evaluated checkpoint). Baseline series (SFT) are not part of the series.
It is recomputed from the stored ``gen_correct`` (no model: cheap) and written only when it changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rotelab.errors import RotelabError

if TYPE_CHECKING:
    from rotelab.run import Run
    from rotelab.store import Store

Note = Callable[[str], None]
ONSET_COLUMNS = ("kind", "fact_id", "relation", "split", "onset", "onset_index", "onset_phase", "first_correct",
                 "n_evaluated", "final_acc")


def onset_index(correct: np.ndarray) -> int:
    """``correct`` [checkpoint]: 1/0 (or True/False) per checkpoint, NaN where not evaluated →
    the index of the onset (first correct index from which every later evaluated value is
    correct), -1 if none (module docstring)."""
    a = np.asarray(correct, dtype=np.float64)
    onset = -1
    for i in range(len(a) - 1, -1, -1):  # walk back from the end while the evaluated values are correct
        if np.isnan(a[i]):
            continue
        if a[i] < 1:
            break
        onset = i
    return onset


def fact_accuracy(gen_correct: np.ndarray, fact_ids: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``gen_correct`` [checkpoint, item] (NaN = not evaluated), ``fact_ids`` [item] →
    ``(facts [fact], accuracy [checkpoint, fact])``: the mean over each fact's evaluated items,
    NaN where none of them was evaluated."""
    a = np.asarray(gen_correct, dtype=np.float64)
    f = np.asarray([str(x) for x in fact_ids])
    if a.ndim != 2 or a.shape[1] != len(f):
        raise RotelabError(f"onset: {len(f)} fact ids for gen_correct of shape {a.shape}")
    facts, inv = np.unique(f, return_inverse=True)
    ok = ~np.isnan(a)
    sums = np.zeros((a.shape[0], len(facts)))
    counts = np.zeros((a.shape[0], len(facts)))
    for j in range(len(facts)):
        m = inv == j
        sums[:, j] = np.where(ok[:, m], a[:, m], 0).sum(axis=1)
        counts[:, j] = ok[:, m].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return facts, acc


def onset_frame(gen_correct: np.ndarray, items: pd.DataFrame, checkpoints: Sequence[str], phases: Sequence[str],
                kind: str, *, threshold: float = 0.5) -> pd.DataFrame:
    """The ``onset`` rows of one kind: ``gen_correct`` [checkpoint, item] over the main series
    ``checkpoints`` (with their ``phases``), ``items`` the kind's item table."""
    if not 0 < threshold <= 1:
        raise RotelabError(f"onset: threshold must be in (0, 1], got {threshold}")
    facts, acc = fact_accuracy(gen_correct, items["fact_id"])
    meta = items.drop_duplicates("fact_id").set_index(items.drop_duplicates("fact_id")["fact_id"].astype(str))
    rows = []
    for j, f in enumerate(facts):
        col = acc[:, j]
        correct = np.where(np.isnan(col), np.nan, (col >= threshold).astype(np.float64))
        o = onset_index(correct)
        hits = np.flatnonzero(correct == 1)
        ev = np.flatnonzero(~np.isnan(col))
        rows.append((kind, f, str(meta.loc[f, "relation"]), str(meta.loc[f, "split"]),
                     checkpoints[o] if o >= 0 else "", o, phases[o] if o >= 0 else "",
                     checkpoints[hits[0]] if len(hits) else "", len(ev), float(col[ev[-1]]) if len(ev) else np.nan))
    return pd.DataFrame(rows, columns=list(ONSET_COLUMNS))


def onset_run(run: Run, store: Store, *, threshold: float = 0.5, note: Note = print) -> pd.DataFrame | None:
    """Compute the ``onset`` table from every kind's stored ``gen_correct`` over the main series;
    writes it when it differs from the stored one. Returns the table (None when nothing is
    evaluated)."""
    main = [e for e in run.checkpoints() if e.series == "main"]
    parts = []
    for k in store.kinds():
        g = store.kind(k)
        if "gen_correct" not in g.item_arrays():
            continue
        ids = [e.id for e in main if e.id in set(g.checkpoints)]
        if not ids:
            continue
        a = g.read_item_array("gen_correct", checkpoints=ids)
        if np.isnan(a).all():
            continue
        phases = [e.phase for e in main if e.id in set(ids)]
        parts.append(onset_frame(a, g.items, ids, phases, k, threshold=threshold))
    if not parts:
        note("onset: no gen_correct in the store (run `rotelab eval` first); skipped")
        return None
    table = pd.concat(parts, ignore_index=True)
    old = store.read_table("onset")
    if old is None or list(old.columns) != list(table.columns) or not old.astype(str).reset_index(drop=True).equals(table.astype(str)):
        store.write_table("onset", table)
    return table


__all__ = ["ONSET_COLUMNS", "fact_accuracy", "onset_frame", "onset_index", "onset_run"]
