"""The paper's figures from a run's store, one function per figure.

Every function returns the matplotlib ``Figure`` (restyle it, or pass ``style=`` rcParams) and,
unless ``save=False``, writes ``<name>.png``, ``.pdf``, ``.svg`` and the plotted data as
``<name>.csv`` into ``out_dir`` (default ``run.figures_dir``). Matplotlib runs headless (Agg).
:func:`figures_run` renders every figure whose data exist and notes the ones it skips.
(Over 400 lines on purpose: one short function per paper figure, indexed by the table below; the
shared plumbing is in :mod:`.figure_io`, the where-analyses' figures in :mod:`.figures_where`.)

| function | paper | data |
|---|---|---|
| :func:`plot_metric_curves` | Fig. 3, 8 | metric per checkpoint × kind, one series (main or a baseline) |
| :func:`plot_token_curves` | Fig. 5 | metric vs total training tokens, one line per series |
| :func:`plot_generalization_grid` | Fig. 2 | final metric over several runs (k × P) |
| :func:`plot_projection_panels` | Fig. 7, 16 | ``proj_pca`` per stage, ΔCosSim in the titles |
| :func:`plot_delta_cossim_layers` | Fig. 17 | ``delta_cossim`` [checkpoint, layer] |
| :func:`plot_alignment` | Fig. 18, 20 | ``alignment`` table, cosine per kind and stage |
| :func:`plot_alignment_delta` | Fig. 19 | ``alignment`` table, ΔSimilarity per relation |
| :func:`plot_crosslingual` | Fig. 4, 13 | metric of test / translated / unrelated kinds |
| :func:`plot_patching_heatmap` | — | ``patching`` table, effect per layer × checkpoint |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from rotelab.errors import RotelabError  # noqa: E402
from rotelab.store import MissingDataError  # noqa: E402

from ._common import open_store, reference_checkpoint, stage_checkpoints  # noqa: E402
from .figure_io import STYLE, save_figure  # noqa: E402
from .figure_io import checkpoint_order as _order  # noqa: E402
from .figure_io import finish as _finish  # noqa: E402
from .metrics import METRIC_LABELS, metric_table  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from rotelab.run import Run

KIND_COLORS = {"key": "#1b9e77", "train": "#d95f02", "test": "#7570b3", "unrelated": "#999999", "zero": "#e7298a",
               "icl": "#66a61e", "reverse": "#a6761d", "translated-de": "#e6ab02", "translated-es": "#1f78b4",
               "translated-zh": "#b2df8a", "translated-ja": "#fb9a99"}
STAGE_LABELS = {"base": "base", "rote": "rote (last phase 1)", "generalization": "generalization (last phase 2)"}
Note = Callable[[str], None]


def _color(kind: str, i: int = 0) -> Any:
    return KIND_COLORS.get(kind, plt.get_cmap("tab10")(i % 10))


# --------------------------------------------------------------------------- data

def series_checkpoints(run: Run, series: str = "main") -> list[str]:
    """The checkpoint ids of one series in order; a baseline series starts from ``base`` (it is
    trained from it), so ``base`` leads every series."""
    entries = run.checkpoints()
    ids = [e.id for e in entries if e.series == series]
    if series != "main":
        ids = [e.id for e in entries if e.phase == "base"][:1] + ids
    return ids


def series_names(run: Run) -> list[str]:
    """``main`` first, then the baseline series in index order."""
    return list(dict.fromkeys(["main", *(e.series for e in run.checkpoints())]))


# --------------------------------------------------------------------------- Fig. 3

def plot_metric_curves(run: Run, metric: str = "object_prob", *, split: str = "heldout", kinds: Sequence[str] | None = None,
                       table: pd.DataFrame | None = None, name: str | None = None, out_dir: str | Path | None = None,
                       save: bool = True, style: Mapping[str, Any] | None = None, series: str = "main") -> Figure:
    """Fig. 3: ``metric`` over the checkpoints of one ``series`` (``main``: base → phase 1 → phase
    2 → inject; a baseline such as ``sft``: base → its own points, never chained after phase 2),
    one line per prompt kind (``split`` items; ``all`` when the run has no such split). Dashed
    vertical lines mark phase changes."""
    t = metric_table(run) if table is None else table
    t = t[(t["metric"] == metric) & t["checkpoint"].isin(series_checkpoints(run, series))]
    if not (t["split"] == split).any():
        split = "all"
    t = t[t["split"] == split]
    if kinds is not None:
        t = t[t["kind"].isin(kinds)]
    if t.empty:
        raise RotelabError(f"{run.root}: no {metric!r} values to plot (run `rotelab eval` first)")
    ids = series_checkpoints(run, series)
    order = {c: i for i, c in enumerate(ids)}
    t = t.groupby(["checkpoint", "phase", "kind"], sort=False)["value"].mean().reset_index()
    t["x"] = t["checkpoint"].map(order)
    t = t.sort_values(["kind", "x"])
    cps = sorted(set(t["checkpoint"]), key=lambda c: order.get(c, 0))
    with plt.rc_context({**STYLE, **(style or {})}):
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for i, (k, g) in enumerate(t.groupby("kind", sort=False)):
            ax.plot(g["x"], g["value"], marker="o", label=k, color=_color(k, i),
                    linestyle="--" if k == "unrelated" else "-")
        phase = {e.id: e.phase for e in run.checkpoints()}
        phases = [phase[c] for c in ids]
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(i - 0.5, color="k", linestyle=":", linewidth=0.8)
        ax.set_xticks([order[c] for c in cps], cps, rotation=60, ha="right")
        ax.set_xlabel("checkpoint")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(f"{METRIC_LABELS.get(metric, metric)} ({split} facts)" + ("" if series == "main" else f", series {series}"))
        ax.legend(ncol=2, frameon=False)
        fig.tight_layout()
    default = f"curves_{metric}" if series == "main" else f"curves_{metric}_{series}"
    return _finish(fig, t.drop(columns="x"), name or default, run, out_dir, save)


# --------------------------------------------------------------------------- Fig. 5

def plot_token_curves(run: Run, metric: str = "gen_correct", *, kind: str = "test", split: str = "all",
                      table: pd.DataFrame | None = None, name: str | None = None, out_dir: str | Path | None = None,
                      save: bool = True, style: Mapping[str, Any] | None = None) -> Figure:
    """Fig. 5: ``metric`` of ``kind`` against the total training tokens of each point
    (:attr:`rotelab.checkpoints.CheckpointEntry.total_tokens`), one line per series — ``main``
    (phase 1 + phase 2) and each baseline (``sft``: its own tokens), every line starting at
    ``base`` (0 tokens). Default ``split="all"``: the paper compares SFT and the two-phase model
    on the test prompts of all facts (Tables 5, 6)."""
    t = metric_table(run) if table is None else table
    t = t[(t["metric"] == metric) & (t["kind"] == kind) & (t["split"] == split)]
    entries = {e.id: e for e in run.checkpoints()}
    rows = []
    for s in series_names(run):
        for c in series_checkpoints(run, s):
            v = t[t["checkpoint"] == c]["value"]
            if v.empty or entries[c].total_tokens is None:
                continue
            rows.append((s, c, entries[c].phase, entries[c].total_tokens, float(v.mean())))
    data = pd.DataFrame(rows, columns=["series", "checkpoint", "phase", "total_tokens", "value"])
    if len(data) < 2:
        raise RotelabError(f"{run.root}: no {metric!r} values of kind {kind!r} with total training tokens to plot")
    with plt.rc_context({**STYLE, **(style or {})}):
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for i, (s, g) in enumerate(data.groupby("series", sort=False)):
            ax.plot(g["total_tokens"], g["value"], marker="o", label="memorize-then-generalize" if s == "main" else s,
                    color=plt.get_cmap("tab10")(i % 10))
        ax.set_xlabel("total training tokens")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(f"{METRIC_LABELS.get(metric, metric)}, {kind} prompts ({split} facts)")
        ax.legend(frameon=False)
        fig.tight_layout()
    return _finish(fig, data, name or f"tokens_{metric}", run, out_dir, save)


# --------------------------------------------------------------------------- Fig. 2

def plot_generalization_grid(runs: Sequence[Run], metric: str = "gen_correct", *, kind: str = "test",
                             split: str = "heldout", out_dir: str | Path | None = None, save: bool = True,
                             name: str = "generalization_grid", style: Mapping[str, Any] | None = None) -> Figure:
    """Fig. 2: ``metric`` of ``kind`` at each run's last checkpoint, as a grid of phase-2 k (rows)
    × P, the number of train prompts (columns); runs with the same (k, P) are averaged. ``out_dir``
    defaults to the first run's figures folder."""
    rows = []
    for r in runs:
        t = metric_table(r)
        t = t[(t["metric"] == metric) & (t["kind"] == kind)]
        if not (t["split"] == split).any():
            t = t[t["split"] == "all"]
        else:
            t = t[t["split"] == split]
        cps = [e.id for e in r.checkpoints() if e.id in set(t["checkpoint"])]
        if not cps:
            continue
        v = float(t[t["checkpoint"] == cps[-1]]["value"].mean())
        rows.append({"run": str(r.root), "k": r.config.phase2.k, "P": r.config.phase2.prompts, "checkpoint": cps[-1], "value": v})
    if not rows:
        raise RotelabError(f"generalization grid: none of the {len(runs)} runs has {metric!r} for kind {kind!r}")
    data = pd.DataFrame(rows)
    grid = data.groupby(["k", "P"])["value"].mean().unstack("P").sort_index(ascending=False)
    with plt.rc_context({**STYLE, **(style or {}), "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(0.6 * grid.shape[1] + 2.2, 0.45 * grid.shape[0] + 1.6))
        im = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0, vmax=max(1e-9, float(np.nanmax(grid.to_numpy()))), aspect="auto")
        for (i, j), v in np.ndenumerate(grid.to_numpy()):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 * np.nanmax(grid.to_numpy()) else "k")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
        ax.set_xlabel("number of training prompts P")
        ax.set_ylabel("facts per relation k")
        ax.set_title(f"{METRIC_LABELS.get(metric, metric)} on {kind} prompts")
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
    return _finish(fig, data, name, runs[0] if runs else None, out_dir, save)


