"""``summary.md`` of a run: the numbers a reader looks for first, each section only when its data
exist (accuracy at the paper's stages, ΔCosSim, key-token alignment, the figures written)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rotelab.errors import RotelabError
from rotelab.facts import atomic_write_text

from ._common import open_store, reference_checkpoint, stage_checkpoints

if TYPE_CHECKING:
    from rotelab.run import Run


def _md_table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = [floatfmt.format(v) if isinstance(v, (float, np.floating)) and np.isfinite(v) else ("–" if isinstance(v, float) else str(v)) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_text(run: Run) -> str:
    """The markdown of ``summary.md``."""
    cfg = run.config
    stages = stage_checkpoints(run)
    out = [f"# {cfg.name}", "",
           f"model `{cfg.model.name}` · relations {', '.join(cfg.data.relations)} · {cfg.data.facts_per_relation} facts each · "
           f"phase 2: k = {cfg.phase2.k}, P = {cfg.phase2.prompts} · seed {cfg.seed} · {len(run.checkpoints())} checkpoints", ""]
    if stages:
        out += ["Stages: " + ", ".join(f"{k} = `{v}`" for k, v in stages.items()), ""]
    try:
        from .metrics import metric_table

        t = metric_table(run)
        split = "heldout" if (t["split"] == "heldout").any() else "all"
        t = t[(t["split"] == split) & t["checkpoint"].isin(list(stages.values()))]
        if len(t):
            inv = {v: k for k, v in stages.items()}
            t = t.assign(stage=t["checkpoint"].map(inv))
            for metric, g in t.groupby("metric", sort=True):
                piv = g.pivot_table(index="kind", columns="stage", values="value", aggfunc="mean")
                piv = piv.reindex(columns=[s for s in ("base", "rote", "generalization") if s in piv.columns])
                out += [f"## {metric} ({split} facts)", "", _md_table(piv.reset_index()), ""]
    except RotelabError:
        pass
    try:
        st = open_store(run, "r")
    except RotelabError:
        st = None
    if st is not None:
        rows = []
        for k in st.kinds():
            g = st.kind(k)
            if "delta_cossim" not in g.derived_arrays():
                continue
            cps = [c for c in stages.values() if c in g.checkpoints]
            if not cps:
                continue
            v = g.read_derived("delta_cossim", checkpoints=cps, layers=[g.layers[-1]])[:, 0]
            rows.append({"kind": k, **{s: float(x) for s, x in zip([s for s, c in stages.items() if c in cps], v)}})
        if rows:
            out += [f"## ΔCosSim at the last layer", "", _md_table(pd.DataFrame(rows)), ""]
        al = st.read_table("alignment")
        if al is not None and len(al):
            last_layer = int(al["layer"].max())
            last_ckpt = stages.get("generalization") or al["checkpoint"].iloc[-1]
            sel = al[(al["layer"] == last_layer) & (al["split"] == "all") & (al["checkpoint"] == last_ckpt)]
            if len(sel):
                g = sel.groupby("kind")[["cosine", "delta"]].mean().reset_index()
                out += [f"## Key-token alignment at `{last_ckpt}`, layer {last_layer} (Δ vs `{reference_checkpoint(run)}`)", "",
                        _md_table(g), ""]
    if run.figures_dir.is_dir():
        pngs = sorted(p.name for p in run.figures_dir.glob("*.png"))
        if pngs:
            out += ["## Figures", "", *[f"* [{p}](figures/{p})" for p in pngs], ""]
    return "\n".join(out)


def write_summary(run: Run) -> str:
    """Write ``run.summary_path`` and return its text."""
    text = summary_text(run)
    atomic_write_text(run.summary_path, text)
    return text


__all__ = ["summary_text", "write_summary"]
