"""The ``analyze`` stage: ΔCosSim curves, projections, key-token alignment, (optionally)
activation patching, and the logit lens / probes / CKA / onset steps of :mod:`.where` over a
run's store. Every part does only what is missing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rotelab.errors import RotelabError

from ._common import FINAL_NORM_LAYER, captured_kinds, final_norm_committed, open_store, read_state, reference_checkpoint
from .alignment import ALIGNMENT_COLUMNS, alignment_by_relation, with_delta
from .cossim import delta_cossim
from .projections import project_kinds

if TYPE_CHECKING:
    from rotelab.run import Run
    from rotelab.store import KindGroup, Store

Note = Callable[[str], None]


def _tqdm(it: Any, progress: bool, **kw: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(it, disable=not progress, **kw)


# --------------------------------------------------------------------------- ΔCosSim

def delta_cossim_kind(group: KindGroup, *, progress: bool = True, note: Note = print) -> int:
    """Write the derived array ``delta_cossim`` float32 [checkpoint, layer] of one kind group,
    one committed row per checkpoint, on the raw hidden states (attrs ``representation``), and
    ``delta_cossim_final_norm`` [checkpoint] on the ``final_norm`` state. A row is (re)computed
    when it is not committed or when a layer has been captured since. A slab with NaN rows
    (partial or overflowed) gives NaN and a note, never a number over a subset. Returns the number
    of ``delta_cossim`` rows written."""
    rel = group.items["relation"].astype(str).to_numpy()
    if len(np.unique(rel)) < 2:
        note(f"delta_cossim [{group.kind}]: needs at least two relations; skipped")
        return 0
    acts = group.committed("activations")
    have = "delta_cossim" in group.derived_arrays()
    done = group.committed("delta_cossim") if have else np.zeros(len(group.checkpoints), bool)
    stored = group.read_derived("delta_cossim") if have else None
    written = 0
    todo = []
    for ci, c in enumerate(group.checkpoints):
        if not acts[ci].any():
            continue
        if done[ci] and stored is not None and not (acts[ci] & np.isnan(stored[ci])).any():
            continue
        todo.append((ci, c))
    for ci, c in _tqdm(todo, progress and bool(todo), desc=f"delta_cossim [{group.kind}]"):
        row = np.full(len(group.layers), np.nan, dtype=np.float32)
        bad = []
        for li, v in enumerate(group.layers):
            if not acts[ci, li]:
                continue
            try:
                row[li] = delta_cossim(group.read_slab(c, v), rel)
            except RotelabError as e:
                bad.append(f"layer {v}: {e}")
        if bad:
            note(f"delta_cossim [{group.kind}] {c}: left NaN at {len(bad)} slab(s) ({bad[0]})")
        group.write_derived("delta_cossim", ("checkpoint", "layer"), row, index={"checkpoint": c},
                            cell_dims=("checkpoint",), attrs=DELTA_COSSIM_ATTRS)
        written += 1
    _delta_cossim_final_norm(group, rel, note)
    return written


DELTA_COSSIM_ATTRS = {"definition": "paper Appendix F.3", "representation": "raw hidden states: layer 0 = embedding output, "
                      "layer i = output of block i (the last layer is before the final norm; see delta_cossim_final_norm)"}


def _delta_cossim_final_norm(group: KindGroup, rel: np.ndarray, note: Note) -> int:
    """``delta_cossim_final_norm`` float32 [checkpoint]: ΔCosSim of the ``final_norm`` state
    (the analyses' layer :data:`FINAL_NORM_LAYER`), for the checkpoints whose final norm is
    captured and not yet done."""
    fn = final_norm_committed(group)
    have = "delta_cossim_final_norm" in group.derived_arrays()
    done = group.committed("delta_cossim_final_norm") if have else np.zeros(len(group.checkpoints), bool)
    written = 0
    for ci, c in enumerate(group.checkpoints):
        if not fn[ci] or done[ci]:
            continue
        try:
            v = delta_cossim(read_state(group, c, FINAL_NORM_LAYER), rel)
        except RotelabError as e:
            note(f"delta_cossim_final_norm [{group.kind}] {c}: left NaN ({e})")
            v = np.nan
        group.write_derived("delta_cossim_final_norm", ("checkpoint",), np.array(v, np.float32), index={"checkpoint": c},
                            cell_dims=("checkpoint",), attrs={"definition": "paper Appendix F.3", "representation": "final_norm: "
                                                              "the last block's output after the model's final norm"})
        written += 1
    return written


def delta_cossim_table(store: Store, kinds: Sequence[str] | None = None) -> pd.DataFrame:
    """Stored ΔCosSim curves as a tidy table: ``kind, checkpoint, layer, delta_cossim``."""
    out = []
    for k in kinds or store.kinds():
        g = store.kind(k)
        if "delta_cossim" not in g.derived_arrays():
            continue
        a = g.read_derived("delta_cossim")
        cps, lays = np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), indexing="ij")
        out.append(pd.DataFrame({"kind": k, "checkpoint": np.asarray(g.checkpoints)[cps.ravel()],
                                 "layer": np.asarray(g.layers)[lays.ravel()], "delta_cossim": a.ravel()}))
    cols = ["kind", "checkpoint", "layer", "delta_cossim"]
    return pd.concat(out, ignore_index=True).dropna(subset=["delta_cossim"])[cols] if out else pd.DataFrame(columns=cols)


# --------------------------------------------------------------------------- alignment

ALIGN_KINDS_FIXED = ("train", "test", "unrelated")


def alignment_kinds(kinds: Sequence[str]) -> list[str]:
    """The kinds the key token is compared with: train, test, unrelated, translated-*."""
    return [k for k in kinds if k in ALIGN_KINDS_FIXED or k.startswith("translated-")]


def alignment_run(run: Run, store: Store, *, kinds: Sequence[str] | None = None, progress: bool = True,
                  note: Note = print) -> pd.DataFrame | None:
    """Compute the ``alignment`` store table (see :mod:`rotelab.analyses.alignment`) for every
    (checkpoint, layer) where the key kind and a prompt kind are captured; resumes from the
    stored table (cells present are kept), recomputes ``delta`` for all rows."""
    have = captured_kinds(store)
    if "key" not in have:
        note("alignment: no captured 'key' kind; skipped")
        return None
    targets = alignment_kinds([k for k in (kinds or have) if k in have])
    if not targets:
        note("alignment: no captured train/test/unrelated/translated kind; skipped")
        return None
    key = store.kind("key")
    kitems = key.items
    kmask = key.committed("activations")
    old = store.read_table("alignment")
    done: set[tuple[str, int, str]] = set()
    parts = []
    if old is not None and len(old):
        old = old[old["kind"].isin(targets)]
        done = set(zip(old["checkpoint"].astype(str), old["layer"].astype(int), old["kind"].astype(str)))
        parts.append(old.drop(columns=["reference", "delta"]))
    work = []
    for k in targets:
        g = store.kind(k)
        if g.checkpoints != key.checkpoints or g.layers != key.layers:
            note(f"alignment: kind {k!r} has other checkpoints/layers than 'key'; skipped")
            continue
        m = g.committed("activations") & kmask
        fn = final_norm_committed(g) & final_norm_committed(key)
        for ci, c in enumerate(g.checkpoints):
            for li, v in enumerate(g.layers):
                if m[ci, li] and (c, v, k) not in done:
                    work.append((g, c, v))
            if fn[ci] and (c, FINAL_NORM_LAYER, k) not in done:
                work.append((g, c, FINAL_NORM_LAYER))
    key_cache: dict[tuple[str, int], np.ndarray] = {}
    for g, c, v in _tqdm(work, progress and bool(work), desc="alignment"):
        if (c, v) not in key_cache:
            key_cache.clear()
            key_cache[(c, v)] = read_state(key, c, v)
        try:
            t = alignment_by_relation(key_cache[(c, v)], kitems, read_state(g, c, v), g.items)
        except RotelabError as e:
            note(f"alignment [{g.kind}] {c} layer {v}: {e}; left out")
            continue
        parts.append(t.assign(checkpoint=c, layer=v, kind=g.kind))
    if not parts:
        return None
    table = pd.concat(parts, ignore_index=True)
    ref = reference_checkpoint(run, key.checkpoints)
    table = with_delta(table, ref)
    order = {c: i for i, c in enumerate(key.checkpoints)}
    table = table.sort_values(["kind", "layer", "relation", "split"]).sort_values(
        "checkpoint", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    store.write_table("alignment", table[list(ALIGNMENT_COLUMNS)])
    return table


# --------------------------------------------------------------------------- patching

def patching_run(run: Run, store: Store, *, progress: bool = True, note: Note = print) -> int:
    """The configured patching sweep (``analyses.patching``): for each checkpoint, the source
    kind's state at the last prompt position into the target kind, all layers, a few held-out
    items per relation. Checkpoints already in the ``patching`` table are skipped."""
    from .patching import ModelCache, layer_sweep, sample_items

    cfg = run.config.analyses.patching
    kinds = run.kinds()
    for k in (cfg.source_kind, cfg.target_kind):
        if k not in kinds:
            note(f"patching: the run has no kind {k!r}; skipped")
            return 0
    if cfg.checkpoints is not None:
        ids = [run.checkpoint(c).id for c in cfg.checkpoints]
    else:
        ids = [e.id for e in run.checkpoints() if e.series == "main" and e.path is not None]
    old = store.read_table("patching")
    done = set()
    if old is not None and len(old):
        sel = old[(old["source_kind"] == cfg.source_kind) & (old["target_kind"] == cfg.target_kind)
                  & (old["source_checkpoint"] == old["target_checkpoint"]) & (old["metric"] == cfg.metric)]
        done = set(sel["target_checkpoint"].astype(str))
    items = sample_items(run.items(cfg.target_kind), cfg.items_per_relation, seed=run.config.seed)
    cache = ModelCache(run, size=1)
    n = 0
    for c in ids:
        if c in done:
            continue
        layer_sweep(run, (c, cfg.source_kind), (c, cfg.target_kind), layers=cfg.layers,
              metric=cfg.metric, items=items, models=cache, progress=progress)
        n += 1
    return n


# --------------------------------------------------------------------------- the stage

def analyze_run(run: Run, *, kinds: Sequence[str] | None = None, progress: bool = True,
                note: Note = print) -> dict[str, Any]:
    """Run every analysis whose inputs exist (see the module docstring); returns a summary
    ``{"delta_cossim": {kind: rows}, "projections": {name: cells}, "alignment": rows,
    "patching": checkpoints}`` plus the keys of :func:`rotelab.analyses.where.where_run`
    (``logit_lens``, ``probes``, ``cka``: {kind: cells}; ``onset``: rows)."""
    cfg = run.config.analyses
    store = open_store(run)
    have = captured_kinds(store)
    if kinds is not None:
        unknown = [k for k in kinds if k not in store.kinds()]
        if unknown:
            raise RotelabError(f"{run.store_path}: no captures for kind {unknown[0]!r} (captured: {', '.join(have) or 'none'})")
        use = [k for k in kinds if k in have]
    else:
        use = have
    if not use:
        raise RotelabError(f"{run.store_path}: no captured activations (run `rotelab capture` first)")
    summary: dict[str, Any] = {"delta_cossim": {}, "projections": {}, "alignment": 0, "patching": 0}
    for k in use:
        summary["delta_cossim"][k] = delta_cossim_kind(store.kind(k), progress=progress, note=note)
    for method in cfg.projections:
        for k in use:
            last = [store.kind(k).layers[-1]]
            layers = None if method == "pca" else (cfg.umap_layers or last)
            summary["projections"][f"proj_{method}[{k}]"] = project_kinds(
                store, [k], method, fit_on=cfg.projection_fit_on, layers=layers, seed=run.config.seed,
                progress=progress, note=note)
        joint = [k for k in cfg.joint_kinds if k in use]
        if len(joint) >= 2:
            last = [store.kind(joint[0]).layers[-1]]
            layers = None if method == "pca" else (cfg.umap_layers or last)
            summary["projections"][f"proj_{method}_joint[{'+'.join(joint)}]"] = project_kinds(
                store, joint, method, fit_on=cfg.projection_fit_on, layers=layers, seed=run.config.seed,
                progress=progress, note=note)
    table = alignment_run(run, store, kinds=use, progress=progress, note=note)
    summary["alignment"] = 0 if table is None else len(table)
    if cfg.patching.enabled:
        summary["patching"] = patching_run(run, store, progress=progress, note=note)
    from .where import where_run  # logit lens, probes, CKA, onset (issue 16)

    summary.update(where_run(run, store, use, progress=progress, note=note))
    return summary


__all__ = ["alignment_kinds", "alignment_run", "analyze_run", "delta_cossim_kind", "delta_cossim_table", "patching_run"]
