"""``rotelab report``: the statistics of an experiment's sibling runs, as tables, CSVs and figures.

An *experiment* is the family of runs one config makes: a sweep expands into sibling runs named
``<experiment>-<key>=<value>-…`` (:func:`rotelab.config.expand_sweep`), a plain config into one run.
The report reads the runs' stores and checkpoint indexes only (it never trains or evaluates):

* **groups** — the siblings grouped by their swept values, ``seed`` excluded (the seeds of one
  setting are one group). Runs of one group must agree on every result-relevant config key but
  the seed; two models or datasets in one group are refused (one-line :class:`RotelabError`).
* **stages** — every evaluated checkpoint of every series: ``base``, each phase-1 point, each
  phase-2 point, the baselines (``sft-…``, ``sftk-…``), the injection stage (``inj-…``).
* **statistics** (paper Appendix D) per group × stage × kind × split × metric, over the group's
  seeds: mean, std, the 95 % Student-t interval ``mean ± t(0.975, n−1)·std/√n``; for multiple-choice
  metrics the one-sided one-sample t-test ``H1: μ > chance`` with chance ``1 / (distractors + 1)``;
  for phase-2 points the one-sided paired test of the *gain* over the checkpoint phase 2 started
  from (``H1: μ(stage − start) > 0``, per seed). One value per run and cell is the mean over the
  split's items (:func:`rotelab.analyses.metrics.metric_table`).
* **honest choice** — where the experiment sweeps more than the seed, the setting is picked on the
  ``validation`` facts (:data:`SELECT_METRIC` on :data:`SELECT_KIND` prompts at the group's last
  phase-2 point) and every table reports the ``test`` facts. Runs written before the
  validation/test split (:attr:`rotelab.run.Run.legacy_split`) have only ``heldout``: the report
  uses it, picks nothing on it and says so.

Outputs in ``out`` (default ``reports/<experiment>/``): ``report.md``, ``stats.csv`` (every cell,
long), ``stages.csv`` (one row per group × stage, the reported split), ``table1.csv`` (the paper's
Table 1 layout: per group the key-token prompt at the phase-2 start, train and test prompts at the
last phase-2 point), ``selection.csv``, ``representations.csv`` where captured, and figures
(PNG/PDF/SVG + CSV): ``curves_<metric>`` (test-prompt accuracy per stage), ``grid`` where the
groups sweep two keys (paper Fig. 2: k × P) and ``tokens`` (generation accuracy against total
training tokens, paper Fig. 5) where a run has the SFT baseline.
Runs still being written (a live writer lock, a training stage short of its epochs, or checkpoints
without accuracy — also where only chosen checkpoints were evaluated on purpose) are reported with
what is committed and listed as in progress, with the reason.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rotelab.config import NON_RESULT_KEYS, expand_sweep, flatten, load_config
from rotelab.errors import RotelabError
from rotelab.prompts import is_icl_kind
from rotelab.run import Run

from .stats import one_sided_t

#: Metrics whose chance level is one over the number of options (the Appendix-D test against chance).
MC_METRICS = ("mc_correct", "mc_correct_norm")
#: Metrics in the report's tables (all metrics are in ``stats.csv``).
TABLE_METRICS = {"gen_correct": "generation accuracy", "object_prob": "object probability", "mc_correct": "MC accuracy"}
#: How a sweep picks its setting: the mean over seeds of this metric on these prompts, validation facts.
SELECT_METRIC, SELECT_KIND = "gen_correct", "test"
STAT_COLUMNS = ("group", "stage", "series", "phase", "total_tokens", "kind", "split", "metric", "n", "mean", "std",
                "ci95", "lower", "upper", "chance", "p_chance", "gain_from", "gain_mean", "gain_ci95", "p_gain")
_NAME_PART = re.compile(r"-(?=[A-Za-z_][A-Za-z0-9_]*=)")
#: Config keys that differ between the seeds of one setting.
_SEED_KEYS = frozenset({"seed", "data.seed"})


def parse_run_name(name: str) -> tuple[str, dict[str, str]]:
    """``"exp-seed=0-k=3"`` → ``("exp", {"seed": "0", "k": "3"})`` (the names of
    :func:`rotelab.config.expand_sweep`: the last part of each swept key, ``=``, its value)."""
    parts = _NAME_PART.split(name)
    return parts[0], dict(p.split("=", 1) for p in parts[1:])


@dataclass
class Experiment:
    """The sibling runs of one experiment found on disk, and those its config expects but lacks."""

    name: str
    runs: list[Run] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def groups(self) -> dict[str, list[Run]]:
        """group label (``k=1-prompts=2``; ``all`` without swept keys) → its runs, in name order;
        every group checked to hold the seeds of one setting (:func:`check_group`)."""
        out: dict[str, list[Run]] = {}
        for run in sorted(self.runs, key=lambda r: _seed_order(r)):
            pairs = parse_run_name(run.config.name)[1]
            label = "-".join(f"{k}={v}" for k, v in pairs.items() if k != "seed") or "all"
            out.setdefault(label, []).append(run)
        for label, runs in out.items():
            check_group(self.name, label, runs)
        return out


def _seed_order(run: Run) -> tuple[str, int]:
    """Sort key: the run's name without its seed, then the seed."""
    exp, pairs = parse_run_name(run.config.name)
    return (exp + "-".join(f"{k}={v}" for k, v in pairs.items() if k != "seed"), run.config.seed)