# --------------------------------------------------------------------------- Fig. 7 / 16

def _last_layer(run: Run, kind: str) -> int:
    st = open_store(run, "r")
    return st.kind(kind).layers[-1]


def plot_projection_panels(run: Run, kind: str = "key", *, layer: int | None = None, checkpoints: Sequence[str] | None = None,
                           projection: str = "proj_pca", name: str | None = None, out_dir: str | Path | None = None,
                           save: bool = True, style: Mapping[str, Any] | None = None) -> Figure:
    """Fig. 7/16: one scatter panel per checkpoint (default: base, last phase 1, last phase 2) of
    ``kind``'s ``projection`` at ``layer`` (default: the last), coloured by relation, with the
    slab's ΔCosSim in each title."""
    st = open_store(run, "r")
    g = st.kind(kind)
    if projection not in g.derived_arrays():
        raise RotelabError(f"{run.store_path}: kind {kind!r} has no {projection!r} (run `rotelab analyze` first)")
    layer = g.layers[-1] if layer is None else layer
    if layer not in g.layers:
        raise RotelabError(f"{run.store_path}: layer {layer} out of range for kind {kind!r}")
    cps = list(checkpoints) if checkpoints is not None else list(dict.fromkeys(stage_checkpoints(run).values()))
    cps = [c for c in cps if c in g.checkpoints] or g.checkpoints[-1:]
    proj = g.read_derived(projection, checkpoints=cps, layers=[layer])[:, 0]  # [checkpoint, item, 2]
    dc = g.read_derived("delta_cossim", checkpoints=cps, layers=[layer])[:, 0] if "delta_cossim" in g.derived_arrays() else np.full(len(cps), np.nan)
    items = g.items
    rels = sorted(set(items["relation"]))
    frames = []
    with plt.rc_context({**STYLE, **(style or {}), "axes.grid": False}):
        fig, axes = plt.subplots(1, len(cps), figsize=(2.6 * len(cps), 2.6), squeeze=False)
        for ax, c, P, d in zip(axes[0], cps, proj, dc):
            for i, r in enumerate(rels):
                m = (items["relation"] == r).to_numpy()
                ax.scatter(P[m, 0], P[m, 1], s=6, alpha=0.8, color=plt.get_cmap("tab10")(i % 10), label=r)
            ax.set_title(f"{c}  ΔCosSim={d:.3f}" if np.isfinite(d) else f"{c}  ΔCosSim=n/a")
            ax.set_xlabel("PC 1" if "pca" in projection else "dim 1")
            ax.set_ylabel("PC 2" if "pca" in projection else "dim 2")
            frames.append(pd.DataFrame({"checkpoint": c, "layer": layer, "item": items["item"], "relation": items["relation"],
                                        "x": P[:, 0], "y": P[:, 1], "delta_cossim": d}))
        axes[0][-1].legend(frameon=False, markerscale=2, loc="best")
        fig.suptitle(f"{kind} prompts, layer {layer}")
        fig.tight_layout()
    return _finish(fig, pd.concat(frames, ignore_index=True), name or f"{projection}_{kind}_layer{layer}", run, out_dir, save)


