"""View models of the screens: what each panel of the main screen shows, computed from a
:class:`Snapshot` and the user's :class:`Selection`, and the patching screen's heatmaps (no
Textual here, like :mod:`rotelab.tui.data`). Each panel widget (:mod:`rotelab.tui.panels`) paints
itself from its view; a new panel is one view function here and one widget there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .data import METRICS, SPLITS, WHERE_ARRAYS, Point, Snapshot, fmt, fmt_delta, projection_name

ALL = "all"
"""The kind choice that shows every kind with a joint projection."""


@dataclass(frozen=True)
class Selection:
    """What the user selected: a point of a series' timeline, a layer, a kind, how to project."""

    ckpt: int = 0
    """Index into the current series' timeline."""
    layer_index: int = 0
    """Index into the snapshot's layers."""
    kind: str = ""
    method: str = "pca"
    joint: bool = False
    color_by: str = "relation"
    series: str = "main"


@dataclass(frozen=True)
class SlabRequest:
    """What the scatter needs: one projection slab per kind."""

    kinds: tuple[str, ...]
    name: str
    checkpoint: str
    layer: int


def positions(snap: Snapshot | None, sel: Selection) -> list[int]:
    """Global checkpoint indices of the selected series' timeline."""
    return snap.series_positions(sel.series) if snap else []


def point_index(snap: Snapshot | None, sel: Selection) -> int:
    """Global index of the selected checkpoint."""
    pos = positions(snap, sel)
    return pos[min(sel.ckpt, len(pos) - 1)] if pos else 0


def kind_choices(snap: Snapshot | None) -> list[str]:
    """Kinds with any projection, then ``all`` when some kind has a joint projection."""
    if snap is None:
        return []
    out = [k for k in snap.kinds if snap.projections.get(k)] or list(snap.kinds)
    if any(n.endswith("_joint") for k in snap.kinds for n in snap.projections.get(k, [])):
        out.append(ALL)
    return out


def slab_request(snap: Snapshot | None, sel: Selection) -> SlabRequest | None:
    """The slabs the scatter needs for ``sel``; None when there is nothing to show."""
    if snap is None or not snap.points or not snap.layers or not sel.kind:
        return None
    joint = sel.joint or sel.kind == ALL
    name = projection_name(sel.method, joint)
    kinds = tuple(snap.projection_kinds(name)) if sel.kind == ALL else (sel.kind,)
    point = snap.points[point_index(snap, sel)]
    return SlabRequest(kinds, name, point.id, snap.layers[min(sel.layer_index, len(snap.layers) - 1)])


# ---------------------------------------------------------------------------- position line
def position_text(snap: Snapshot, sel: Selection) -> str:
    """The one-line position bar (markup)."""
    if not snap.points:
        return f"[b]{snap.name}[/]  {snap.message or 'no checkpoints yet'}"
    p = snap.points[point_index(snap, sel)]
    layer = snap.layers[sel.layer_index] if snap.layers else "—"
    joint = " (joint)" if sel.joint and sel.kind != ALL else ""
    txt = (
        f"[b]{snap.name}[/] │ series [b]{sel.series}[/] │ checkpoint [b]{p.id}[/] ({p.label}) │ "
        f"layer [b]{layer}[/] │ kind [b]{sel.kind or '—'}[/]{joint} │ {sel.method.upper()} │ color: {sel.color_by}"
    )
    if snap.message:
        txt += f" │ [i]{snap.message}[/]"
    return txt


# ---------------------------------------------------------------------------- timeline and layers
@dataclass
class TimelineView:
    """The series' points, the selected one, and which have any data (filled dots)."""

    points: list[Point]
    selected: int
    available: list[bool]


@dataclass
class LayerView:
    """The layers, the selected one, and ΔCosSim per layer at the selected checkpoint (bars)."""

    layers: list[int]
    selected: int
    values: np.ndarray


def _available(snap: Snapshot, sel: Selection, gi: int) -> bool:
    kinds = [sel.kind] if sel.kind in snap.kinds else snap.kinds
    for k in kinds:
        if k in snap.delta_cossim and np.isfinite(snap.delta_cossim[k][gi]).any():
            return True
        if k in snap.accuracy and np.isfinite(snap.accuracy[k][gi]).any():
            return True
    return False


def dcs_kind(snap: Snapshot, sel: Selection) -> str | None:
    """The kind whose ΔCosSim the layer bar shows: the selected one, else the first with any."""
    if sel.kind in snap.delta_cossim:
        return sel.kind
    return next(iter(snap.delta_cossim), None)