def group_values(runs_by_group: dict[str, list[Run]]) -> dict[str, dict[str, str]]:
    """group label → its swept values (short key → value as in the run names), seed excluded."""
    return {g: {k: v for k, v in parse_run_name(runs[0].config.name)[1].items() if k != "seed"} for g, runs in runs_by_group.items()}


def check_group(experiment: str, label: str, runs: Sequence[Run]) -> None:
    """Every run of a group agrees with the first on every result-relevant key but the seed, else a
    one-line error naming the runs and the key (different models or datasets say so)."""
    if not runs:
        return
    first = runs[0]
    a = flatten(first.config.model_dump(mode="json"))
    for other in runs[1:]:
        b = flatten(other.config.model_dump(mode="json"))
        diff = sorted(k for k in set(a) | set(b) if k not in NON_RESULT_KEYS and k not in _SEED_KEYS and a.get(k) != b.get(k))
        if diff:
            k = diff[0]
            what = "different models" if k.startswith("model.") else "different datasets" if k.startswith("data.") else "different settings"
            raise RotelabError(f"{experiment}, group {label}: runs {first.root} and {other.root} differ in {k} "
                               f"({a.get(k)!r} vs {b.get(k)!r}): {what} cannot be compared as seeds of one group")


def find_experiments(targets: Iterable[str | Path], runs_dir: str | Path = "runs") -> list[Experiment]:
    """The experiments behind ``targets``: a config file (its sweep's runs under ``runs_dir``), a
    run directory (it and its siblings in the same folder) or a folder of runs (every experiment in
    it). Experiments in first-seen order; a run found twice counts once."""
    exps: dict[str, Experiment] = {}
    seen: set[Path] = set()

    def add(exp: str, run: Run | None, missing: str | None = None) -> None:
        e = exps.setdefault(exp, Experiment(exp))
        if run is not None and run.root.resolve() not in seen:
            seen.add(run.root.resolve())
            e.runs.append(run)
        if missing is not None:
            e.missing.append(missing)

    for target in targets:
        t = Path(target)
        if t.is_file():
            cfg = load_config(t)
            for c in expand_sweep(cfg):
                d = Path(runs_dir) / c.name
                add(cfg.name, Run.open(d) if (d / "config.yaml").is_file() else None, None if (d / "config.yaml").is_file() else c.name)
        elif (t / "config.yaml").is_file():
            run = Run.open(t)
            exp = parse_run_name(run.config.name)[0]
            add(exp, run)
            for sib in sorted(t.resolve().parent.iterdir()):
                if sib.name.startswith(exp) and (sib / "config.yaml").is_file() and sib.resolve() != t.resolve():
                    other = Run.open(sib)
                    if parse_run_name(other.config.name)[0] == exp:
                        add(exp, other)
        elif t.is_dir():
            found = False
            for sub in sorted(t.iterdir()):
                if (sub / "config.yaml").is_file():
                    run = Run.open(sub)
                    add(parse_run_name(run.config.name)[0], run)
                    found = True
            if not found:
                raise RotelabError(f"{t}: no run directories in it (no */config.yaml)")
        else:
            raise RotelabError(f"{t}: neither a config file, a run directory nor a folder of runs")
    return list(exps.values())


# --------------------------------------------------------------------------- per run


