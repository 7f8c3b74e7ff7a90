"""Reading accuracy results back from the store as tables.

* :func:`item_metrics_table` — one row per (checkpoint, kind, item): the item table's columns plus
  every metric (committed units only).
* :func:`metrics_table` — tidy means over items: checkpoint, phase, kind, split, metric, value
  (``split``: ``train`` = phase-2 training facts, ``validation``, ``test``, ``heldout`` =
  validation ∪ test — :func:`rotelab.facts.split_names` —, ``injected``, ``all``).
* :func:`summary_table` — one checkpoint shaped like the paper's Figure 3 / Table 1: rows = kinds,
  columns = (split, metric) for object probability, MC accuracy and generation accuracy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from rotelab.facts import LEGACY_HELDOUT, split_mask, split_names
from rotelab.run import Run

from .accuracy_metrics import METRIC_ARRAYS

NUMERIC_METRICS = tuple(m for m in METRIC_ARRAYS if m != "gen_text")
SUMMARY_METRICS = {"object_prob": "object prob", "mc_correct": "MC acc", "gen_correct": "gen acc"}
TIDY_COLUMNS = ["checkpoint", "phase", "kind", "split", "metric", "value"]


def _open_store(run: Run):
    from rotelab.store import Store

    if not (run.store_path / "zarr.json").is_file():
        return None
    return Store.open(run.store_path, mode="r")


def item_metrics_table(run: Run, kinds: list[str] | None = None) -> pd.DataFrame:
    """Per-item results: checkpoint, phase, kind, item columns, and one column per metric."""
    store = _open_store(run)
    phases = {e.id: e.phase for e in run.checkpoints()}
    frames = []
    if store is not None:
        for kind in kinds or store.kinds():
            kg = store.kind(kind)
            have = set(kg.item_arrays())
            if not all(m in have for m in METRIC_ARRAYS):
                continue
            done = np.ones(len(kg.checkpoints), dtype=bool)
            for m in METRIC_ARRAYS:
                done &= kg.committed(m)
            cps = [c for c, d in zip(kg.checkpoints, done) if d]
            if not cps:
                continue
            items = kg.items
            data = {m: kg.read_item_array(m, checkpoints=cps) for m in METRIC_ARRAYS}
            for ci, c in enumerate(cps):
                df = items.copy()
                df.insert(0, "kind", kind)
                df.insert(0, "phase", phases.get(c, ""))
                df.insert(0, "checkpoint", c)
                for m in METRIC_ARRAYS:
                    df[m] = data[m][ci]
                frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["checkpoint", "phase", "kind", "item", *METRIC_ARRAYS])
    return pd.concat(frames, ignore_index=True)


def metrics_table(run: Run, kinds: list[str] | None = None) -> pd.DataFrame:
    """Tidy means over items per checkpoint × kind × split (``all``, each split label, and
    ``heldout`` = validation ∪ test) × metric."""
    items = item_metrics_table(run, kinds)
    if items.empty:
        return pd.DataFrame(columns=TIDY_COLUMNS)
    order = {e.id: i for i, e in enumerate(run.checkpoints())}
    parts = [items.assign(split="all"), items]
    if LEGACY_HELDOUT in split_names(items["split"]) and not (items["split"] == LEGACY_HELDOUT).any():
        parts.append(items[split_mask(items["split"], LEGACY_HELDOUT)].assign(split=LEGACY_HELDOUT))
    both = pd.concat(parts, ignore_index=True)
    long = both.melt(id_vars=["checkpoint", "phase", "kind", "split"], value_vars=list(NUMERIC_METRICS), var_name="metric")
    long["value"] = long["value"].astype(float)
    out = long.groupby(["checkpoint", "phase", "kind", "split", "metric"], sort=False, as_index=False)["value"].mean()
    out["_o"] = out["checkpoint"].map(order)
    return out.sort_values(["_o", "kind", "split", "metric"], kind="stable").drop(columns="_o").reset_index(drop=True)[TIDY_COLUMNS]


def summary_table(run: Run, checkpoint: str, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Kinds × (split, metric) for one checkpoint: object prob, MC acc, gen acc on the phase-2
    training facts (``train``) and the held-out facts (``heldout``)."""
    t = metrics_table(run) if table is None else table
    t = t[(t["checkpoint"] == checkpoint) & t["metric"].isin(list(SUMMARY_METRICS)) & t["split"].isin(["train", "heldout"])]
    if t.empty:
        return pd.DataFrame()
    wide = t.pivot_table(index="kind", columns=["split", "metric"], values="value", sort=False)
    kinds = [k for k in run.kinds() if k in wide.index] + [k for k in wide.index if k not in run.kinds()]
    cols = [(s, m) for s in ("train", "heldout") for m in SUMMARY_METRICS if (s, m) in wide.columns]
    wide = wide.loc[kinds, cols]
    wide.columns = pd.MultiIndex.from_tuples([(s, SUMMARY_METRICS[m]) for s, m in cols], names=["split", "metric"])
    return wide


def format_summary(run: Run, checkpoint: str, table: pd.DataFrame | None = None) -> str:
    """:func:`summary_table` as text (what ``rotelab eval`` prints per checkpoint)."""
    wide = summary_table(run, checkpoint, table)
    if wide.empty:
        return f"{checkpoint}: no results"
    return f"checkpoint {checkpoint}\n" + wide.to_string(float_format=_fmt)


def _fmt(v: float) -> str:
    return f"{v:.3f}" if v == 0 or abs(v) >= 1e-3 or v != v else f"{v:.1e}"