def timeline_view(snap: Snapshot, sel: Selection) -> TimelineView:
    pos = positions(snap, sel)
    pts = [snap.points[i] for i in pos]
    return TimelineView(pts, min(sel.ckpt, max(0, len(pts) - 1)), [_available(snap, sel, i) for i in pos])


def layer_view(snap: Snapshot, sel: Selection) -> LayerView:
    dk = dcs_kind(snap, sel)
    vals = snap.delta_cossim[dk][point_index(snap, sel)] if dk and positions(snap, sel) else np.zeros(0)
    return LayerView(snap.layers, sel.layer_index, vals)


# ---------------------------------------------------------------------------- curves
@dataclass
class CurveView:
    """One line plot: curves (float [n] each, NaN = gap), their colors, marker, phase boundaries,
    the message when empty, the border title and subtitle (None: leave the subtitle as it is)."""

    series: list[np.ndarray]
    colors: list[int]
    title: str | None = None
    subtitle: str | None = None
    marker: int | None = None
    boundaries: list[float] = field(default_factory=list)
    empty_message: str = "no data"


@dataclass
class CurvesView:
    by_layer: CurveView
    by_ckpt: CurveView
    align: CurveView
    kinds: list[str]


def curves_view(snap: Snapshot, sel: Selection, legend: callable) -> CurvesView:  # type: ignore[valid-type]
    """ΔCosSim by layer and by checkpoint, and key-token alignment by checkpoint. ``legend`` turns
    names into the legend markup (the widgets' palette)."""
    pos = positions(snap, sel)
    kinds = [k for k in (snap.kinds if sel.kind == ALL else [sel.kind]) if k in snap.delta_cossim]
    gi = point_index(snap, sel)
    bounds = [i - 0.5 for i in range(1, len(pos)) if snap.points[pos[i]].phase != snap.points[pos[i - 1]].phase]
    colors = list(range(len(kinds)))
    sub = legend(kinds) if len(kinds) > 1 else None
    if pos and snap.layers:
        by_layer = CurveView([snap.delta_cossim[k][gi] for k in kinds], colors, f"ΔCosSim by layer · {snap.points[gi].id}",
                             sub, marker=sel.layer_index, empty_message="no ΔCosSim for this checkpoint")
        by_ckpt = CurveView([snap.delta_cossim[k][pos, sel.layer_index] for k in kinds], colors,
                            f"ΔCosSim by checkpoint · layer {snap.layers[sel.layer_index]}", None, marker=sel.ckpt,
                            boundaries=bounds, empty_message="no ΔCosSim for this layer")
    else:
        by_layer = CurveView([], [], None, sub, empty_message="no ΔCosSim")
        by_ckpt = CurveView([], [], None, None, empty_message="no ΔCosSim")
    curves = snap.alignment_curves(snap.layers[sel.layer_index]) if snap.layers else {}
    names = list(curves)
    align = CurveView(
        [curves[n][pos] for n in names], list(range(len(names))),
        f"key-token alignment (cosine) · layer {snap.layers[sel.layer_index] if snap.layers else '—'}",
        legend(names) if names else "", marker=sel.ckpt, boundaries=bounds,
        empty_message="no alignment table (run the analyses)",
    )
    return CurvesView(by_layer, by_ckpt, align, kinds)


# ---------------------------------------------------------------------------- accuracy table
@dataclass
class AccuracyView:
    """Rows of the accuracy table: per kind, (value, change since the previous checkpoint) per
    metric × split in METRICS × SPLITS order; ``key`` says when nothing changed."""

    key: tuple
    rows: list[tuple[str, list[tuple[float, float]]]]
    title: str


def accuracy_view(snap: Snapshot, sel: Selection) -> AccuracyView:
    gi = point_index(snap, sel)
    key = (id(snap), gi, sel.series)
    if not snap.points:
        return AccuracyView(key, [], "")
    prev = snap.previous(sel.series, gi)
    rows: list[tuple[str, list[tuple[float, float]]]] = []
    for k in snap.kinds:
        a = snap.accuracy.get(k)
        if a is None or not snap.metrics_present.get(k):
            continue
        cells = []
        for m in range(len(METRICS)):
            for s in range(len(SPLITS)):
                v = a[gi, s, m]
                cells.append((v, v - a[prev, s, m] if prev is not None else float("nan")))
        rows.append((k, cells))
    prev_txt = snap.points[prev].id if prev is not None else "none"
    return AccuracyView(key, rows, f"accuracy at {snap.points[gi].id} (Δ vs {prev_txt}) · {len(rows)} kinds")


