"""Metric tables of a run for the analyses: per checkpoint × kind × split × metric means."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from rotelab.run import Run

METRIC_LABELS = {"object_prob": "object probability", "mc_correct": "multiple-choice accuracy",
                 "gen_correct": "generation accuracy", "gen_prefix": "generation exact prefix",
                 "mc_correct_norm": "MC accuracy (length-normalized)", "object_logprob": "object log-probability",
                 "mc_rank": "rank of the object among the options", "mc_mass": "probability mass on the object"}


def metric_table(run: Run) -> pd.DataFrame:
    """Tidy metric means ``checkpoint, phase, kind, split, metric, value``: the probe's
    :func:`rotelab.probe.metrics_table` (the one reader of the store's accuracy results)."""
    from rotelab.probe import metrics_table

    return metrics_table(run)


__all__ = ["METRIC_LABELS", "metric_table"]
