"""Print the REPRODUCTION.md tables from several seed runs of one config.

    python scripts/reproduction_report.py runs/repro-smollm2-seed=0 runs/repro-smollm2-seed=1 ...

For each stage (base, last phase-1 point, last phase-2 point, last SFT-baseline point) and prompt
kind: mean over seeds of the held-out metric, its 95 % t-interval, and the one-sided t-test against
chance (Appendix D), then ΔCosSim and key-token alignment per stage where captured.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from rotelab.analyses.stats import seed_statistics
from rotelab.analyses.metrics import metric_table
from rotelab.run import Run
from rotelab.store import Store

KINDS = ("key", "train", "test", "unrelated", "zero", "translated-de", "translated-zh", "icl")
METRICS = (("object_prob", "object probability"), ("mc_correct", "MC accuracy"), ("gen_correct", "generation accuracy"))


def stage_ids(run: Run) -> dict[str, str]:
    out: dict[str, str] = {}
    for phase, stage in (("base", "base"), ("phase1", "phase 1"), ("phase2", "phase 2"), ("sft", "SFT baseline")):
        ids = [e.id for e in run.checkpoints() if e.phase == phase or (phase == "sft" and e.series == "sft")]
        if ids:
            out[stage] = ids[0] if phase == "base" else ids[-1]
    return out


def staged_table(run: Run) -> pd.DataFrame:
    t = metric_table(run)
    inv = {v: k for k, v in stage_ids(run).items()}
    t = t[t["checkpoint"].isin(inv)].copy()
    t["checkpoint"] = t["checkpoint"].map(inv)  # same label across seeds
    return t


def main(paths: list[str]) -> None:
    runs = [Run.open(p) for p in paths]
    chance = 1.0 / (runs[0].config.data.distractors + 1)
    stats = seed_statistics([staged_table(r) for r in runs], chance={"mc_correct": chance, "object_prob": chance, "gen_correct": 0.0}, by="checkpoint")
    stats = stats[stats["split"] == "heldout"]
    stages = [s for s in ("base", "phase 1", "phase 2", "SFT baseline") if s in set(stats["stage"])]
    print(f"seeds: {len(runs)}; chance for MC = {chance:.2f}; cells: mean ± 95% CI half-width (one-sided p of MC accuracy > chance)\n")
    for metric, label in METRICS:
        print(f"### {label}, held-out facts\n")
        kinds = [k for k in KINDS if k in set(stats["kind"])]
        print("| stage | " + " | ".join(kinds) + " |")
        print("|---|" + "---|" * len(kinds))
        for s in stages:
            cells = []
            for k in kinds:
                r = stats[(stats["stage"] == s) & (stats["kind"] == k) & (stats["metric"] == metric)]
                if r.empty:
                    cells.append("–")
                    continue
                r = r.iloc[0]
                p = f" (p={r['p']:.2g})" if metric == "mc_correct" and np.isfinite(r["p"]) else ""
                cells.append(f"{r['mean']:.3f} ± {r['ci95']:.3f}{p}")
            print(f"| {s} | " + " | ".join(cells) + " |")
        print()
    rows = []
    for run in runs:
        if not run.store_path.exists():
            continue
        st = Store.open(run.store_path, mode="r")
        ids = stage_ids(run)
        for kind in ("key", "train", "test"):
            if kind not in st.kinds() or "delta_cossim" not in st.kind(kind).derived_arrays():
                continue
            g = st.kind(kind)
            dc = g.read_derived("delta_cossim")
            for s, ck in ids.items():
                if ck in g.checkpoints:
                    rows.append((run.config.seed, kind, s, float(dc[g.checkpoints.index(ck), -1])))
        al = st.read_table("alignment")
        if al is not None and len(al):
            last = al[(al["layer"] == al["layer"].max()) & (al["split"] == "all")]
            for s, ck in ids.items():
                for kind, v in last[last["checkpoint"] == ck].groupby("kind")["cosine"].mean().items():
                    rows.append((run.config.seed, f"align:{kind}", s, float(v)))
    if rows:
        df = pd.DataFrame(rows, columns=["seed", "what", "stage", "value"])
        piv = df.groupby(["what", "stage"])["value"].agg(["mean", "std", "count"]).reset_index()
        print("### ΔCosSim (last layer) and key-token alignment (cosine with the same fact's prompts, last layer)\n")
        print("| quantity | " + " | ".join(stages) + " |")
        print("|---|" + "---|" * len(stages))
        for what, g in piv.groupby("what"):
            cells = []
            for s in stages:
                r = g[g["stage"] == s]
                cells.append("–" if r.empty else f"{r['mean'].iloc[0]:.3f} ± {0 if np.isnan(r['std'].iloc[0]) else r['std'].iloc[0]:.3f} (n={int(r['count'].iloc[0])})")
            print(f"| {what} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
