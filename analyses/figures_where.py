"""Figures of "where the fact lives" (issue 16): layer × checkpoint heatmaps of the logit lens, the
relation probes and CKA drift, one panel per kind, and the generalization-onset histograms.

Same conventions as :mod:`rotelab.analyses.figures`: every function returns the ``Figure`` (its
plotted data as ``fig.rotelab_data``) and, unless ``save=False``, writes PNG/PDF/SVG and the data
as CSV into ``out_dir`` (default ``run.figures_dir``). Dotted vertical lines mark phase changes.

| function | data |
|---|---|
| :func:`plot_logit_lens` | ``logit_lens_logprob`` / ``logit_lens_rank``: mean P, log P or rank of the object's first token |
| :func:`plot_probe` | ``probe_relation_acc`` or ``probe_transfer_acc`` |
| :func:`plot_cka` | ``cka_prev`` or ``cka_base`` |
| :func:`plot_onset_histogram` | the ``onset`` table: facts per onset checkpoint, per relation × kind |
| :func:`plot_causal_trace` | the ``causal_trace`` table: mean effect per layer × position, per checkpoint × kind |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rotelab.errors import RotelabError
from rotelab.facts import split_mask

from ._common import open_store
from .figure_io import STYLE, plt
from .figure_io import checkpoint_order as _order
from .figure_io import finish as _finish

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from rotelab.run import Run

LENS_VALUES = {"prob": "mean P(first object token)", "logprob": "mean log P(first object token)",
               "rank": "mean rank of the first object token"}
DERIVED_LABELS = {"probe_relation_acc": "relation probe accuracy (folds by fact)",
                  "probe_transfer_acc": "relation probe, trained on key prompts",
                  "cka_prev": "linear CKA with the previous checkpoint", "cka_base": "linear CKA with base"}


def _phase_lines(ax: Any, run: Run, cps: Sequence[str]) -> None:
    phase = {e.id: e.phase for e in run.checkpoints()}
    for i in range(1, len(cps)):
        if phase.get(cps[i]) != phase.get(cps[i - 1]):
            ax.axvline(i - 0.5, color="k", linestyle=":", linewidth=0.8)


def heatmap_panels(run: Run, data: pd.DataFrame, value: str, *, title: str, label: str, name: str,
                   vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
                   out_dir: str | Path | None = None, save: bool = True, style: Mapping[str, Any] | None = None) -> Figure:
    """One layer × checkpoint heatmap of ``data[value]`` per kind (``data``: kind, checkpoint,
    layer, value columns), checkpoints in series order."""
    if data.empty or not np.isfinite(data[value].to_numpy(dtype=float)).any():
        raise RotelabError(f"{run.store_path}: no {value} values to plot (run `rotelab analyze` first)")
    order = _order(run)
    kinds = list(dict.fromkeys(data["kind"]))
    with plt.rc_context({**STYLE, **(style or {}), "axes.grid": False}):
        cps_all = sorted(set(data["checkpoint"]), key=lambda c: order.get(c, 0))
        n_l = data["layer"].nunique()
        w, h = 1.4 + 0.32 * len(cps_all), 1.3 + 0.11 * n_l
        ncol = min(3, len(kinds))
        nrow = -(-len(kinds) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol, h * nrow), squeeze=False)
        flat = list(axes.ravel())
        for ax in flat[len(kinds):]:
            ax.set_visible(False)
        lo = vmin if vmin is not None else float(np.nanmin(data[value]))
        hi = vmax if vmax is not None else float(np.nanmax(data[value]))
        im = None
        for ax, k in zip(flat, kinds):
            grid = (data[data["kind"] == k].pivot_table(index="layer", columns="checkpoint", values=value, aggfunc="mean")
                    .reindex(columns=cps_all).sort_index())
            im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", origin="lower", cmap=cmap, vmin=lo, vmax=hi,
                           interpolation="nearest")
            ax.set_xticks(range(len(cps_all)), cps_all, rotation=60, ha="right")
            step = max(1, len(grid.index) // 8)
            ax.set_yticks(range(0, len(grid.index), step), [str(v) for v in grid.index[::step]])
            ax.set_xlabel("checkpoint")
            ax.set_ylabel("layer")
            ax.set_title(k)
            _phase_lines(ax, run, cps_all)
        fig.suptitle(title)
        fig.tight_layout()
        if im is not None:
            fig.colorbar(im, ax=flat[: len(kinds)], shrink=0.8, label=label)
    return _finish(fig, data, name, run, out_dir, save)


def _split_select(df: pd.DataFrame, split: str) -> tuple[pd.DataFrame, str]:
    if split != "all" and split_mask(df["split"], split).any():
        return df[split_mask(df["split"], split)], split
    return df, "all"


def plot_logit_lens(run: Run, kinds: Sequence[str] | None = None, *, value: str = "prob", split: str = "heldout",
                    name: str | None = None, out_dir: str | Path | None = None, save: bool = True,
                    style: Mapping[str, Any] | None = None) -> Figure:
    """Logit lens as layer × checkpoint heatmaps, one per kind: the mean over the ``split`` items
    (``all`` when the run has no such split) of ``value`` — ``prob`` (exp of the stored
    log-probability of the object's first token), ``logprob`` or ``rank`` (0 = top token)."""
    from .logit_lens import logit_lens_table

    if value not in LENS_VALUES:
        raise RotelabError(f"logit lens figure: value must be one of {', '.join(LENS_VALUES)}, got {value!r}")
    t = logit_lens_table(open_store(run, "r"), kinds)
    if t.empty:
        raise RotelabError(f"{run.store_path}: no logit lens values (run `rotelab analyze` with analyses.logit_lens)")
    t, split = _split_select(t, split)
    t = t.assign(prob=np.exp(t["logprob"]))
    data = t.groupby(["kind", "checkpoint", "layer"], sort=False)[value].mean().reset_index().assign(split=split)
    return heatmap_panels(run, data, value, title=f"logit lens: {LENS_VALUES[value]} ({split} facts)",
                          label=LENS_VALUES[value], name=name or f"logit_lens_{value}",
                          vmin=0.0 if value == "prob" else None, cmap="viridis_r" if value == "rank" else "viridis",
                          out_dir=out_dir, save=save, style=style)


def derived_table(run: Run, array: str, kinds: Sequence[str] | None = None) -> pd.DataFrame:
    """A stored [checkpoint, layer] derived array of every kind that has it, tidy:
    ``kind, checkpoint, layer, <array>`` (committed, finite cells)."""
    st = open_store(run, "r")
    out = []
    for k in kinds or st.kinds():
        g = st.kind(k)
        if array not in g.derived_arrays():
            continue
        a = g.read_derived(array)
        ci, li = (x.ravel() for x in np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), indexing="ij"))
        out.append(pd.DataFrame({"kind": k, "checkpoint": np.asarray(g.checkpoints)[ci], "layer": np.asarray(g.layers)[li],
                                 array: a.ravel()}))
    cols = ["kind", "checkpoint", "layer", array]
    df = pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)
    return df[np.isfinite(df[array].to_numpy(dtype=float))][cols].reset_index(drop=True)