def accuracy_cell(value: float, delta: float) -> tuple[str, str, str]:
    """(value text, change text, change style) of one accuracy cell; change "" when unknown."""
    if not np.isfinite(delta):
        return fmt(value), "", ""
    return fmt(value), " " + fmt_delta(delta, 3), "green" if delta > 0 else "red" if delta < 0 else "dim"


# ---------------------------------------------------------------------------- scatter
@dataclass
class ScatterView:
    """The scatter of one request: points (float [n, 2], None if no kind has the array), palette
    index per point, the message for missing data, what is drawn (``view_key``), the panel's
    titles and legend, and which rows belong to which kind (``spans``: kind, first row, rows)."""

    xy: np.ndarray | None
    colors: np.ndarray
    message: str
    view_key: tuple | None
    title: str
    subtitle: str
    legend: list[str]
    spans: list[tuple[str, int, int]]


def scatter_view(snap: Snapshot, sel: Selection, req: SlabRequest, parts: list[np.ndarray | None]) -> ScatterView:
    xy_parts, color_parts, spans = [], [], []
    cats = snap.relations if sel.color_by == "relation" else list(req.kinds)
    start = 0
    for i, (k, xy) in enumerate(zip(req.kinds, parts)):
        if xy is None:
            continue
        xy_parts.append(xy)
        color_parts.append(snap.relation_index[k] if sel.color_by == "relation" else np.full(len(xy), i, dtype=np.int64))
        spans.append((k, start, len(xy)))
        start += len(xy)
    colors = np.concatenate(color_parts) if color_parts else np.zeros(0, dtype=np.int64)
    xy = np.vstack(xy_parts) if len(xy_parts) > 1 else (xy_parts[0] if xy_parts else None)
    msg = (
        f"no {req.name} for {', '.join(req.kinds) or 'any kind'} (run the analyses)"
        if not xy_parts
        else f"slab {req.checkpoint} × layer {req.layer} not committed yet (r refreshes)"
    )
    li = snap.layers.index(req.layer)
    pi = point_index(snap, sel)
    dcs = [snap.delta_cossim[k][pi, li] for k in req.kinds if k in snap.delta_cossim]
    dcs_txt = fmt(dcs[0]) if len(dcs) == 1 else ("—" if not dcs else " / ".join(fmt(v, 2) for v in dcs))
    shown = 0 if xy is None else int(np.isfinite(xy).all(axis=1).sum())
    title = f"{req.name.replace('proj_', '').upper()} · {sel.kind} · {req.checkpoint} · layer {req.layer} · ΔCosSim {dcs_txt}"
    return ScatterView(
        xy, colors, msg, (req.checkpoint, req.layer, req.kinds, req.name, sel.color_by), title,
        f"{shown} of {start} points", cats, spans,
    )


# ---------------------------------------------------------------------------- patching screen
_VALUE_COLUMNS = ("effect", "value", "delta", "score", "recovery")
_PANEL_COLUMNS = ("source_kind", "target_kind", "metric", "position")


@dataclass
class HeatmapPanel:
    """One layer × column heatmap: the ``patching`` table (mean effect over facts, columns
    checkpoints), a where-the-fact-lives array (columns checkpoints) or one fact's causal trace
    (columns checkpoint · position)."""

    title: str
    keys: dict[str, str]
    """What the panel shows, for its export: the patching panel's source_kind / target_kind /
    metric / position (those present); ``{"array": name, "kind": kind}`` for a where panel."""
    values: np.ndarray
    """float [layer, column]; NaN where the sweep has no result."""
    layers: list[int]
    columns: list[str]
    """checkpoint (or ``source→target`` pair, or ``checkpoint·position``) per column, in series order."""
    mark: tuple[int, int] | None = None
    """(row, column) of the browser's cursor (the selected layer and checkpoint), if shown."""