# --------------------------------------------------------------------------- Fig. 17

def plot_delta_cossim_layers(run: Run, kinds: Sequence[str] | None = None, *, checkpoints: Sequence[str] | None = None,
                             name: str = "delta_cossim_layers", out_dir: str | Path | None = None, save: bool = True,
                             style: Mapping[str, Any] | None = None) -> Figure:
    """Fig. 17: ΔCosSim by layer, one panel per kind, one line per checkpoint (default: the stages)."""
    from .analyze import delta_cossim_table

    st = open_store(run, "r")
    t = delta_cossim_table(st, kinds)
    if t.empty:
        raise RotelabError(f"{run.store_path}: no ΔCosSim curves (run `rotelab analyze` first)")
    cps = list(checkpoints) if checkpoints is not None else list(dict.fromkeys(stage_checkpoints(run).values()))
    sel = t[t["checkpoint"].isin(cps)]
    if sel.empty:
        sel = t
        cps = list(dict.fromkeys(t["checkpoint"]))
    ks = list(dict.fromkeys(sel["kind"]))
    ncol = min(4, len(ks))
    nrow = -(-len(ks) // ncol)
    with plt.rc_context({**STYLE, **(style or {})}):
        fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.4 * nrow), squeeze=False, sharey=True)
        flat = list(axes.ravel())
        for ax in flat[len(ks):]:
            ax.set_visible(False)
        for ax, k in zip(flat, ks):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            for i, c in enumerate(cps):
                g = sel[(sel["kind"] == k) & (sel["checkpoint"] == c)].sort_values("layer")
                if len(g):
                    ax.plot(g["layer"], g["delta_cossim"], marker="o", label=c, color=plt.get_cmap("viridis")(i / max(1, len(cps) - 1)))
            ax.set_title(k)
            ax.set_xlabel("layer")
        for row in axes:
            row[0].set_ylabel("ΔCosSim")
        flat[len(ks) - 1].legend(frameon=False)
        fig.tight_layout()
    return _finish(fig, sel, name, run, out_dir, save)


