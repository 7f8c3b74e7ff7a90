"""What the browser shows, read from a run's store — no Textual here, so it is testable on its own.

:class:`RunData` opens a run read-only and produces a :class:`Snapshot`: every *small* thing the
screens need (checkpoint series, layers, item tables, ΔCosSim curves, metric summaries, the
``alignment`` and ``patching`` tables), aligned to one global checkpoint list. The one large thing —
a projection slab ``[item, 2]`` per (kind, checkpoint, layer) — is read on demand by
:meth:`RunData.projection` (LRU-cached). Everything missing stays missing: NaN in arrays, ``None``
for absent arrays or tables; nothing is ever filled with zeros.

All methods are safe to call from worker threads (store access is serialized by a lock).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rotelab.checkpoints import CheckpointEntry
from rotelab.errors import RotelabError
from rotelab.facts import split_mask
from rotelab.run import Run
from rotelab.store import MissingDataError, Store

#: Metrics of the accuracy panel: (store item array, column label).
METRICS: tuple[tuple[str, str], ...] = (
    ("object_prob", "P(object)"),
    ("mc_correct", "MC acc"),
    ("gen_correct", "gen acc"),
)
SPLITS: tuple[str, ...] = ("heldout", "train")
KIND_ORDER: tuple[str, ...] = ("zero", "key", "train", "test", "unrelated")
PROJECTION_METHODS: tuple[str, ...] = ("pca", "umap")


def kind_sort_key(kind: str) -> tuple[int, str]:
    """Display order of prompt kinds: zero, key, train, test, unrelated, translated-*, icl, reverse, others."""
    if kind in KIND_ORDER:
        return (KIND_ORDER.index(kind), kind)
    if kind.startswith("translated-"):
        return (10, kind)
    return ({"icl": 20, "reverse": 21}.get(kind, 30), kind)


def projection_name(method: str, joint: bool) -> str:
    """Store name of a projection array: ``proj_pca``, ``proj_umap_joint``, ..."""
    return f"proj_{method}" + ("_joint" if joint else "")


UNINDEXED = "not in index"
"""Phase and series of a checkpoint the store holds but the run's checkpoint index does not list
(phases come from the index only, never from the shape of an id)."""


@dataclass(frozen=True)
class Point:
    """One checkpoint of the global list (index order of ``checkpoints/index.json``)."""

    id: str
    phase: str
    epoch: float | None
    series: str
    loss: float | None = None

    @property
    def label(self) -> str:
        if self.phase == "base":
            return "base"
        ep = "" if self.epoch is None else f" epoch {self.epoch:g}"
        return f"{self.phase}{ep}"


WHERE_ARRAYS: dict[str, str] = {
    "logit_lens_prob": "logit lens: P(first object token), held-out items",
    "probe_relation_acc": "relation probe accuracy (folds by fact)",
    "probe_transfer_acc": "relation probe trained on key prompts",
    "cka_base": "linear CKA with base",
    "cka_prev": "linear CKA with the previous checkpoint",
}
"""The layer × checkpoint heatmaps of the where screen, by name (``logit_lens_prob`` is derived
from the stored ``logit_lens_logprob`` [checkpoint, layer, item]; the others are stored as they are)."""


@dataclass
class Snapshot:
    """Everything small the screens show, read once per (re)load. Arrays along ``checkpoint`` follow
    :attr:`points`; along ``layer`` follow :attr:`layers`; NaN = missing."""

    name: str
    root: Path
    points: list[Point]
    layers: list[int]
    kinds: list[str]
    items: dict[str, pd.DataFrame]
    relations: list[str]
    delta_cossim: dict[str, np.ndarray]
    """kind -> float [checkpoint, layer]."""
    projections: dict[str, list[str]]
    """kind -> projection arrays present (``proj_pca``, ``proj_umap_joint`` ...)."""
    accuracy: dict[str, np.ndarray]
    """kind -> float [checkpoint, split (heldout, train), metric (METRICS order)]."""
    metrics_present: dict[str, list[str]]
    alignment: pd.DataFrame | None
    patching: pd.DataFrame | None
    relation_index: dict[str, np.ndarray] = field(default_factory=dict)
    """kind -> int [item]: position of each item's relation in :attr:`relations` (scatter colors)."""
    slabs_committed: dict[str, int] = field(default_factory=dict)
    """kind -> committed (checkpoint, layer) cells of its first projection array."""
    message: str = ""
    """Why something is empty (no store yet, ...); "" when the store was read."""
    where: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """kind -> {name: float [checkpoint, layer]} of the where-the-fact-lives analyses present
    (:data:`WHERE_ARRAYS`: logit-lens P of the first object token (mean over held-out items),
    relation probes, CKA drift)."""
    causal_trace: pd.DataFrame | None = None
    """The ``causal_trace`` table (None when the run has none)."""

    # ---------------------------------------------------------------- series helpers
    def series(self) -> list[str]:
        out: list[str] = []
        for p in self.points:
            if p.series not in out:
                out.append(p.series)
        return out

    def series_positions(self, series: str) -> list[int]:
        """Global indices of a series' timeline. A non-main series starts at ``base`` (it was
        trained from it), so its first point compares against base."""
        pos = [i for i, p in enumerate(self.points) if p.series == series]
        if series != "main":
            base = [i for i, p in enumerate(self.points) if p.phase == "base"]
            pos = base[:1] + pos
        return pos

    def previous(self, series: str, global_index: int) -> int | None:
        pos = self.series_positions(series)
        if global_index in pos:
            k = pos.index(global_index)
            return pos[k - 1] if k > 0 else None
        return None

    def projection_kinds(self, name: str) -> list[str]:
        return [k for k in self.kinds if name in self.projections.get(k, [])]

    def fact_labels(self) -> dict[str, str]:
        """fact id -> ``subject → object`` (subject from the ``zero`` kind, whose text is the
        subject; else the first prompt), in item order; computed once."""
        cached = self.__dict__.get("_fact_labels")
        if cached is None:
            cached = {}
            for k in (["zero"] if "zero" in self.items else []) + self.kinds:
                first = self.items[k].drop_duplicates("fact_id")
                for fid, text, obj in zip(first["fact_id"].astype(str), first["text"].astype(str), first["object"].astype(str)):
                    cached.setdefault(fid, f"{text if k == 'zero' else text[:40]} → {obj}")
            self.__dict__["_fact_labels"] = cached
        return cached

    def fact_ids(self) -> list[str]:
        return list(self.fact_labels())

    def fact_label(self, fact_id: str) -> str:
        return self.fact_labels().get(fact_id, fact_id)

    def alignment_curves(self, layer: int, value: str = "cosine") -> dict[str, np.ndarray]:
        """prompt kind -> float [checkpoint] (mean over relations and facts) at ``layer``."""
        cache = self.__dict__.setdefault("_align_cache", {})
        if value not in cache:
            cache[value] = self._alignment_by_layer(value)
        return cache[value].get(layer, {})

    def _alignment_by_layer(self, value: str) -> dict[int, dict[str, np.ndarray]]:
        """:meth:`alignment_curves` of every layer from one groupby over the table (~20 ms once
        on the benchmark's store, where one layer alone took ~7 ms: a layer step then costs
        nothing). The means are over the same rows as one layer's alone; pandas may sum them in
        another order (differences of 1 ulp, ~1e-16)."""
        df = self.alignment
        if df is None or not {"checkpoint", "layer", "kind"} <= set(df.columns) or value not in df.columns:
            return {}
        if "split" in df.columns:  # the analyses write split all/train/heldout: curves use all where a layer has it
            is_all = df["split"] == "all"
            df = df[is_all | ~df["layer"].isin(df.loc[is_all, "layer"].unique())]
        means = df.groupby(["layer", "kind", "checkpoint"])[value].mean()
        pos = {p.id: i for i, p in enumerate(self.points)}
        by_layer: dict[int, dict[str, np.ndarray]] = {}
        for (layer, kind, ck), v in means.items():
            arr = by_layer.setdefault(int(layer), {}).setdefault(str(kind), np.full(len(self.points), np.nan))
            if ck in pos:
                arr[pos[ck]] = float(v)
        return {layer: dict(sorted(out.items(), key=lambda kv: kind_sort_key(kv[0]))) for layer, out in by_layer.items()}