def patching_panels(df: pd.DataFrame | None, points: list[Point]) -> list[HeatmapPanel]:
    """Heatmaps from a tidy patching table. Needs a ``layer`` column, an effect column (``effect``
    or ``value``/``delta``/``score``/``recovery``) and checkpoint columns (``source_checkpoint`` +
    ``target_checkpoint``, ``source``+``target`` or ``checkpoint``); one panel per combination of
    ``source_kind``/``target_kind``/``metric``/``position`` present. Empty list if not usable."""
    if df is None or df.empty or "layer" not in df.columns:
        return []
    value = next((c for c in _VALUE_COLUMNS if c in df.columns), None)
    if value is None:
        return []
    pairs = [("source_checkpoint", "target_checkpoint"), ("source", "target")]
    ck_cols = next((list(p) for p in pairs if set(p) <= set(df.columns)), None)
    if ck_cols is None:
        ck_cols = ["checkpoint"] if "checkpoint" in df.columns else None
    if ck_cols is None:
        return []
    order = {p.id: i for i, p in enumerate(points)}
    d = df.copy()
    if len(ck_cols) == 1:
        d["_col"] = d[ck_cols[0]].astype(str)
    else:  # within-checkpoint patching is labelled by its checkpoint, cross-checkpoint by the pair
        a, b = d[ck_cols[0]].astype(str), d[ck_cols[1]].astype(str)
        d["_col"] = np.where(a == b, a, a + "→" + b)
    d["_ord"] = d[ck_cols[-1]].astype(str).map(lambda c: order.get(c, len(order)))
    panel_cols = [c for c in _PANEL_COLUMNS if c in d.columns]
    groups = d.groupby(panel_cols, dropna=False) if panel_cols else [((), d)]
    out: list[HeatmapPanel] = []
    for key, sub in groups:
        key = key if isinstance(key, tuple) else (key,)
        layers = sorted(int(v) for v in sub["layer"].unique())
        cols = sub.drop_duplicates("_col").sort_values(["_ord", "_col"])["_col"].tolist()
        mean = sub.groupby(["layer", "_col"])[value].mean()
        vals = np.full((len(layers), len(cols)), np.nan)
        for (layer, col), v in mean.items():
            vals[layers.index(int(layer)), cols.index(col)] = float(v)
        title = " · ".join(f"{c}={k}" for c, k in zip(panel_cols, key)) or "patching"
        keys = {c: str(k) for c, k in zip(panel_cols, key)}
        out.append(HeatmapPanel(f"{title} ({value})", keys, vals, layers, cols))
    return out


# ---------------------------------------------------------------------------- where the fact lives
def where_kind(snap: Snapshot | None, sel: Selection) -> str | None:
    """The kind the where screen shows: the selected one, else (``all``) the first kind with any
    where-array; None when no kind has one."""
    if snap is None:
        return None
    if sel.kind in snap.where and snap.where[sel.kind]:
        return sel.kind
    return next((k for k in snap.kinds if snap.where.get(k)), None)


def where_panels(snap: Snapshot | None, sel: Selection) -> list[HeatmapPanel]:
    """Layer × checkpoint heatmaps of the :data:`~rotelab.tui.data.WHERE_ARRAYS` of the where
    kind, the selected series' checkpoints as columns, the cursor (selected layer and checkpoint)
    marked. Empty list when the run has none."""
    kind = where_kind(snap, sel)
    if snap is None or kind is None:
        return []
    cols = positions(snap, sel)
    if not cols or not snap.layers:
        return []
    li = min(sel.layer_index, len(snap.layers) - 1)
    ci = min(sel.ckpt, len(cols) - 1)
    out = []
    for name, label in WHERE_ARRAYS.items():
        if name in snap.where[kind]:
            vals = snap.where[kind][name][cols].T  # [layer, checkpoint]
            out.append(HeatmapPanel(f"{label} · kind {kind}", {"array": name, "kind": kind}, vals, list(snap.layers),
                                    [snap.points[c].id for c in cols], (li, ci)))
    return out


def causal_trace_panel(snap: Snapshot | None, fact_id: str) -> HeatmapPanel | None:
    """One fact's causal trace: rows layers, columns traced checkpoint · kind · position, the mean
    restoration effect over the fact's traced items. None when the fact was not traced."""
    t = snap.causal_trace if snap is not None else None
    if t is None or t.empty:
        return None
    sub = t[t["fact_id"].astype(str) == str(fact_id)]
    if sub.empty:
        return None
    order = {p.id: i for i, p in enumerate(snap.points)}  # type: ignore[union-attr]
    pos_order = {p: i for i, p in enumerate(("subject_last", "key", "last", "all"))}
    sub = sub.assign(_col=sub["checkpoint"].astype(str) + "·" + sub["kind"].astype(str) + "·" + sub["position"].astype(str),
                     _ord=[(order.get(str(c), len(order)), str(k), pos_order.get(str(p), 9))
                           for c, k, p in zip(sub["checkpoint"], sub["kind"], sub["position"])])
    cols = [c for c, _ in sorted(dict(zip(sub["_col"], sub["_ord"])).items(), key=lambda x: x[1])]
    layers = sorted(int(v) for v in sub["layer"].unique())
    mean = sub.groupby(["layer", "_col"])["effect"].mean()
    vals = np.full((len(layers), len(cols)), np.nan)
    for (layer, col), v in mean.items():
        vals[layers.index(int(layer)), cols.index(col)] = float(v)
    return HeatmapPanel(f"causal trace of {fact_id}: restoration effect", {"fact_id": str(fact_id)}, vals, layers, cols)