def run_status(run: Run, table: pd.DataFrame | None = None) -> list[str]:
    """Why a run is still in progress (empty when it is complete): a live writer holding its lock,
    a configured training stage (phase 1, phase 2, the SFT baselines, the injection stage) short of
    its epochs, or checkpoints without any committed accuracy in ``table`` (its metric table)."""
    notes = []
    lock = run.root / ".rotelab.lock"
    try:
        info = json.loads(lock.read_text(encoding="utf-8") or "{}") if lock.is_file() else {}
    except (OSError, ValueError):
        info = {}
    pid = info.get("pid")
    if isinstance(pid, int) and _alive(pid):
        notes.append(f"being written ({info.get('what', '?')}, pid {pid})")
    entries = run.checkpoints()
    if not entries:
        return [*notes, "no checkpoints yet"]
    cfg = run.config
    want = {"phase1": cfg.phase1.epochs, "phase2": cfg.phase2.epochs if cfg.phase2.enabled else 0,
            "sft": cfg.phase2.epochs if cfg.baselines.sft else 0, "sft-k": cfg.phase2.epochs if cfg.baselines.sft_k else 0,
            "inject": cfg.inject.epochs if cfg.inject.facts_per_relation else 0}
    for phase, epochs in want.items():
        if epochs and not any(e.phase == phase and e.epoch is not None and e.epoch >= epochs - 1e-6 for e in entries):
            notes.append(f"{phase} not finished")
    if table is not None:
        done = set(table["checkpoint"])
        todo = [e.id for e in entries if e.id not in done]
        if todo:
            notes.append(f"{len(todo)} of {len(entries)} checkpoints without accuracy")
    return notes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def phase2_start(run: Run) -> str | None:
    """The checkpoint phase 2 started from (recorded in the index), else ``phase2.start`` / the last phase-1 point."""
    if run.index_path.is_file():
        start = json.loads(run.index_path.read_text(encoding="utf-8")).get("phase2_start")
        if start:
            return str(start)
    if not run.config.phase2.enabled:
        return None
    if run.config.phase2.start != "last":
        return run.config.phase2.start
    p1 = [e.id for e in run.checkpoints() if e.phase == "phase1"]
    if p1:
        return p1[-1]
    return "base" if run.config.phase1.epochs == 0 else None  # None: phase 1 not trained yet


def _metric_table(run: Run) -> pd.DataFrame:
    from .metrics import metric_table

    if not (run.store_path / "zarr.json").is_file():
        return pd.DataFrame(columns=["checkpoint", "phase", "kind", "split", "metric", "value"])
    return metric_table(run)


# --------------------------------------------------------------------------- statistics


def group_statistics(group: str, runs: Sequence[Run], tables: Sequence[pd.DataFrame] | None = None) -> pd.DataFrame:
    """:data:`STAT_COLUMNS` for one group: one row per stage × kind × split × metric (see the
    module docstring for the definitions); ``tables`` are the runs' metric tables (read if None)."""
    tables = [_metric_table(r) for r in runs] if tables is None else list(tables)
    chance = 1.0 / (runs[0].config.data.distractors + 1)
    order: dict[str, int] = {}
    meta: dict[str, tuple[str, str]] = {}
    tokens: dict[str, list[float]] = {}
    for r in runs:
        for e in r.checkpoints():
            order.setdefault(e.id, len(order))
            meta.setdefault(e.id, (e.series, e.phase))
            if e.total_tokens is not None:
                tokens.setdefault(e.id, []).append(float(e.total_tokens))
    values: dict[tuple[str, str, str, str], dict[int, float]] = {}
    for i, t in enumerate(tables):
        for row in t.itertuples(index=False):
            values.setdefault((row.checkpoint, row.kind, row.split, row.metric), {})[i] = float(row.value)
    starts = [phase2_start(r) for r in runs]
    rows = []
    for (stage, kind, split, metric), per_run in values.items():
        v = np.array([x for x in per_run.values() if np.isfinite(x)])
        r = one_sided_t(v, chance if metric in MC_METRICS else 0.0)
        series, phase = meta.get(stage, ("", ""))
        row = {"group": group, "stage": stage, "series": series, "phase": phase,
               "total_tokens": float(np.mean(tokens[stage])) if stage in tokens else np.nan,
               "kind": kind, "split": split, "metric": metric, "n": r["n"], "mean": r["mean"], "std": r["std"],
               "ci95": r["ci95"], "lower": r["mean"] - r["ci95"], "upper": r["mean"] + r["ci95"],
               "chance": chance if metric in MC_METRICS else np.nan, "p_chance": r["p"] if metric in MC_METRICS else np.nan,
               "gain_from": "", "gain_mean": np.nan, "gain_ci95": np.nan, "p_gain": np.nan}
        if phase == "phase2":
            gains = []
            for i, x in per_run.items():
                base = values.get((starts[i], kind, split, metric), {}).get(i) if starts[i] else None
                if base is not None and np.isfinite(x) and np.isfinite(base):
                    gains.append(x - base)
            if gains:
                g = one_sided_t(np.array(gains), 0.0)
                row.update(gain_from=",".join(sorted({s for s in starts if s})), gain_mean=g["mean"], gain_ci95=g["ci95"], p_gain=g["p"])
        rows.append(row)
    out = pd.DataFrame(rows, columns=list(STAT_COLUMNS))
    out["_o"] = out["stage"].map(order).fillna(len(order))
    return out.sort_values(["_o", "kind", "split", "metric"], kind="stable").drop(columns="_o").reset_index(drop=True)