# --------------------------------------------------------------------------- Fig. 18–20

def _alignment(run: Run) -> pd.DataFrame:
    st = open_store(run, "r")
    t = st.read_table("alignment")
    if t is None or t.empty:
        raise RotelabError(f"{run.store_path}: no alignment table (run `rotelab analyze` with captured key kind)")
    return t


def plot_alignment(run: Run, kinds: Sequence[str] = ("train", "test", "unrelated"), *, layer: int | None = None,
                   checkpoints: Sequence[str] | None = None, split: str = "all", name: str | None = None,
                   out_dir: str | Path | None = None, save: bool = True, style: Mapping[str, Any] | None = None) -> Figure:
    """Fig. 18 (and 20 with translated kinds): mean cosine between the key token and each kind's
    prompts (mean over relations; error bars: std over relations) at ``layer`` (default: last),
    bars per checkpoint (default: the reference checkpoint and the last one)."""
    t = _alignment(run)
    t = t[t["kind"].isin(kinds) & (t["split"] == split)]
    if t.empty:
        raise RotelabError(f"{run.store_path}: alignment has no rows for kinds {list(kinds)}")
    layer = int(t["layer"].max()) if layer is None else layer
    t = t[t["layer"] == layer]
    order = _order(run)
    if checkpoints is None:
        ref = reference_checkpoint(run)
        last = max(set(t["checkpoint"]), key=lambda c: order.get(c, -1))
        checkpoints = list(dict.fromkeys([ref, last]))
    data = t[t["checkpoint"].isin(checkpoints)].groupby(["checkpoint", "kind"])["cosine"].agg(["mean", "std"]).reset_index()
    ks = [k for k in kinds if k in set(data["kind"])]
    with plt.rc_context({**STYLE, **(style or {})}):
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(ks), 2.8))
        w = 0.8 / max(1, len(checkpoints))
        for i, c in enumerate(checkpoints):
            d = data[data["checkpoint"] == c].set_index("kind").reindex(ks)
            ax.bar(np.arange(len(ks)) + (i - (len(checkpoints) - 1) / 2) * w, d["mean"], w, yerr=d["std"], capsize=2,
                   label=c, color=plt.get_cmap("Set2")(i))
        ax.set_xticks(range(len(ks)), ks, rotation=20)
        ax.set_xlabel("prompt kind")
        ax.set_ylabel("cosine similarity to key token")
        ax.set_title(f"key-token alignment, layer {layer}")
        ax.legend(frameon=False)
        fig.tight_layout()
    return _finish(fig, data.assign(layer=layer), name or "alignment", run, out_dir, save)


