"""Statistics across seeds (paper Appendix D): mean, std, 95% CI (Student t) and a one-sided
one-sample t-test of ``H0: μ = chance`` against ``H1: μ > chance`` per metric × kind × split × stage.

Input: one tidy metric table per run (seed), columns ``checkpoint, phase, kind, split, metric,
value`` (as :func:`rotelab.probe.metrics_table` returns). Rows that share a group within one run
(e.g. per relation) are averaged first, so each run contributes one value per group.

Stages (``by="stage"``): ``base`` (phase ``base``), ``rote`` (the last checkpoint of phase
``phase1``) and ``generalization`` (the last of ``phase2``), following the paper's Table 4;
``by="checkpoint"`` uses every checkpoint id present in all runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from rotelab.errors import RotelabError

METRIC_COLUMNS = ("checkpoint", "phase", "kind", "split", "metric", "value")
STAGES = {"base": "base", "phase1": "rote", "phase2": "generalization"}
STAT_COLUMNS = ("stage", "kind", "split", "metric", "n", "mean", "std", "ci95", "lower", "upper", "chance", "t", "p", "significant")


def _stage_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of the base checkpoint, the last phase-1 and the last phase-2 checkpoint, with ``stage``."""
    order = list(dict.fromkeys(table["checkpoint"]))
    out = []
    for phase, stage in STAGES.items():
        cps = [c for c in order if (table.loc[table["checkpoint"] == c, "phase"] == phase).any()]
        if cps:
            out.append(table[table["checkpoint"] == cps[-1]].assign(stage=stage))
    return pd.concat(out, ignore_index=True) if out else table.iloc[0:0].assign(stage=[])


def one_sided_t(values: np.ndarray, chance: float) -> dict[str, float]:
    """mean, std (ddof 1), 95% CI half-width, t and one-sided p of ``values`` against ``chance``.

    Zero variance: t = ±inf (p 0 / 1) as in the paper's Table 4, NaN (p NaN) when mean == chance.
    Identical values count as zero variance exactly (three seeds at 0.4 give a float std of 7e-17
    from the mean's rounding, which made t ≈ 5e15 and p = 8.6e-33 in a report).
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    if n < 2:
        return {"n": n, "mean": mean, "std": float("nan"), "ci95": float("nan"), "t": float("nan"), "p": float("nan")}
    std = 0.0 if bool((v == v[0]).all()) else float(v.std(ddof=1))
    se = std / np.sqrt(n)
    ci = float(sps.t.ppf(0.975, n - 1) * se)
    diff = mean - chance
    if se == 0:
        t = float("nan") if diff == 0 else float(np.sign(diff) * np.inf)
        p = float("nan") if diff == 0 else (0.0 if diff > 0 else 1.0)
    else:
        t = diff / se
        p = float(sps.t.sf(t, n - 1))
    return {"n": n, "mean": mean, "std": std, "ci95": ci, "t": float(t), "p": p}


def seed_statistics(
    tables: Sequence[pd.DataFrame],
    *,
    chance: float | Mapping[str, float] = 0.01,
    by: Literal["stage", "checkpoint"] = "stage",
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Appendix-D statistics over runs (one metric table per seed; see the module docstring).

    ``chance``: one value for every metric (the paper: 1% = 1 / 100 options) or metric → value
    (e.g. ``{"mc_correct": 1 / n_options}``; metrics not named use 0.01). Returns
    :data:`STAT_COLUMNS` with ``stage`` holding the stage or checkpoint id; ``significant`` is
    ``p < alpha``.
    """
    if len(tables) < 2:
        raise RotelabError(f"seed statistics need at least two runs (seeds), got {len(tables)}")
    per_run = []
    for i, t in enumerate(tables):
        missing = [c for c in METRIC_COLUMNS if c not in t.columns]
        if missing:
            raise RotelabError(f"metric table {i}: missing columns {missing}")
        t = t[list(METRIC_COLUMNS)].copy()
        t = _stage_rows(t) if by == "stage" else t.assign(stage=t["checkpoint"])
        g = t.groupby(["stage", "kind", "split", "metric"], sort=False)["value"].mean().reset_index()
        per_run.append(g.assign(run=i))
    allrows = pd.concat(per_run, ignore_index=True)
    rows = []
    for (stage, kind, split, metric), grp in allrows.groupby(["stage", "kind", "split", "metric"], sort=False):
        c = chance.get(metric, 0.01) if isinstance(chance, Mapping) else float(chance)
        vals = grp["value"].to_numpy(dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        r = one_sided_t(vals, c)
        rows.append({
            "stage": stage, "kind": kind, "split": split, "metric": metric, "n": r["n"], "mean": r["mean"],
            "std": r["std"], "ci95": r["ci95"], "lower": r["mean"] - r["ci95"], "upper": r["mean"] + r["ci95"],
            "chance": c, "t": r["t"], "p": r["p"], "significant": bool(np.isfinite(r["p"]) and r["p"] < alpha),
        })
    return pd.DataFrame(rows, columns=list(STAT_COLUMNS))


def run_statistics(runs: Sequence[Any], *, by: Literal["stage", "checkpoint"] = "stage",
                   chance: float | Mapping[str, float] | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """:func:`seed_statistics` over several runs (e.g. a ``seed`` sweep) read from their stores.

    Default ``chance``: 1 / number of multiple-choice options (``data.distractors + 1`` of the
    first run) for every metric, as the paper's Appendix D does (1% with 99 distractors).
    """
    from .metrics import metric_table

    if chance is None:
        chance = 1.0 / (runs[0].config.data.distractors + 1) if runs else 0.01
    return seed_statistics([metric_table(r) for r in runs], chance=chance, by=by, alpha=alpha)


__all__ = ["METRIC_COLUMNS", "STAT_COLUMNS", "one_sided_t", "run_statistics", "seed_statistics"]