@dataclass
class FactDetail:
    """Drill-down of one fact: its prompts (rows) with metrics across checkpoints."""

    fact_id: str
    relation: str
    object: str
    split: str
    prompts: pd.DataFrame
    """columns kind, item, template_id, text."""
    object_prob: np.ndarray
    """float [prompt, checkpoint]."""
    mc_correct: np.ndarray
    gen_correct: np.ndarray
    gen_text: list[list[str | None]]
    """[prompt][checkpoint]; None where not evaluated."""


def find_runs(folder: Path) -> list[Path]:
    """Run directories (with ``config.yaml``) directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "config.yaml").is_file())


def store_kinds(run: Run) -> list[str]:
    """The prompt kinds in the run's store (display order); [] while there is no store."""
    try:
        return sorted(Store.open(run.store_path, mode="r").kinds(), key=kind_sort_key)
    except RotelabError:
        return []


class RunData:
    """Read-only access to one run for the browser (thread safe)."""

    def __init__(self, run: Run, cache_slabs: int = 256) -> None:
        self.run = run
        self._lock = threading.RLock()
        self._store: Store | None = None
        self._groups: dict[str, object] = {}
        self._cache: OrderedDict[tuple, np.ndarray | None] = OrderedDict()
        self._cache_size = cache_slabs
        self.snapshot: Snapshot | None = None

    @classmethod
    def open(cls, root: str | Path) -> "RunData":
        return cls(Run.open(root))

    # ---------------------------------------------------------------- loading
    def _open_store(self) -> Store | None:
        try:
            return Store.open(self.run.store_path, mode="r")
        except MissingDataError:
            return None

    def _points(self, store_ids: list[str]) -> list[Point]:
        try:
            entries: list[CheckpointEntry] = self.run.checkpoints()
        except RotelabError:
            entries = []
        pts = [Point(e.id, e.phase, e.epoch, e.series, e.loss) for e in entries]
        known = {p.id for p in pts}
        for cid in store_ids:  # the store may know ids the index lost; show them, as their own series
            if cid not in known:
                pts.append(Point(cid, UNINDEXED, None, UNINDEXED))
                known.add(cid)
        return pts

    def load(self) -> Snapshot:
        """(Re)read everything small; drops the projection cache. Never raises for missing data."""
        with self._lock:
            self._cache.clear()
            self._groups = {}
            store = self._store = self._open_store()
            name = self.run.root.name
            if store is None:
                snap = Snapshot(name, self.run.root, self._points([]), [], [], {}, [], {}, {}, {}, {}, None, None,
                                message=f"no store yet at {self.run.store_path.name} (capture has not started)")
                self.snapshot = snap
                return snap
            kinds = sorted(store.kinds(), key=kind_sort_key)
            groups = {}
            for k in kinds:
                try:
                    groups[k] = store.kind(k)
                except MissingDataError:  # group being created right now
                    continue
            kinds = list(groups)
            self._groups = groups
            store_ids: list[str] = []
            for g in groups.values():
                for c in g.checkpoints:
                    if c not in store_ids:
                        store_ids.append(c)
            points = self._points(store_ids)
            layers: list[int] = []
            for g in groups.values():
                for layer in g.layers:
                    if layer not in layers:
                        layers.append(layer)
            layers.sort()
            items = {k: g.items for k, g in groups.items()}
            relations = sorted({str(r) for df in items.values() for r in df["relation"].tolist()})
            dcs, projs, acc, present, committed, where = {}, {}, {}, {}, {}, {}
            for k, g in groups.items():
                derived = set(g.derived_arrays())
                cpos = self._global_positions(g.checkpoints, points)
                lpos = [layers.index(v) for v in g.layers]
                if "delta_cossim" in derived:
                    dcs[k] = self._align(g.read_derived("delta_cossim"), g.dims("delta_cossim"), cpos, lpos, len(points), len(layers))
                where[k] = self._where(g, items[k], derived, cpos, lpos, len(points), len(layers))
                projs[k] = sorted(n for n in derived if n.startswith("proj_"))
                if projs[k]:
                    committed[k] = int(g.committed(projs[k][0]).sum())
                arrays = set(g.item_arrays())
                present[k] = [m for m, _ in METRICS if m in arrays]
                acc[k] = self._accuracy(g, items[k], cpos, len(points), arrays)
            snap = Snapshot(
                name, self.run.root, points, layers, kinds, items, relations, dcs, projs, acc, present,
                self._table(store, "alignment"), self._table(store, "patching"),
                {k: np.searchsorted(np.asarray(relations), df["relation"].astype(str).to_numpy()) for k, df in items.items()},
                committed,
                where=where,
                causal_trace=self._table(store, "causal_trace"),
            )
            self.snapshot = snap
            return snap

    @staticmethod
    def _table(store: Store, name: str) -> pd.DataFrame | None:
        try:
            return store.read_table(name)
        except RotelabError:
            return None

    @staticmethod
    def _global_positions(ids: list[str], points: list[Point]) -> list[int]:
        pos = {p.id: i for i, p in enumerate(points)}
        return [pos[c] for c in ids]

    @staticmethod
    def _align(data: np.ndarray, dims: tuple[str, ...], cpos: list[int], lpos: list[int], nc: int, nl: int) -> np.ndarray:
        """A [checkpoint, layer] array of one group onto the global grid (NaN elsewhere)."""
        out = np.full((nc, nl), np.nan, dtype=np.float64)
        if tuple(dims) != ("checkpoint", "layer"):
            return out
        n = min(len(cpos), data.shape[0])
        out[np.ix_(cpos[:n], lpos)] = data[:n]
        return out

    @classmethod
    def _where(cls, g, items: pd.DataFrame, derived: set[str], cpos: list[int], lpos: list[int], nc: int, nl: int) -> dict[str, np.ndarray]:
        """The :data:`WHERE_ARRAYS` this kind has, on the global grid."""
        out: dict[str, np.ndarray] = {}
        if "logit_lens_logprob" in derived:
            lp = g.read_derived("logit_lens_logprob")  # [checkpoint, layer, item]
            held = split_mask(items["split"].astype(str).to_numpy(), "heldout")
            sel = lp[:, :, held] if held.any() else lp
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
                out["logit_lens_prob"] = cls._align(np.nanmean(np.exp(sel), axis=-1), ("checkpoint", "layer"), cpos, lpos, nc, nl)
        for name in WHERE_ARRAYS:
            if name in derived and name != "logit_lens_prob":
                out[name] = cls._align(g.read_derived(name), g.dims(name), cpos, lpos, nc, nl)
        return out

    @staticmethod
    def _accuracy(g, items: pd.DataFrame, cpos: list[int], nc: int, arrays: set[str]) -> np.ndarray:
        """float [checkpoint, split, metric]: NaN-mean over the split's items (NaN if none evaluated)."""
        out = np.full((nc, len(SPLITS), len(METRICS)), np.nan)
        split = items["split"].to_numpy().astype(str)
        for m, (name, _) in enumerate(METRICS):
            if name not in arrays:
                continue
            vals = g.read_item_array(name)
            n = min(len(cpos), vals.shape[0])
            for s, sp in enumerate(SPLITS):
                sel = vals[:n, split_mask(split, sp)]
                if sel.shape[1] == 0:
                    continue
                cnt = np.sum(~np.isnan(sel), axis=1)
                with np.errstate(invalid="ignore"):
                    mean = np.where(cnt > 0, np.nansum(sel, axis=1) / np.maximum(cnt, 1), np.nan)
                out[cpos[:n], s, m] = mean
        return out

    # ---------------------------------------------------------------- slabs
    def projection(self, kind: str, name: str, checkpoint: str, layer: int) -> np.ndarray | None:
        """float32 [item, 2] of one slab (all NaN while uncommitted); None if the kind has no
        such array. One ``read_derived`` of one cell: that cell's marker file and its chunk."""
        key = (kind, name, checkpoint, int(layer))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            out = self._read_projection(kind, name, checkpoint, int(layer))
            self._cache[key] = out
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return out

    def _read_projection(self, kind: str, name: str, checkpoint: str, layer: int) -> np.ndarray | None:
        g = self._groups.get(kind)
        snap = self.snapshot
        if g is None or snap is None or name not in snap.projections.get(kind, []):
            return None
        if checkpoint not in g.checkpoints or layer not in g.layers:
            return np.full((g.n_items, 2), np.nan, dtype=np.float32)
        return g.read_derived(name, checkpoints=[checkpoint], layers=[layer])[0, 0, :, :2]

    def cached(self, kind: str, name: str, checkpoint: str, layer: int) -> bool:
        with self._lock:
            return (kind, name, checkpoint, int(layer)) in self._cache

    # ---------------------------------------------------------------- drill-down
    def fact_detail(self, fact_id: str) -> FactDetail:
        """The fact's prompts over all kinds with their metrics at every checkpoint."""
        with self._lock:
            snap = self.snapshot
            if snap is None:
                raise RotelabError(f"{self.run.root}: not loaded")
            nc = len(snap.points)
            rows, probs, mcs, gens, texts = [], [], [], [], []
            relation = obj = split = ""
            for k in snap.kinds:
                df = snap.items[k]
                sub = df[df["fact_id"] == fact_id]
                if sub.empty:
                    continue
                relation, obj, split = str(sub["relation"].iloc[0]), str(sub["object"].iloc[0]), str(sub["split"].iloc[0])
                g = self._groups[k]
                ids = [int(i) for i in sub["item"].tolist()]
                cpos = self._global_positions(g.checkpoints, snap.points)
                arrays = set(g.item_arrays())

                def read(name: str, is_text: bool = False) -> np.ndarray:
                    if is_text:
                        full = np.full((len(ids), nc), None, dtype=object)
                    else:
                        full = np.full((len(ids), nc), np.nan)
                    if name in arrays:
                        v = g.read_item_array(name, items=ids)  # [checkpoint, item]
                        n = min(len(cpos), v.shape[0])
                        if is_text:
                            committed = g.committed(name)[:n]
                            for j, c in enumerate(cpos[:n]):
                                if committed[j]:
                                    full[:, c] = v[j]
                        else:
                            full[:, cpos[:n]] = v[:n].T
                    return full

                p, mc, gc, gt = read("object_prob"), read("mc_correct"), read("gen_correct"), read("gen_text", True)
                for r, (_, row) in enumerate(sub.iterrows()):
                    rows.append({"kind": k, "item": int(row["item"]), "template_id": int(row["template_id"]), "text": str(row["text"])})
                    probs.append(p[r])
                    mcs.append(mc[r])
                    gens.append(gc[r])
                    texts.append(list(gt[r]))
            if not rows:
                raise RotelabError(f"{self.run.root}: no prompts for fact {fact_id!r}")
            return FactDetail(
                fact_id, relation, obj, split, pd.DataFrame(rows),
                np.vstack(probs), np.vstack(mcs), np.vstack(gens), texts,
            )


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for display; missing (None/NaN) is an em dash, never 0."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, np.floating) and np.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def fmt_delta(value: float | None, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return ""
    out = f"{value:+.{digits}f}"
    return "+" + out[1:] if float(out) == 0 else out  # no "-0.000"