def plot_alignment_delta(run: Run, kinds: Sequence[str] = ("train", "test", "unrelated"), *, layer: int | None = None,
                         checkpoint: str | None = None, split: str = "all", name: str = "alignment_delta",
                         out_dir: str | Path | None = None, save: bool = True, style: Mapping[str, Any] | None = None) -> Figure:
    """Fig. 19: ΔSimilarity (``checkpoint`` − the reference; default: the last checkpoint) per
    relation, bars per kind, at ``layer`` (default: last)."""
    t = _alignment(run)
    t = t[t["kind"].isin(kinds) & (t["split"] == split)]
    if t.empty:
        raise RotelabError(f"{run.store_path}: alignment has no rows for kinds {list(kinds)}")
    layer = int(t["layer"].max()) if layer is None else layer
    order = _order(run)
    checkpoint = checkpoint or max(set(t["checkpoint"]), key=lambda c: order.get(c, -1))
    data = t[(t["layer"] == layer) & (t["checkpoint"] == checkpoint)][["relation", "kind", "delta", "reference"]]
    rels = sorted(set(data["relation"]))
    ks = [k for k in kinds if k in set(data["kind"])]
    with plt.rc_context({**STYLE, **(style or {})}):
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rels), 2.8))
        w = 0.8 / max(1, len(ks))
        for i, k in enumerate(ks):
            d = data[data["kind"] == k].set_index("relation").reindex(rels)
            ax.bar(np.arange(len(rels)) + (i - (len(ks) - 1) / 2) * w, d["delta"], w, label=k, color=_color(k, i))
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_xticks(range(len(rels)), rels, rotation=20)
        ax.set_xlabel("relation")
        ax.set_ylabel("ΔSimilarity")
        ref = data["reference"].iloc[0] if len(data) else "?"
        ax.set_title(f"{checkpoint} − {ref}, layer {layer}")
        ax.legend(frameon=False)
        fig.tight_layout()
    return _finish(fig, data.assign(checkpoint=checkpoint, layer=layer), name, run, out_dir, save)