def plot_probe(run: Run, array: str = "probe_relation_acc", kinds: Sequence[str] | None = None, *, name: str | None = None,
               out_dir: str | Path | None = None, save: bool = True, style: Mapping[str, Any] | None = None) -> Figure:
    """Relation-probe accuracy (``probe_relation_acc`` or ``probe_transfer_acc``) as layer ×
    checkpoint heatmaps, one per kind, on a 0–1 scale; chance (1 / relations) in the title."""
    if array not in ("probe_relation_acc", "probe_transfer_acc"):
        raise RotelabError(f"probe figure: array must be probe_relation_acc or probe_transfer_acc, got {array!r}")
    data = derived_table(run, array, kinds)
    chance = 1 / max(1, len(run.config.data.relations))
    return heatmap_panels(run, data, array, title=f"{DERIVED_LABELS[array]} (chance {chance:.2f})",
                          label="accuracy", name=name or array, vmin=0.0, vmax=1.0, out_dir=out_dir, save=save, style=style)


def plot_cka(run: Run, array: str = "cka_base", kinds: Sequence[str] | None = None, *, name: str | None = None,
             out_dir: str | Path | None = None, save: bool = True, style: Mapping[str, Any] | None = None) -> Figure:
    """Linear CKA drift (``cka_base`` or ``cka_prev``) as layer × checkpoint heatmaps, one per kind."""
    if array not in ("cka_prev", "cka_base"):
        raise RotelabError(f"CKA figure: array must be cka_prev or cka_base, got {array!r}")
    data = derived_table(run, array, kinds)
    return heatmap_panels(run, data, array, title=DERIVED_LABELS[array], label="linear CKA", name=name or array,
                          vmax=1.0, out_dir=out_dir, save=save, style=style)


def _table_rows(run: Run, table: str, how: str, kinds: Sequence[str] | None, split: str) -> tuple[pd.DataFrame, str]:
    """The store table ``table``'s rows of ``kinds`` and ``split`` (see :func:`_split_select`); a
    one-line error saying ``how`` to make it when it is missing or has no such rows."""
    t = open_store(run, "r").read_table(table)
    if t is None or t.empty:
        raise RotelabError(f"{run.store_path}: no {table} table ({how})")
    if kinds is not None:
        t = t[t["kind"].isin(kinds)]
    t, split = _split_select(t, split)
    if t.empty:
        raise RotelabError(f"{run.store_path}: no {table} rows for the selected kinds")
    return t, split


