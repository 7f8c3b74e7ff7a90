"""``summary.md`` of a run: the numbers a reader looks for first, each section only when its data
exist (accuracy at the paper's stages, ΔCosSim, key-token alignment, the figures written)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from rotelab.errors import RotelabError
from rotelab.facts import atomic_write_text

from ._common import open_store, stage_checkpoints

if TYPE_CHECKING:
    from rotelab.run import Run


def _md_table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = [floatfmt.format(v) if isinstance(v, (float, np.floating)) and np.isfinite(v) else ("–" if isinstance(v, float) else str(v)) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SUMMARY_METRICS = (("object_prob", "P(obj)"), ("mc_correct", "MC"), ("gen_correct", "gen"))
SUMMARY_KINDS = ("key", "train", "test", "unrelated", "zero")


def summary_rows(run: Run) -> list[tuple[str, str]]:
    """``[(label, checkpoint id)]``: the base model, the last phase-1 point and every phase-2 point
    of the main series — the rows of the paper's Table 1 / Figure 3 for one run — then the last
    point of the injection stage (ablation C1) and of each baseline series (``sft``, ``sft-k``)."""
    entries = run.checkpoints()
    main = [e for e in entries if e.series == "main"]
    rows = [("base", e.id) for e in main if e.phase == "base"][:1]
    p1 = [e for e in main if e.phase == "phase1"]
    if p1:
        rows.append(("phase 1 (last)", p1[-1].id))
    rows += [(f"phase 2 ep {e.epoch:g}", e.id) for e in main if e.phase == "phase2"]
    inj = [e for e in main if e.phase == "inject"]
    if inj:
        rows.append(("inject (last)", inj[-1].id))
    for series in dict.fromkeys(e.series for e in entries if e.series != "main"):
        last = [e for e in entries if e.series == series][-1]
        rows.append((f"{'SFT (paper)' if series == 'sft' else series} (last)", last.id))
    return rows


def _cell(values: pd.Series) -> str:
    return " / ".join("–" if not np.isfinite(values.get(m, np.nan)) else f"{values.get(m):.2f}" for m, _ in SUMMARY_METRICS)


def accuracy_table(run: Run, split: str = "heldout") -> str:
    """Markdown: rows = :func:`summary_rows`, columns = prompt kinds, cells = P(obj) / MC / gen."""
    from .metrics import metric_table

    t = metric_table(run)
    if t.empty:
        return ""
    t = t[t["split"] == split]
    have = run.kinds()
    order = [*SUMMARY_KINDS[:1], "meaningful", *SUMMARY_KINDS[1:], *[k for k in have if k.startswith("translated-")], "icl",
             *[k for k in have if k.startswith("icl-")], "repurposed", "reverse"]
    kinds = [k for k in order if k in set(t["kind"])]
    if not kinds:
        return ""
    lines = ["| checkpoint | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for label, ck in summary_rows(run):
        sub = t[t["checkpoint"] == ck]
        if sub.empty:
            continue
        cells = [_cell(sub[sub["kind"] == k].set_index("metric")["value"]) for k in kinds]
        lines.append(f"| {label} (`{ck}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_text(run: Run) -> str:
    """The markdown of ``summary.md``."""
    cfg = run.config
    stages = stage_checkpoints(run)
    out = [f"# {cfg.name}", "",
           f"model `{cfg.model.name}` ({cfg.model.dtype}) · relations {', '.join(cfg.data.relations)} · "
           f"{cfg.data.facts_per_relation} facts each · phase 1: {cfg.phase1.epochs} epochs, lr {cfg.phase1.lr:g}, mode {cfg.phase1.mode} · "
           f"phase 2: k = {cfg.phase2.k}, P = {cfg.phase2.prompts}, {cfg.phase2.epochs} epochs, lr {cfg.phase2.lr:g}, "
           f"loss on {cfg.phase2.loss_mask} · seed {cfg.seed} · {len(run.checkpoints())} checkpoints", ""]
    try:
        for split, title in (("heldout", "Held-out facts (validation ∪ test: never trained in phase 2)"), ("train", "Phase-2 training facts"),
                             ("injected", "Injected facts (memorized with the key token after phase 2, ablation C1)"),
                             ("all", "All facts (the paper compares its SFT baseline here: SFT trains every fact)")):
            if split == "all" and not any(e.series == "sft" for e in run.checkpoints()):
                continue
            table = accuracy_table(run, split)
            if table:
                out += [f"## {title}", "", "Each cell: object probability / multiple-choice accuracy / generation accuracy.", "", table, ""]
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
            out += ["## ΔCosSim at the last layer (paper App. F.3; base → rote (phase 1) → generalization (phase 2))", "",
                    _md_table(pd.DataFrame(rows)), ""]
        al = st.read_table("alignment")
        if al is not None and len(al):
            last_layer = int(al["layer"].max())
            sel = al[(al["layer"] == last_layer) & (al["split"] == "all") & al["checkpoint"].isin(list(stages.values()))]
            if len(sel):
                inv = {v: k for k, v in stages.items()}
                g = sel.assign(stage=sel["checkpoint"].map(inv)).pivot_table(index="kind", columns="stage", values="cosine", aggfunc="mean")
                g = g.reindex(columns=[s for s in ("base", "rote", "generalization") if s in g.columns])
                if "rote" in g.columns and "generalization" in g.columns:
                    g["change (phase 2)"] = g["generalization"] - g["rote"]
                out += [f"## Key-token alignment: cosine(key prompt, same fact's prompt), layer {last_layer}", "",
                        _md_table(g.reset_index()), ""]
    if run.figures_dir.is_dir():
        pngs = sorted(p.name for p in run.figures_dir.glob("*.png"))
        if pngs:
            out += ["## Figures", "", *[f"* [{p}](figures/{p})" for p in pngs], ""]
    out += [f"Browse it: `rotelab tui {run.root}`", ""]
    return "\n".join(out)


def write_summary(run: Run) -> str:
    """Write ``run.summary_path`` and return its text."""
    text = summary_text(run)
    atomic_write_text(run.summary_path, text)
    return text


__all__ = ["accuracy_table", "summary_rows", "summary_text", "write_summary"]