# --------------------------------------------------------------------------- Fig. 4 / 13

def plot_crosslingual(run: Run, metric: str = "gen_correct", *, split: str = "heldout", table: pd.DataFrame | None = None,
                      name: str | None = None, out_dir: str | Path | None = None, save: bool = True,
                      style: Mapping[str, Any] | None = None) -> Figure:
    """Fig. 4/13: ``metric`` over the phase-2 checkpoints (from the last phase-1 one) for the test
    prompts and their translations (solid) and the unrelated prompts (dashed)."""
    t = metric_table(run) if table is None else table
    kinds = [k for k in dict.fromkeys(t["kind"]) if k == "test" or k.startswith("translated-")]
    if not any(k.startswith("translated-") for k in kinds):
        raise RotelabError(f"{run.root}: no translated kinds evaluated")
    main = [e for e in run.checkpoints() if e.series == "main"]
    p1 = [e.id for e in main if e.phase == "phase1"]
    cps = (p1[-1:] + [e.id for e in main if e.phase == "phase2"]) or [e.id for e in main]
    sub = t[t["checkpoint"].isin(cps) & t["kind"].isin([*kinds, "unrelated"])]
    fig = plot_metric_curves(run, metric, split=split, table=sub, save=False, style=style)
    ax = fig.axes[0]
    ax.set_title(f"{METRIC_LABELS.get(metric, metric)}: test prompts across languages")
    data = sub[(sub["metric"] == metric)]
    return _finish(fig, data, name or f"crosslingual_{metric}", run, out_dir, save)


# --------------------------------------------------------------------------- patching

def plot_patching_heatmap(run: Run, source_kind: str = "key", target_kind: str = "test", *, metric: str | None = None,
                          value: str = "effect", position: str = "last", name: str | None = None,
                          out_dir: str | Path | None = None, save: bool = True, style: Mapping[str, Any] | None = None) -> Figure:
    """Mean patching ``value`` (effect, patched, normalized) over items as a layer × checkpoint
    heatmap, from within-checkpoint patching of ``source_kind`` into ``target_kind``."""
    st = open_store(run, "r")
    t = st.read_table("patching")
    if t is None or t.empty:
        raise RotelabError(f"{run.store_path}: no patching table (rotelab.analyses.patch or analyses.patching.enabled: true)")
    t = t[(t["source_kind"] == source_kind) & (t["target_kind"] == target_kind) & (t["position"] == position)
          & (t["source_checkpoint"] == t["target_checkpoint"])]
    if metric is not None:
        t = t[t["metric"] == metric]
    if t.empty:
        raise RotelabError(f"{run.store_path}: no within-checkpoint patching {source_kind} → {target_kind} at {position}")
    metric = metric or str(t["metric"].iloc[0])
    t = t[t["metric"] == metric]
    data = t.groupby(["target_checkpoint", "layer"])[value].mean().reset_index()
    order = _order(run)
    cps = sorted(set(data["target_checkpoint"]), key=lambda c: order.get(c, 0))
    grid = data.pivot(index="layer", columns="target_checkpoint", values=value).reindex(columns=cps).sort_index()
    with plt.rc_context({**STYLE, **(style or {}), "axes.grid": False}):
        fig, ax = plt.subplots(figsize=(1.6 + 0.45 * len(cps), 1.2 + 0.16 * grid.shape[0]))
        lim = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
        im = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(cps)), cps, rotation=60, ha="right")
        ax.set_yticks(range(grid.shape[0]), [str(v) for v in grid.index])
        ax.set_xlabel("checkpoint")
        ax.set_ylabel("layer")
        ax.set_title(f"patching {source_kind} → {target_kind}: {value} on {metric}")
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
    return _finish(fig, data, name or f"patching_{source_kind}_to_{target_kind}", run, out_dir, save)


