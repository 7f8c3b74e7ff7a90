"""Print the REPRODUCTION.md tables from several seed runs of one config.

    python scripts/reproduction_report.py runs/repro-smollm2-seed=0 runs/repro-smollm2-seed=1 ...

Stages: base, last phase-1 point, last phase-2 point, last point of the paper's SFT baseline
(series ``sft``). For each metric and prompt kind: mean over seeds, the half-width of its 95 %
t-interval, and (MC accuracy) the one-sided t-test against chance (Appendix D). Sections:

1. held-out facts (never trained in phase 2), every stage and kind evaluated;
2. claim 7, SFT vs the two-phase model as the paper compares them (§5, Tables 5–6): the test and
   translated prompts of **all** facts (SFT trains every fact), with total training tokens;
3. ICL (§5, B.5; the base model, context = the fact through a random train template) vs phase 2
   on the same questions (test and translated templates), all facts;
4. MC with memorized distractors (``RUN/mc_memorized.csv`` from ``scripts/mc_memorized.py``) beside
   the pool distractors;
5. ΔCosSim and key-token alignment per stage, raw last layer and final-norm state, where captured.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from rotelab.analyses.metrics import metric_table
from rotelab.analyses.stats import one_sided_t, seed_statistics
from rotelab.run import Run
from rotelab.store import Store

KINDS = ("key", "train", "test", "unrelated", "zero", "translated-de", "translated-zh", "icl", "icl-translated-de", "icl-translated-zh")
METRICS = (("object_prob", "object probability"), ("mc_correct", "MC accuracy"), ("gen_correct", "generation accuracy"))
STAGES = ("base", "phase 1", "phase 2", "SFT baseline")


def stage_ids(run: Run) -> dict[str, str]:
    """stage label → checkpoint id (base, last phase 1, last phase 2, last SFT point)."""
    out: dict[str, str] = {}
    for phase, stage in (("base", "base"), ("phase1", "phase 1"), ("phase2", "phase 2"), ("sft", "SFT baseline")):
        ids = [e.id for e in run.checkpoints() if e.phase == phase and (phase != "sft" or e.series == "sft")]
        if ids:
            out[stage] = ids[0] if phase == "base" else ids[-1]
    return out


def staged_table(run: Run) -> pd.DataFrame:
    t = metric_table(run)
    inv = {v: k for k, v in stage_ids(run).items()}
    t = t[t["checkpoint"].isin(inv)].copy()
    t["checkpoint"] = t["checkpoint"].map(inv)  # same label across seeds
    return t


def _cell(stats: pd.DataFrame, stage: str, kind: str, metric: str, split: str) -> str:
    r = stats[(stats["stage"] == stage) & (stats["kind"] == kind) & (stats["metric"] == metric) & (stats["split"] == split)]
    if r.empty or not np.isfinite(r.iloc[0]["mean"]):
        return "–"
    r = r.iloc[0]
    p = f" (p={r['p']:.2g})" if metric == "mc_correct" and np.isfinite(r["p"]) else ""
    n = "" if r["n"] > 1 else " (n=1)"
    return f"{r['mean']:.3f} ± {r['ci95']:.3f}{p}{n}"


def _table(stats: pd.DataFrame, rows: list[tuple[str, str]], cols: list[tuple[str, str]], metric: str, split: str) -> list[str]:
    """Markdown lines: ``rows`` = (label, stage), ``cols`` = (header, kind)."""
    out = ["| | " + " | ".join(h for h, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for label, stage in rows:
        out.append(f"| {label} | " + " | ".join(_cell(stats, stage, k, metric, split) for _, k in cols) + " |")
    return out


def tokens_row(runs: list[Run]) -> dict[str, str]:
    """stage → total training tokens (mean over seeds) of its checkpoint."""
    out = {}
    for stage in STAGES:
        vals = []
        for r in runs:
            ck = stage_ids(r).get(stage)
            if ck is not None and r.checkpoint(ck).total_tokens is not None:
                vals.append(r.checkpoint(ck).total_tokens)
        if vals:
            out[stage] = f"{np.mean(vals):,.0f}"
    return out


def memorized_mc(runs: list[Run]) -> pd.DataFrame:
    """seed-level rows of ``mc_memorized.csv``, checkpoints mapped to stages."""
    parts = []
    for r in runs:
        p = Path(r.root) / "mc_memorized.csv"
        if not p.is_file():
            continue
        t = pd.read_csv(p)
        inv = {v: k for k, v in stage_ids(r).items()}
        t = t[t["checkpoint"].isin(inv)].assign(stage=lambda d: d["checkpoint"].map(inv), seed=r.config.seed)
        parts.append(t)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def main(paths: list[str]) -> None:
    runs = [Run.open(p) for p in paths]
    chance = 1.0 / (runs[0].config.data.distractors + 1)
    stats = seed_statistics([staged_table(r) for r in runs], chance={"mc_correct": chance, "object_prob": chance, "gen_correct": 0.0}, by="checkpoint")
    stages = [s for s in STAGES if s in set(stats["stage"])]
    print(f"seeds: {len(runs)}; chance for MC = {chance:.2f}; cells: mean ± 95% CI half-width (one-sided p of MC accuracy > chance)\n")
    kinds = [k for k in KINDS if k in set(stats["kind"])]
    for metric, label in METRICS:
        print(f"### {label}, held-out facts\n")
        print("\n".join(_table(stats, [(s, s) for s in stages], [(k, k) for k in kinds], metric, "heldout")) + "\n")

    tok = tokens_row(runs)
    cols = [(k, k) for k in ("train", "test", "translated-de", "translated-zh") if k in kinds]
    rows = [(f"{s} ({tok.get(s, '?')} tokens)", s) for s in ("phase 2", "SFT baseline") if s in stages]
    print("### Claim 7: SFT (paper §5/B.5) vs memorize-then-generalize, all facts\n")
    for metric, label in METRICS:
        print(f"{label}:\n")
        print("\n".join(_table(stats, rows, cols, metric, "all")) + "\n")

    pairs = [("en (test)", "icl", "test"), ("de", "icl-translated-de", "translated-de"), ("zh", "icl-translated-zh", "translated-zh")]
    pairs = [p for p in pairs if p[1] in kinds]
    if pairs:
        print("### ICL (base model, paper B.5) vs phase 2 on the same questions, all facts\n")
        for metric, label in METRICS:
            print(f"{label}:\n")
            out = ["| | " + " | ".join(h for h, _, _ in pairs) + " |", "|---|" + "---|" * len(pairs)]
            out.append("| ICL (base) | " + " | ".join(_cell(stats, "base", k, metric, "all") for _, k, _ in pairs) + " |")
            out.append("| phase 2 | " + " | ".join(_cell(stats, "phase 2", k, metric, "all") for _, _, k in pairs) + " |")
            print("\n".join(out) + "\n")

    mem = memorized_mc(runs)
    if not mem.empty:
        print("### MC accuracy, pool vs memorized distractors, held-out facts\n")
        mk = [k for k in ("train", "test", "unrelated", "zero") if k in set(mem["kind"])]
        print("| stage | " + " | ".join(f"{k} pool | {k} memorized" for k in mk) + " |")
        print("|---|" + "---|---|" * len(mk))
        for s in [s for s in stages if s in set(mem["stage"])]:
            cells = []
            for k in mk:
                cells.append(_cell(stats, s, k, "mc_correct", "heldout"))
                v = mem[(mem["stage"] == s) & (mem["kind"] == k) & (mem["split"] == "heldout")]["mc_correct"].to_numpy()
                if len(v):
                    r = one_sided_t(v, chance)
                    p = f" (p={r['p']:.2g})" if np.isfinite(r["p"]) else ""
                    cells.append(f"{r['mean']:.3f} ± {r['ci95']:.3f}{p}" if len(v) > 1 else f"{r['mean']:.3f} (n=1)")
                else:
                    cells.append("–")
            print(f"| {s} | " + " | ".join(cells) + " |")
        print()

    rows = []
    for run in runs:
        if not (run.store_path / "zarr.json").is_file():
            continue
        st = Store.open(run.store_path, mode="r")
        ids = stage_ids(run)
        for kind in ("key", "train", "test"):
            if kind not in st.kinds():
                continue
            g = st.kind(kind)
            derived = g.derived_arrays()
            for s, ck in ids.items():
                if ck not in g.checkpoints:
                    continue
                ci = g.checkpoints.index(ck)
                if "delta_cossim" in derived:
                    rows.append((run.config.seed, f"ΔCosSim {kind}, raw last layer", s, float(g.read_derived("delta_cossim")[ci, -1])))
                if "delta_cossim_final_norm" in derived:
                    rows.append((run.config.seed, f"ΔCosSim {kind}, final norm", s, float(g.read_derived("delta_cossim_final_norm")[ci])))
        al = st.read_table("alignment")
        if al is not None and len(al):
            for layer, what in ((int(al["layer"].max()), "raw last layer"), (-1, "final norm")):
                sel = al[(al["layer"] == layer) & (al["split"] == "all")]
                for s, ck in ids.items():
                    for kind, v in sel[sel["checkpoint"] == ck].groupby("kind")["cosine"].mean().items():
                        rows.append((run.config.seed, f"align:{kind}, {what}", s, float(v)))
    if rows:
        df = pd.DataFrame(rows, columns=["seed", "what", "stage", "value"]).dropna()
        piv = df.groupby(["what", "stage"])["value"].agg(["mean", "std", "count"]).reset_index()
        print("### ΔCosSim and key-token alignment (cosine with the same fact's prompts)\n")
        print("| quantity | " + " | ".join(stages) + " |")
        print("|---|" + "---|" * len(stages))
        for what, g in piv.groupby("what"):
            cells = []
            for s in stages:
                r = g[g["stage"] == s]
                cells.append("–" if r.empty else f"{r['mean'].iloc[0]:.3f} (n={int(r['count'].iloc[0])})")
            print(f"| {what} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