def plot_onset_histogram(run: Run, kinds: Sequence[str] | None = None, *, split: str = "heldout", name: str = "onset",
                         out_dir: str | Path | None = None, save: bool = True, style: Mapping[str, Any] | None = None) -> Figure:
    """Generalization onset: per kind (rows) and relation (columns), the number of ``split`` facts
    whose onset (:mod:`rotelab.analyses.onset`) is each checkpoint of the main series, plus
    ``never``."""
    t, split = _table_rows(run, "onset", "run `rotelab eval`, then `rotelab analyze`", kinds, split)
    cps = [e.id for e in run.checkpoints() if e.series == "main"]
    bins = [*cps, "never"]
    t = t.assign(bin=t["onset"].astype(str).replace("", "never"))
    data = (t.groupby(["kind", "relation", "bin"]).size().rename("facts").reset_index())
    ks, rels = list(dict.fromkeys(t["kind"])), sorted(set(t["relation"]))
    full = pd.MultiIndex.from_product([ks, rels, bins], names=["kind", "relation", "bin"])
    data = data.set_index(["kind", "relation", "bin"]).reindex(full, fill_value=0).reset_index().assign(split=split)
    with plt.rc_context({**STYLE, **(style or {})}):
        fig, axes = plt.subplots(len(ks), len(rels), figsize=(0.3 * len(bins) * len(rels) + 1.5, 1.8 * len(ks) + 0.6),
                                 squeeze=False, sharex=True, sharey=True)
        for r, k in enumerate(ks):
            for c, rel in enumerate(rels):
                ax = axes[r][c]
                d = data[(data["kind"] == k) & (data["relation"] == rel)].set_index("bin").reindex(bins)
                colors = ["#999999" if b == "never" else "#7570b3" for b in bins]
                ax.bar(range(len(bins)), d["facts"].to_numpy(), color=colors)
                ax.set_title(f"{k} · {rel}")
                ax.set_xticks(range(len(bins)), bins, rotation=60, ha="right")
                _phase_lines(ax, run, cps)
                if c == 0:
                    ax.set_ylabel("facts")
        fig.suptitle(f"generalization onset ({split} facts): first checkpoint correct and staying correct")
        fig.tight_layout()
    return _finish(fig, data, name, run, out_dir, save)


def plot_causal_trace(run: Run, kinds: Sequence[str] | None = None, *, split: str = "heldout", value: str = "effect",
                      name: str = "causal_trace", out_dir: str | Path | None = None, save: bool = True,
                      style: Mapping[str, Any] | None = None) -> Figure:
    """Causal tracing (ROME Fig. 1 style): per traced checkpoint (columns) and kind (rows), the mean
    ``value`` (``effect``, or ``restored``) over the ``split`` items as a layer × position heatmap."""
    t, split = _table_rows(run, "causal_trace", "enable analyses.causal_trace, then `rotelab analyze`", kinds, split)
    order = {c: i for i, c in enumerate(_order(run))}
    cps = sorted(set(t["checkpoint"]), key=lambda c: order.get(c, len(order)))
    ks = list(dict.fromkeys(t["kind"]))
    pos_order = [p for p in ("subject_last", "key", "last", "all") if p in set(t["position"])]
    data = (t.groupby(["checkpoint", "kind", "layer", "position"])[value].mean().rename(value).reset_index().assign(split=split))
    layers = sorted(set(data["layer"]))
    with plt.rc_context({**STYLE, **(style or {}), "axes.grid": False}):
        fig, axes = plt.subplots(len(ks), len(cps), figsize=(2.2 * len(cps) + 1.2, 0.16 * len(layers) * len(ks) + 1.2),
                                 squeeze=False, sharey=True)
        im = None
        for r, k in enumerate(ks):
            for c, ck in enumerate(cps):
                ax = axes[r][c]
                d = data[(data["kind"] == k) & (data["checkpoint"] == ck)]
                grid = d.pivot(index="layer", columns="position", values=value).reindex(index=layers, columns=pos_order)
                im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", origin="lower", cmap="magma",
                               vmin=0.0 if value == "effect" else None, vmax=1.0 if value == "effect" else None)
                ax.set_xticks(range(len(pos_order)), pos_order, rotation=30, ha="right")
                ax.set_title(f"{ck} · {k}")
                if c == 0:
                    ax.set_ylabel("layer (resid)")
        if im is not None:
            fig.colorbar(im, ax=axes, shrink=0.8, label="restoration effect" if value == "effect" else value)
        fig.suptitle(f"causal tracing ({split} facts): restoring one clean state after corrupting the subject")
    return _finish(fig, data, name, run, out_dir, save)


def where_jobs(run: Run) -> list[tuple[str, Callable[[], Figure]]]:
    """The figures of this module for :func:`rotelab.analyses.figures.figures_run`."""
    return [
        ("logit_lens_prob", lambda: plot_logit_lens(run, value="prob")),
        ("logit_lens_rank", lambda: plot_logit_lens(run, value="rank")),
        ("probe_relation_acc", lambda: plot_probe(run, "probe_relation_acc")),
        ("probe_transfer_acc", lambda: plot_probe(run, "probe_transfer_acc")),
        ("cka_base", lambda: plot_cka(run, "cka_base")),
        ("cka_prev", lambda: plot_cka(run, "cka_prev")),
        ("onset", lambda: plot_onset_histogram(run)),
        ("causal_trace", lambda: plot_causal_trace(run)),
    ]


__all__ = ["derived_table", "heatmap_panels", "plot_causal_trace", "plot_cka", "plot_logit_lens", "plot_onset_histogram", "plot_probe",
           "where_jobs"]