# --------------------------------------------------------------------------- all of them

def figures_run(run: Run, *, note: Note = print) -> dict[str, str]:
    """Render every figure whose data exist into ``run.figures_dir``; returns name → PNG path or
    ``"skipped: <why>"`` (each skip is also passed to ``note``)."""
    out: dict[str, str] = {}
    jobs: list[tuple[str, Callable[[], Figure]]] = []
    run.checkpoints()  # a corrupt index is an error, not a reason to draw nothing
    try:
        table = metric_table(run)
    except RotelabError as e:
        table = pd.DataFrame(columns=["checkpoint", "phase", "kind", "split", "metric", "value"])
        note(f"metric curves: {e}")
    for m in ("object_prob", "mc_correct", "gen_correct"):
        jobs.append((f"curves_{m}", lambda m=m: plot_metric_curves(run, m, table=table)))
        for s in series_names(run)[1:]:
            jobs.append((f"curves_{m}_{s}", lambda m=m, s=s: plot_metric_curves(run, m, table=table, series=s)))
        jobs.append((f"crosslingual_{m}", lambda m=m: plot_crosslingual(run, m, table=table)))
    if len(series_names(run)) > 1:
        jobs.append(("tokens_gen_correct", lambda: plot_token_curves(run, "gen_correct", table=table)))
    kinds = []
    try:
        st = open_store(run, "r")
        kinds = st.kinds()
    except MissingDataError as e:  # no store yet; a foreign or broken one is an error
        note(f"store: {e}")
    for k in kinds:
        if "proj_pca" in st.kind(k).derived_arrays():
            jobs.append((f"proj_pca_{k}", lambda k=k: plot_projection_panels(run, k)))
    jobs.append(("delta_cossim_layers", lambda: plot_delta_cossim_layers(run)))
    jobs.append(("alignment", lambda: plot_alignment(run)))
    jobs.append(("alignment_delta", lambda: plot_alignment_delta(run)))
    langs = tuple(k for k in kinds if k.startswith("translated-"))
    if langs:
        jobs.append(("alignment_languages", lambda: plot_alignment(run, ("test", *langs), name="alignment_languages")))
    cfg = run.config.analyses.patching
    jobs.append(("patching", lambda: plot_patching_heatmap(run, cfg.source_kind, cfg.target_kind)))
    from .figures_where import where_jobs  # logit lens, probes, CKA, onset (issue 16)

    jobs.extend(where_jobs(run))
    for name, job in jobs:
        try:
            fig = job()
            plt.close(fig)
            out[name] = str(run.figures_dir / f"{fig.get_label()}.png")
        except RotelabError as e:
            out[name] = f"skipped: {e}"
            note(f"figure {name}: skipped ({e})")
    return out


__all__ = [
    "KIND_COLORS", "STYLE", "figures_run", "metric_table", "plot_alignment", "plot_alignment_delta", "plot_crosslingual",
    "plot_delta_cossim_layers", "plot_generalization_grid", "plot_metric_curves", "plot_patching_heatmap",
    "plot_projection_panels", "plot_token_curves", "save_figure", "series_checkpoints", "series_names",
]