def reported_split(runs: Sequence[Run]) -> str:
    """``test``, or ``heldout`` when any run predates the validation/test split."""
    return "heldout" if any(r.legacy_split for r in runs) else "test"


def last_phase2(stats: pd.DataFrame) -> str | None:
    """The last main-series phase-2 stage of a group's statistics."""
    ids = list(dict.fromkeys(stats.loc[(stats["phase"] == "phase2") & (stats["series"] == "main"), "stage"]))
    return ids[-1] if ids else None


def select_setting(stats: pd.DataFrame, groups: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """Per group: the validation mean of :data:`SELECT_METRIC` on :data:`SELECT_KIND` at its last
    phase-2 point; returns that table (``picked`` marks the best) and a sentence saying what was
    picked and why (or why nothing was)."""
    rows = []
    for g in groups:
        s = stats[stats["group"] == g]
        last = last_phase2(s)
        sel = s[(s["stage"] == last) & (s["kind"] == SELECT_KIND) & (s["split"] == "validation") & (s["metric"] == SELECT_METRIC)]
        rows.append({"group": g, "stage": last or "", "n": int(sel["n"].iloc[0]) if len(sel) else 0,
                     "validation_mean": float(sel["mean"].iloc[0]) if len(sel) else np.nan})
    t = pd.DataFrame(rows, columns=["group", "stage", "n", "validation_mean"])
    t["picked"] = False
    if len(groups) < 2:
        return t, "One setting only (the experiment sweeps nothing but the seed): nothing to pick."
    if not np.isfinite(t["validation_mean"]).any():
        return t, (f"No setting picked: no group has {SELECT_METRIC} on {SELECT_KIND} prompts for validation facts at a phase-2 "
                   "point (runs written before the validation/test split, data.validation_fraction 0, or not evaluated yet).")
    best = int(np.nanargmax(t["validation_mean"].to_numpy()))
    t.loc[best, "picked"] = True
    others = ", ".join(f"{r.group} {r.validation_mean:.3f}" for r in t.itertuples() if not r.picked and np.isfinite(r.validation_mean))
    return t, (f"Picked **{t.loc[best, 'group']}**: the highest mean {TABLE_METRICS[SELECT_METRIC]} on {SELECT_KIND} prompts of the "
               f"*validation* facts at its last phase-2 point ({t.loc[best, 'stage']}): {t.loc[best, 'validation_mean']:.3f} "
               f"(others: {others or 'none evaluated'}). The tables report the *test* facts, never used for this choice.")


# --------------------------------------------------------------------------- tables


def _cell(r: pd.Series | None, gain: bool = False) -> str:
    if r is None or not np.isfinite(r["mean"]):
        return "–"
    s = f"{r['mean']:.3f}" + (f" ± {r['ci95']:.3f}" if np.isfinite(r["ci95"]) else " (n=1)")
    if np.isfinite(r["p_chance"]):
        s += f" p={r['p_chance']:.2g}"
    if gain and np.isfinite(r["gain_mean"]):
        s += f" (Δ {r['gain_mean']:+.3f}" + (f", p={r['p_gain']:.2g}" if np.isfinite(r["p_gain"]) else "") + ")"
    return s


def stages_table(stats: pd.DataFrame, split: str) -> pd.DataFrame:
    """One row per group × stage (columns group, stage, series, phase, total_tokens, then
    ``<kind>:<metric>`` mean and ``…:ci95``) on ``split``."""
    s = stats[stats["split"] == split]
    keys = list(dict.fromkeys(zip(stats["group"], stats["stage"])))
    out = []
    for g, st in keys:
        sub = s[(s["group"] == g) & (s["stage"] == st)]
        m = stats[(stats["group"] == g) & (stats["stage"] == st)].iloc[0]
        row = {"group": g, "stage": st, "series": m["series"], "phase": m["phase"], "total_tokens": m["total_tokens"]}
        for r in sub.itertuples(index=False):
            row[f"{r.kind}:{r.metric}"] = r.mean
            row[f"{r.kind}:{r.metric}:ci95"] = r.ci95
        out.append(row)
    return pd.DataFrame(out)


def table1(stats: pd.DataFrame, groups: Sequence[str], split: str, starts: dict[str, str]) -> pd.DataFrame:
    """The paper's Table 1 layout, one row per group: the key-token prompt at the checkpoint phase 2
    started from (gen acc, object prob), then the train and test prompts at the last phase-2 point
    (on ``split`` facts; the key-prompt columns on all memorized facts, as the paper's phase-1 columns)."""
    rows = []
    for g in groups:
        s = stats[stats["group"] == g]
        last = last_phase2(s)

        def val(stage: str | None, kind: str, metric: str, sp: str) -> tuple[float, float]:
            r = s[(s["stage"] == stage) & (s["kind"] == kind) & (s["metric"] == metric) & (s["split"] == sp)]
            return (float(r["mean"].iloc[0]), float(r["ci95"].iloc[0])) if len(r) else (np.nan, np.nan)

        row: dict[str, object] = {"group": g, "start": starts.get(g, ""), "phase2": last or ""}
        for col, (stage, kind, sp) in {"key": (starts.get(g), "key", "all"), "train": (last, "train", split), "test": (last, "test", split)}.items():
            for metric in ("gen_correct", "object_prob"):
                row[f"{col}:{metric}"], row[f"{col}:{metric}:ci95"] = val(stage, kind, metric, sp)
        rows.append(row)
    return pd.DataFrame(rows)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def representations(runs_by_group: dict[str, list[Run]]) -> pd.DataFrame:
    """Per group × stage × quantity (ΔCosSim of key/train/test at the last raw layer and after the
    final norm; key-token alignment with the same fact's prompts, all facts): mean over the runs
    that captured it, and their number."""
    from rotelab.store import Store

    rows = []
    for g, runs in runs_by_group.items():
        for run in runs:
            if not (run.store_path / "zarr.json").is_file():
                continue
            st = Store.open(run.store_path, mode="r")
            for kind in ("key", "train", "test"):
                if kind not in st.kinds():
                    continue
                grp = st.kind(kind)
                derived = grp.derived_arrays()
                for name, label in (("delta_cossim", "raw last layer"), ("delta_cossim_final_norm", "final norm")):
                    if name not in derived:
                        continue
                    a = np.asarray(grp.read_derived(name), dtype=float)
                    for ci, c in enumerate(grp.checkpoints):
                        v = a[ci, -1] if a.ndim == 2 else a[ci]
                        if np.isfinite(v):
                            rows.append((g, c, f"ΔCosSim {kind}, {label}", float(v)))
            al = st.read_table("alignment")
            if al is not None and len(al):
                for layer, label in ((int(al["layer"].max()), "raw last layer"), (-1, "final norm")):
                    sel = al[(al["layer"] == layer) & (al["split"] == "all")]
                    for (c, kind), v in sel.groupby(["checkpoint", "kind"])["cosine"].mean().items():
                        rows.append((g, c, f"alignment key–{kind}, {label}", float(v)))
    df = pd.DataFrame(rows, columns=["group", "stage", "quantity", "value"])
    return df.groupby(["group", "quantity", "stage"], sort=False)["value"].agg(["mean", "count"]).reset_index()


# --------------------------------------------------------------------------- figures


def _grid_figure(stats: pd.DataFrame, values: dict[str, dict[str, str]], split: str, out: Path) -> list[str]:
    """Where the groups sweep exactly two keys (paper Fig. 2: k × P), a heatmap of the mean
    generation accuracy on :data:`SELECT_KIND` prompts at each group's last phase-2 point."""
    from .figures import plt, save_figure

    keys = sorted({k for v in values.values() for k in v})
    if len(keys) != 2 or len(values) < 2:
        return []
    a, b = keys
    rows = []
    for g, v in values.items():
        s = stats[stats["group"] == g]
        r = s[(s["stage"] == last_phase2(s)) & (s["kind"] == SELECT_KIND) & (s["split"] == split) & (s["metric"] == "gen_correct")]
        if len(r):
            rows.append({a: v.get(a), b: v.get(b), "mean": float(r["mean"].iloc[0]), "n": int(r["n"].iloc[0])})
    if not rows:
        return []
    data = pd.DataFrame(rows)

    def order(col: str) -> list[str]:
        vals = list(dict.fromkeys(data[col]))
        try:
            return sorted(vals, key=float)
        except ValueError:
            return vals

    ya, xb = order(a), order(b)
    grid = np.full((len(ya), len(xb)), np.nan)
    for r in data.itertuples(index=False):
        grid[ya.index(getattr(r, a)), xb.index(getattr(r, b))] = r.mean
    fig, ax = plt.subplots(figsize=(1.2 * len(xb) + 2, 0.8 * len(ya) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower")
    for i in range(len(ya)):
        for j in range(len(xb)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k", fontsize=8)
    ax.set_xticks(range(len(xb)), xb)
    ax.set_yticks(range(len(ya)), ya)
    ax.set_xlabel(b)
    ax.set_ylabel(a)
    ax.set_title(f"generation accuracy, {SELECT_KIND} prompts ({split} facts), mean over seeds")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, data, "grid", out)
    plt.close(fig)
    return ["grid"]


def _figures(stats: pd.DataFrame, groups: Sequence[str], values: dict[str, dict[str, str]], split: str, out: Path) -> list[str]:
    from .figures import plt, save_figure

    made = []
    for metric, label in TABLE_METRICS.items():
        data = stats[(stats["kind"] == SELECT_KIND) & (stats["split"] == split) & (stats["metric"] == metric) & (stats["series"] == "main")]
        if data.empty:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for g in groups:
            d = data[data["group"] == g]
            x = np.arange(len(d))
            ax.errorbar(x, d["mean"], yerr=d["ci95"].fillna(0), marker="o", ms=3, capsize=2, label=g)
            if g == groups[0]:
                ax.set_xticks(x, list(d["stage"]), rotation=60, fontsize=7)
        ax.set_ylabel(label)
        ax.set_title(f"{label}, {SELECT_KIND} prompts ({split} facts); mean ± 95% CI over seeds")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, data[["group", "stage", "mean", "ci95", "n"]], f"curves_{metric}", out)
        plt.close(fig)
        made.append(f"curves_{metric}")
    made += _grid_figure(stats, values, split, out)
    tok = stats[(stats["kind"] == SELECT_KIND) & (stats["split"] == "all") & (stats["metric"] == "gen_correct")
                & stats["series"].isin(["main", "sft"]) & stats["phase"].isin(["phase2", "sft"])]
    if (tok["series"] == "sft").any():
        fig, ax = plt.subplots(figsize=(6, 4))
        for (g, series), d in tok.groupby(["group", "series"], sort=False):
            ax.errorbar(d["total_tokens"], d["mean"], yerr=d["ci95"].fillna(0), marker="o" if series == "main" else "s",
                        ls="-" if series == "main" else "--", capsize=2, label=f"{g} · {'ours' if series == 'main' else 'SFT'}")
        ax.set_xlabel("total training tokens")
        ax.set_ylabel("generation accuracy")
        ax.set_title(f"{SELECT_KIND} prompts, all facts (paper Fig. 5)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_figure(fig, tok[["group", "series", "stage", "total_tokens", "mean", "ci95", "n"]], "tokens", out)
        plt.close(fig)
        made.append("tokens")
    return made


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    """What :func:`write_report` wrote: the folder, the statistics and the per-group status."""

    experiment: str
    out: Path
    stats: pd.DataFrame
    split: str
    in_progress: dict[str, list[str]]


def write_report(exp: Experiment, out: str | Path | None = None) -> Report:
    """Write ``report.md``, the CSVs and the figures of one experiment into ``out``
    (default ``reports/<experiment>/``); see the module docstring."""
    if not exp.runs:
        raise RotelabError(f"experiment {exp.name}: none of its runs exists yet ({', '.join(exp.missing[:3])}…)")
    out = Path(out) if out is not None else Path("reports") / exp.name
    groups = exp.groups()
    split = reported_split(exp.runs)
    tables = {str(r.root): _metric_table(r) for r in exp.runs}
    stats = pd.concat([group_statistics(g, runs, [tables[str(r.root)] for r in runs]) for g, runs in groups.items()], ignore_index=True)
    labels = list(groups)
    starts = {g: ",".join(sorted({s for s in (phase2_start(r) for r in runs) if s})) for g, runs in groups.items()}
    status = {str(r.root): run_status(r, tables[str(r.root)]) for r in exp.runs}
    in_progress = {k: v for k, v in status.items() if v}
    out.mkdir(parents=True, exist_ok=True)
    stats.to_csv(out / "stats.csv", index=False)
    stages = stages_table(stats, split)
    stages.to_csv(out / "stages.csv", index=False)
    t1 = table1(stats, labels, split, starts)
    t1.to_csv(out / "table1.csv", index=False)
    selection, why = select_setting(stats, labels)
    selection.to_csv(out / "selection.csv", index=False)
    reps = representations(groups)
    if len(reps):
        reps.to_csv(out / "representations.csv", index=False)
    figures = _figures(stats, labels, group_values(groups), split, out)

    swept = sorted({k for r in exp.runs for k in parse_run_name(r.config.name)[1]})
    cfg = exp.runs[0].config
    md = [f"# {exp.name}", "",
          f"Model `{cfg.model.name}`; relations {', '.join(cfg.data.relations)}; {len(exp.runs)} runs in {len(groups)} "
          f"group(s); swept: {', '.join(swept) or 'nothing'} (seed = repetitions of one setting).", ""]
    md.append("Runs: " + "; ".join(f"`{r.root.name}`" + (f" (in progress: {', '.join(status[str(r.root)])})" if status[str(r.root)] else "")
                                   for r in exp.runs) + ".")
    if exp.missing:
        md += ["", f"Not run yet: {', '.join(f'`{m}`' for m in exp.missing)}."]
    if in_progress:
        md += ["", f"**{len(in_progress)} run(s) in progress: the numbers below are what is committed so far.**"]
    md += ["", f"Facts reported: **{split}**" + (
        " — these runs predate the validation/test split (no `data/split.json`): held-out = every fact phase 2 did not train, "
        "and no setting is picked on them." if split == "heldout" else
        " — the held-out facts not used to choose a setting (`data.validation_fraction` of them are validation)."),
        "", "Cells: mean ± 95 % t-interval half-width over seeds; `p` = one-sided t-test of MC accuracy > chance "
        f"(1/{cfg.data.distractors + 1}); `Δ` = gain of a phase-2 point over its phase-2 start, with its one-sided paired p "
        "(paper Appendix D).", "", "## Choice of setting", "", why, ""]
    md += ["## Table 1 layout", "", f"Key-token prompt at the phase-2 start (all facts); train and test prompts at the last "
           f"phase-2 point ({split} facts). Generation accuracy / object probability.", ""]
    hdr = ["group", "start", "key acc", "key prob", "phase 2", "train acc", "train prob", "test acc", "test prob"]
    trows = []
    for r in t1.to_dict("records"):
        f = lambda c: "–" if not np.isfinite(r[c]) else f"{r[c]:.3f}" + (f" ± {r[c + ':ci95']:.3f}" if np.isfinite(r[c + ":ci95"]) else "")  # noqa: E731
        trows.append([r["group"], r["start"], f("key:gen_correct"), f("key:object_prob"), r["phase2"], f("train:gen_correct"),
                      f("train:object_prob"), f("test:gen_correct"), f("test:object_prob")])
    md += _md_table(hdr, trows) + [""]
    kinds = [k for k in dict.fromkeys(k for r in exp.runs for k in r.kinds()) if k in set(stats["kind"])]
    for metric, label in TABLE_METRICS.items():
        s = stats[(stats["metric"] == metric)]
        if s.empty:
            continue
        md += [f"## {label} per stage ({split} facts)", ""]
        rows = []
        for g, st in zip(stages["group"], stages["stage"]):
            cells = []
            for k in kinds:
                r = s[(s["group"] == g) & (s["stage"] == st) & (s["kind"] == k) & (s["split"] == split)]
                cells.append(_cell(r.iloc[0] if len(r) else None, gain=True))
            rows.append([g, st, *cells])
        md += _md_table(["group", "stage", *kinds], rows) + [""]
    md += _sft_section(stats, labels, kinds)
    icl = [k for k in kinds if is_icl_kind(k)]
    if icl:
        md += ["## ICL (base model, paper §5 / B.5) vs ours on the same questions, all facts", ""]
        rows = []
        for g in labels:
            s = stats[(stats["group"] == g) & (stats["split"] == "all") & (stats["metric"] == "gen_correct")]
            last = last_phase2(stats[stats["group"] == g])
            for k in icl:
                q = k[4:] if k.startswith("icl-") else "test"
                a = s[(s["stage"] == "base") & (s["kind"] == k)]
                b = s[(s["stage"] == last) & (s["kind"] == q)]
                rows.append([g, q, _cell(a.iloc[0] if len(a) else None), f"{last}: " + _cell(b.iloc[0] if len(b) else None)])
        md += _md_table(["group", "questions", "ICL gen acc", "ours gen acc"], rows) + [""]
    mem = _memorized_mc(groups, split)
    if mem:
        md += ["## MC accuracy with memorized distractors (`mc_memorized.csv`)", "", *mem, ""]
    if len(reps):
        md += ["## Representations (where captured)", ""]
        rows = [[r.group, r.quantity, r.stage, f"{r.mean:.3f} (n={r.count})"] for r in reps.itertuples()]
        md += _md_table(["group", "quantity", "stage", "value"], rows) + [""]
    if figures:
        md += ["## Figures", "", *(f"![{f}]({f}.png)" for f in figures), ""]
    md += ["Files: `stats.csv` (every cell), `stages.csv`, `table1.csv`, `selection.csv`" + (", `representations.csv`" if len(reps) else "")
           + ", figures as PNG/PDF/SVG with their data as CSV.", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    return Report(exp.name, out, stats, split, in_progress)


def _sft_section(stats: pd.DataFrame, groups: Sequence[str], kinds: Sequence[str]) -> list[str]:
    """Markdown: the paper's SFT baseline vs ours as §5 compares them (B.5, Tables 5–6): the last
    phase-2 point and the last SFT point of each group, with their total training tokens, on the
    train, test and translated prompts of *all* facts (SFT trains every fact)."""
    if not (stats["series"] == "sft").any():
        return []
    cols = [k for k in kinds if k in ("train", "test") or k.startswith("translated-")]
    out = ["## SFT baseline vs ours, all facts (paper §5, Fig. 5)", ""]
    for metric, label in TABLE_METRICS.items():
        rows = []
        for g in groups:
            s = stats[(stats["group"] == g) & (stats["split"] == "all") & (stats["metric"] == metric)]
            sft = list(dict.fromkeys(s.loc[s["series"] == "sft", "stage"]))
            for what, stage in (("ours", last_phase2(stats[stats["group"] == g])), ("SFT", sft[-1] if sft else None)):
                if stage is None:
                    continue
                tok = s.loc[s["stage"] == stage, "total_tokens"]
                cells = [_cell(r.iloc[0]) if len(r := s[(s["stage"] == stage) & (s["kind"] == k)]) else "–" for k in cols]
                rows.append([g, f"{what} ({stage})", f"{tok.iloc[0]:,.0f}" if len(tok) and np.isfinite(tok.iloc[0]) else "?", *cells])
        out += [f"{label}:", "", *_md_table(["group", "model", "total tokens", *cols], rows), ""]
    return out


def _memorized_mc(groups: dict[str, list[Run]], split: str) -> list[str]:
    """Markdown rows from each run's ``mc_memorized.csv`` (``scripts/mc_memorized.py``): mean ±
    95 % CI over seeds and the one-sided test against chance, per group × checkpoint × kind."""
    rows = []
    for g, runs in groups.items():
        parts = [pd.read_csv(r.root / "mc_memorized.csv").assign(run=i) for i, r in enumerate(runs) if (r.root / "mc_memorized.csv").is_file()]
        if not parts:
            continue
        t = pd.concat(parts, ignore_index=True)
        chance = 1.0 / (runs[0].config.data.distractors + 1)
        for (c, k), d in t[t["split"] == split].groupby(["checkpoint", "kind"], sort=False):
            r = one_sided_t(d["mc_correct"].to_numpy(dtype=float), chance)
            ci = f" ± {r['ci95']:.3f}" if np.isfinite(r["ci95"]) else " (n=1)"
            p = f" p={r['p']:.2g}" if np.isfinite(r["p"]) else ""
            rows.append([g, str(c), str(k), f"{r['mean']:.3f}{ci}{p}"])
    return _md_table(["group", "checkpoint", "kind", f"MC acc, memorized distractors ({split})"], rows) if rows else []


def report(targets: Sequence[str | Path], out: str | Path | None = None, runs_dir: str | Path = "runs") -> list[Report]:
    """``rotelab report``: one report per experiment found in ``targets`` (see
    :func:`find_experiments`); with several experiments, ``out`` holds one folder per experiment."""
    exps = find_experiments(targets, runs_dir)
    if not exps:
        raise RotelabError("rotelab report: no runs found")
    if out is not None and len(exps) > 1:
        return [write_report(e, Path(out) / e.name) for e in exps]
    return [write_report(e, out) for e in exps]


__all__ = ["Experiment", "Report", "STAT_COLUMNS", "check_group", "find_experiments", "group_statistics",
           "parse_run_name", "report", "run_status", "select_setting", "write_report"]
