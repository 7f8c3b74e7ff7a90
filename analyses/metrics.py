"""Metric tables of a run for the analyses: per checkpoint × kind × split × metric means."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rotelab.facts import split_mask, split_names

from ._common import open_store

if TYPE_CHECKING:
    from rotelab.run import Run

#: Per-item metric arrays of the store that are averaged into the table.
METRICS = ("object_prob", "mc_correct", "mc_correct_norm", "mc_rank", "mc_mass", "gen_correct", "gen_prefix")
METRIC_LABELS = {"object_prob": "object probability", "mc_correct": "multiple-choice accuracy",
                 "gen_correct": "generation accuracy", "gen_prefix": "generation exact prefix",
                 "mc_correct_norm": "MC accuracy (length-normalized)", "object_logprob": "object log-probability",
                 "mc_rank": "rank of the object among the options", "mc_mass": "probability mass on the object"}


def metric_table(run: Run) -> pd.DataFrame:
    """Tidy metric means: ``checkpoint, phase, kind, split, metric, value`` — from
    :func:`rotelab.probe.metrics_table` when the probe provides it, else read from the store's
    per-item metric arrays (mean over the committed items of each split; ``all`` = every item)."""
    try:
        from rotelab.probe import metrics_table  # type: ignore[attr-defined]
    except ImportError:
        metrics_table = None
    if metrics_table is not None:
        return metrics_table(run)
    return metric_table_from_store(run)


def metric_table_from_store(run: Run) -> pd.DataFrame:
    """:func:`metric_table` read straight from the store's per-item arrays (:data:`METRICS`)."""
    st = open_store(run, "r")
    phase = {e.id: e.phase for e in run.checkpoints()}
    rows = []
    for k in st.kinds():
        g = st.kind(k)
        split = g.items["split"].astype(str).to_numpy()
        for m in g.item_arrays():
            if m not in METRICS:
                continue
            a = g.read_item_array(m)
            if a.dtype.kind not in "fiu":
                continue
            for ci, c in enumerate(g.checkpoints):
                if np.isnan(a[ci]).all():
                    continue
                for s in split_names(split):
                    sel = a[ci, split_mask(split, s)]
                    if not np.isfinite(sel).any():
                        continue
                    rows.append((c, phase.get(c, ""), k, s, m, float(np.nanmean(sel))))
    return pd.DataFrame(rows, columns=["checkpoint", "phase", "kind", "split", "metric", "value"])


__all__ = ["METRICS", "METRIC_LABELS", "metric_table", "metric_table_from_store"]
