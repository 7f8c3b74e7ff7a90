"""The main screen: timeline and layer selector, the projection of the selected slab, curves and
the accuracy table. Selection is reactive state; slab reads run in a thread worker and results for
an outdated selection are dropped."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static
from textual.worker import get_current_worker

from .data import METRICS, SPLITS, PatchingPanel, RunData, Snapshot, fmt, fmt_delta, patching_panels, projection_name
from .widgets import LayerBar, LinePlot, ScatterPlot, Timeline, legend

ALL = "all"


@dataclass(frozen=True)
class SlabRequest:
    """What the scatter needs: one projection slab per kind."""

    kinds: tuple[str, ...]
    name: str
    checkpoint: str
    layer: int


class MainScreen(Screen):
    """Layers × epochs of one run."""

    AUTO_FOCUS = None
    PANEL_WAIT = 0.05
    """Seconds the panels wait for a slab read before they are painted without it."""
    PREFETCH = False
    """Read the neighbouring slabs in the background after each step. Off by default: a slab read
    costs ~1 ms against ~25 ms of painting (bench_tui.py), so it only pays on slow file systems."""

    BINDINGS = [
        Binding("left,h", "checkpoint(-1)", "◀ ckpt", show=True),
        Binding("right,l", "checkpoint(1)", "ckpt ▶", show=True),
        Binding("up,k", "layer(1)", "layer ▲", show=True),
        Binding("down,j", "layer(-1)", "layer ▼", show=True),
        Binding("home", "checkpoint_to(0)", "first ckpt", show=False),
        Binding("end", "checkpoint_to(-1)", "last ckpt", show=False),
        Binding("g", "layer_to(0)", "first layer", show=False),
        Binding("G", "layer_to(-1)", "last layer", show=False),
        Binding("t", "kind(1)", "kind", show=True),
        Binding("T", "kind(-1)", "previous kind", show=False),
        Binding("m", "method", "PCA/UMAP", show=True),
        Binding("J", "joint", "joint space", show=False),
        Binding("c", "color_by", "color by", show=False),
        Binding("s", "series", "series", show=False),
        Binding("f", "find_fact", "fact", show=True),
        Binding("p", "patching", "patching", show=True),
        Binding("e", "export", "export", show=True),
        Binding("r", "refresh", "refresh", show=True),
        Binding("escape", "back", "runs", show=False),
    ]

    ckpt: var[int] = var(0, init=False)
    """Index into the current series' timeline."""
    layer_index: var[int] = var(0, init=False)
    """Index into the snapshot's layers."""
    kind: var[str] = var("", init=False)
    method: var[str] = var("pca", init=False)
    joint: var[bool] = var(False, init=False)
    color_by: var[str] = var("relation", init=False)
    series: var[str] = var("main", init=False)

    def __init__(self, data: RunData) -> None:
        super().__init__()
        self.data = data
        self.snap: Snapshot | None = None
        self._request = 0
        self._scatter_spans: list[tuple[str, int, int]] = []  # (kind, first row, rows) per kind drawn
        self._accuracy_key: tuple | None = None
        self._panels_pending: int | None = None
        self.last_export: list[Path] = []
        """Files of the last export (PNG, PDF, SVG, CSV)."""

    # ---------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield Static("loading…", id="position")
        yield Timeline(id="timeline")
        yield LayerBar(id="layerbar")
        with Horizontal(id="body"):
            with Vertical(id="scatter-box"):
                yield ScatterPlot(id="scatter")
                yield Static("", id="legend")
            with Vertical(id="curves"):
                yield LinePlot(id="dcs-layer", classes="curve")
                yield LinePlot(id="dcs-ckpt", classes="curve")
                yield LinePlot(id="align", classes="curve")
        table = DataTable(id="accuracy", zebra_stripes=True, cursor_type="row")
        table.can_focus = False  # arrows and j/k belong to the timeline and the layers
        yield table
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#scatter-box").border_title = "representation"
        self.query_one("#dcs-layer").border_title = "ΔCosSim by layer"
        self.query_one("#dcs-ckpt").border_title = "ΔCosSim by checkpoint"
        self.query_one("#align").border_title = "key-token alignment by checkpoint"
        table = self.query_one("#accuracy", DataTable)
        table.add_column("kind", key="kind")
        for m, label in METRICS:
            for s in SPLITS:
                table.add_column(f"{label} {'held-out' if s == 'heldout' else 'train'}", key=f"{m}:{s}")
        table.border_title = "accuracy (Δ vs previous checkpoint)"
        self.load_snapshot()

    # ---------------------------------------------------------------- loading
    @work(thread=True, exclusive=True, group="snapshot")
    def load_snapshot(self, notify: bool = False) -> None:
        before = dict(self.snap.slabs_committed) if self.snap else {}
        snap = self.data.load()
        if get_current_worker().is_cancelled:
            return
        self.app.call_from_thread(self._apply_snapshot, snap, before if notify else None)

    def _apply_snapshot(self, snap: Snapshot, before: dict[str, int] | None) -> None:
        old = self.snap
        keep_ck = self._point().id if old and old.points else None
        keep_layer = old.layers[self.layer_index] if old and old.layers and self.layer_index < len(old.layers) else None
        self.snap = snap
        series = snap.series()
        if self.series not in series and series:
            self.set_reactive(MainScreen.series, "main" if "main" in series else series[0])
        pos = snap.series_positions(self.series)
        ids = [snap.points[i].id for i in pos]
        kinds = self.kind_choices()
        # keep the selection by checkpoint id and layer value; first load: last checkpoint, middle layer
        if keep_ck in ids:
            ck = ids.index(keep_ck)
        else:
            ck = max(0, len(ids) - 1) if old is None else min(self.ckpt, max(0, len(ids) - 1))
        if keep_layer in snap.layers:
            layer = snap.layers.index(keep_layer)
        else:
            layer = len(snap.layers) // 2 if snap.layers else 0
        n_rows = sum(1 for k in snap.kinds if snap.metrics_present.get(k))
        self.query_one("#accuracy", DataTable).styles.height = max(4, n_rows + 3)  # fixed: no layout per step
        self.set_reactive(MainScreen.ckpt, ck)
        self.set_reactive(MainScreen.layer_index, layer)
        if self.kind not in kinds:
            self.set_reactive(MainScreen.kind, "key" if "key" in kinds else (kinds[0] if kinds else ""))
        # the run's tables, DOM and modules are long-lived: keep them out of the collector's full
        # passes, which otherwise stall a key press now and then (bench_tui.py: p95 CPU 115 → ~70 ms)
        gc.unfreeze()  # let the previous snapshot's cycles go first
        gc.collect()
        gc.freeze()
        if before is not None:
            new = sum(snap.slabs_committed.values()) - sum(before.values())
            self.notify(f"refreshed from the store: {sum(snap.slabs_committed.values())} projection slabs committed ({new:+d})")
        self.update_view()

    def _set_text(self, selector: str, text: str) -> None:
        """Update a fixed-size Static only if its text changed (no layout pass)."""
        w = self.query_one(selector, Static)
        if getattr(w, "_rotelab_text", None) != text:
            w._rotelab_text = text  # type: ignore[attr-defined]
            w.update(text, layout=False)

    # ---------------------------------------------------------------- state helpers
    def positions(self) -> list[int]:
        return self.snap.series_positions(self.series) if self.snap else []

    def _point_index(self) -> int:
        pos = self.positions()
        return pos[min(self.ckpt, len(pos) - 1)] if pos else 0

    def _point(self):
        assert self.snap is not None
        return self.snap.points[self._point_index()]

    def kind_choices(self) -> list[str]:
        """Kinds with any projection, then ``all`` when some kind has a joint projection."""
        if self.snap is None:
            return []
        out = [k for k in self.snap.kinds if self.snap.projections.get(k)] or list(self.snap.kinds)
        if any(n.endswith("_joint") for k in self.snap.kinds for n in self.snap.projections.get(k, [])):
            out.append(ALL)
        return out

    def slab_request(self) -> SlabRequest | None:
        snap = self.snap
        if snap is None or not snap.points or not snap.layers or not self.kind:
            return None
        joint = self.joint or self.kind == ALL
        name = projection_name(self.method, joint)
        kinds = tuple(snap.projection_kinds(name)) if self.kind == ALL else (self.kind,)
        return SlabRequest(kinds, name, self._point().id, snap.layers[min(self.layer_index, len(snap.layers) - 1)])

    # ---------------------------------------------------------------- watchers
    def watch_ckpt(self) -> None:
        self.update_view()

    def watch_layer_index(self) -> None:
        self.update_view()

    def watch_kind(self) -> None:
        self.update_view()

    def watch_method(self) -> None:
        self.update_view()

    def watch_joint(self) -> None:
        self.update_view()

    def watch_color_by(self) -> None:
        self.update_view()

    def watch_series(self) -> None:
        self.ckpt = min(self.ckpt, max(0, len(self.positions()) - 1))
        self.update_view()

    # ---------------------------------------------------------------- painting
    def update_view(self) -> None:
        """Repaint for the current selection. The slab is read in a worker; the other panels are
        painted together with it (one frame), or after ``PANEL_WAIT`` s if the read is slow."""
        snap = self.snap
        if snap is None:
            return
        req = self.slab_request()
        self._request += 1
        if req is None:
            self._paint_panels()
            self.query_one(ScatterPlot).set_data(None, np.zeros(0, dtype=np.int64), snap.message or "nothing captured yet")
            return
        if all(self.data.cached(k, req.name, req.checkpoint, req.layer) for k in req.kinds):
            self._apply_slabs(self._request, req, [self.data.projection(k, req.name, req.checkpoint, req.layer) for k in req.kinds])
        else:
            self._panels_pending = self._request
            self.load_slabs(self._request, req)
            self.set_timer(self.PANEL_WAIT, self._paint_pending_panels)

    def _paint_panels(self) -> None:
        self._panels_pending = None
        self._paint_position()
        self._paint_timeline()
        self._paint_curves()
        self._paint_accuracy()

    def _paint_pending_panels(self) -> None:
        if self._panels_pending is not None:
            self._paint_panels()

    @work(thread=True, exclusive=True, group="slab")
    def load_slabs(self, request: int, req: SlabRequest) -> None:
        worker = get_current_worker()
        parts = []
        for k in req.kinds:
            if worker.is_cancelled:
                return
            parts.append(self.data.projection(k, req.name, req.checkpoint, req.layer))
        if not worker.is_cancelled:
            self.app.call_from_thread(self._apply_slabs, request, req, parts)

    def _apply_slabs(self, request: int, req: SlabRequest, parts: list[np.ndarray | None]) -> None:
        if request != self._request or self.snap is None:  # stale: the selection moved on
            return
        self._paint_panels()
        snap = self.snap
        xy_parts, color_parts, spans = [], [], []
        cats = snap.relations if self.color_by == "relation" else list(req.kinds)
        start = 0
        for i, (k, xy) in enumerate(zip(req.kinds, parts)):
            if xy is None:
                continue
            xy_parts.append(xy)
            color_parts.append(snap.relation_index[k] if self.color_by == "relation" else np.full(len(xy), i, dtype=np.int64))
            spans.append((k, start, len(xy)))
            start += len(xy)
        self._scatter_spans = spans
        n_rows = start
        colors = np.concatenate(color_parts) if color_parts else np.zeros(0, dtype=np.int64)
        xy = np.vstack(xy_parts) if len(xy_parts) > 1 else (xy_parts[0] if xy_parts else None)
        missing = not xy_parts
        msg = (
            f"no {req.name} for {', '.join(req.kinds) or 'any kind'} (run the analyses)"
            if missing
            else f"slab {req.checkpoint} × layer {req.layer} not committed yet (r refreshes)"
        )
        scatter = self.query_one(ScatterPlot)
        scatter.set_data(xy, colors, msg, view_key=(req.checkpoint, req.layer, req.kinds, req.name, self.color_by))
        li = snap.layers.index(req.layer)
        pi = self._point_index()
        dcs = [snap.delta_cossim[k][pi, li] for k in req.kinds if k in snap.delta_cossim]
        dcs_txt = fmt(dcs[0]) if len(dcs) == 1 else ("—" if not dcs else " / ".join(fmt(v, 2) for v in dcs))
        box = self.query_one("#scatter-box")
        shown = 0 if xy is None else int(np.isfinite(xy).all(axis=1).sum())
        box.border_title = f"{req.name.replace('proj_', '').upper()} · {self.kind} · {req.checkpoint} · layer {req.layer} · ΔCosSim {dcs_txt}"
        box.border_subtitle = f"{shown} of {n_rows} points"
        self._set_text("#legend", legend(cats) + f"   [dim](colored by {self.color_by})[/]")
        if self.PREFETCH:  # after this frame is painted, so it does not compete with it
            self.set_timer(0.05, lambda: self.prefetch(req) if self._request == request else None)

    @work(thread=True, exclusive=True, group="prefetch")
    def prefetch(self, req: SlabRequest) -> None:
        """Read the neighbouring slabs (±1 checkpoint, ±1 layer) into the cache while the user looks."""
        snap = self.snap
        if snap is None:
            return
        pos = self.positions()
        ids = [snap.points[i].id for i in pos]
        if req.checkpoint not in ids or req.layer not in snap.layers:
            return
        ci, li = ids.index(req.checkpoint), snap.layers.index(req.layer)
        worker = get_current_worker()
        for dc, dl in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            c, l = ci + dc, li + dl
            if 0 <= c < len(ids) and 0 <= l < len(snap.layers):
                for k in req.kinds:
                    if worker.is_cancelled:
                        return
                    self.data.projection(k, req.name, ids[c], snap.layers[l])

    def _paint_position(self) -> None:
        snap = self.snap
        assert snap is not None
        if not snap.points:
            self._set_text("#position", f"[b]{snap.name}[/]  {snap.message or 'no checkpoints yet'}")
            return
        p = self._point()
        layer = snap.layers[self.layer_index] if snap.layers else "—"
        joint = " (joint)" if self.joint and self.kind != ALL else ""
        txt = (
            f"[b]{snap.name}[/] │ series [b]{self.series}[/] │ checkpoint [b]{p.id}[/] ({p.label}) │ "
            f"layer [b]{layer}[/] │ kind [b]{self.kind or '—'}[/]{joint} │ {self.method.upper()} │ color: {self.color_by}"
        )
        if snap.message:
            txt += f" │ [i]{snap.message}[/]"
        self._set_text("#position", txt)

    def _available(self, gi: int) -> bool:
        snap = self.snap
        assert snap is not None
        kinds = [self.kind] if self.kind in snap.kinds else snap.kinds
        for k in kinds:
            if k in snap.delta_cossim and np.isfinite(snap.delta_cossim[k][gi]).any():
                return True
            if k in snap.accuracy and np.isfinite(snap.accuracy[k][gi]).any():
                return True
        return False

    def _paint_timeline(self) -> None:
        snap = self.snap
        assert snap is not None
        pos = self.positions()
        pts = [snap.points[i] for i in pos]
        self.query_one(Timeline).set_points(pts, min(self.ckpt, max(0, len(pts) - 1)), [self._available(i) for i in pos])
        dk = self._dcs_kind()
        vals = snap.delta_cossim[dk][self._point_index()] if dk and pos else np.zeros(0)
        self.query_one(LayerBar).set_layers(snap.layers, self.layer_index, vals)

    def _dcs_kind(self) -> str | None:
        snap = self.snap
        assert snap is not None
        if self.kind in snap.delta_cossim:
            return self.kind
        return next(iter(snap.delta_cossim), None)

    def _paint_curves(self) -> None:
        snap = self.snap
        assert snap is not None
        pos = self.positions()
        kinds = [k for k in (snap.kinds if self.kind == ALL else [self.kind]) if k in snap.delta_cossim]
        gi = self._point_index()
        by_layer = self.query_one("#dcs-layer", LinePlot)
        by_ckpt = self.query_one("#dcs-ckpt", LinePlot)
        bounds = [i - 0.5 for i in range(1, len(pos)) if snap.points[pos[i]].phase != snap.points[pos[i - 1]].phase]
        if pos and snap.layers:
            by_layer.set_series([snap.delta_cossim[k][gi] for k in kinds], list(range(len(kinds))), marker=self.layer_index,
                                empty_message="no ΔCosSim for this checkpoint")
            by_ckpt.set_series([snap.delta_cossim[k][pos, self.layer_index] for k in kinds], list(range(len(kinds))),
                               marker=self.ckpt, boundaries=bounds, empty_message="no ΔCosSim for this layer")
            by_layer.border_title = f"ΔCosSim by layer · {snap.points[gi].id}"
            by_ckpt.border_title = f"ΔCosSim by checkpoint · layer {snap.layers[self.layer_index]}"
        else:
            by_layer.set_series([], [], empty_message="no ΔCosSim")
            by_ckpt.set_series([], [], empty_message="no ΔCosSim")
        if len(kinds) > 1:
            by_layer.border_subtitle = legend(kinds)
        align = self.query_one("#align", LinePlot)
        curves = snap.alignment_curves(snap.layers[self.layer_index]) if snap.layers else {}
        names = list(curves)
        align.set_series([curves[n][pos] for n in names], list(range(len(names))), marker=self.ckpt, boundaries=bounds,
                         empty_message="no alignment table (run the analyses)")
        align.border_subtitle = legend(names) if names else ""
        align.border_title = f"key-token alignment (cosine) · layer {snap.layers[self.layer_index] if snap.layers else '—'}"

    def _paint_accuracy(self) -> None:
        snap = self.snap
        assert snap is not None
        table = self.query_one("#accuracy", DataTable)
        gi = self._point_index()
        key = (id(snap), gi, self.series)
        if key == self._accuracy_key:
            return
        self._accuracy_key = key
        table.clear()
        if not snap.points:
            return
        prev = snap.previous(self.series, gi)
        for k in snap.kinds:
            a = snap.accuracy.get(k)
            if a is None or not snap.metrics_present.get(k):
                continue
            row: list[Text | str] = [k]
            for m in range(len(METRICS)):
                for s in range(len(SPLITS)):
                    v = a[gi, s, m]
                    d = v - a[prev, s, m] if prev is not None else float("nan")
                    t = Text(fmt(v))
                    if np.isfinite(d):
                        t.append(" " + fmt_delta(d, 3), style="green" if d > 0 else "red" if d < 0 else "dim")
                    row.append(t)
            table.add_row(*row, key=k)
        p = snap.points[gi]
        prev_txt = snap.points[prev].id if prev is not None else "none"
        table.border_title = f"accuracy at {p.id} (Δ vs {prev_txt}) · {len(table.rows)} kinds"

    # ---------------------------------------------------------------- actions
    def action_checkpoint(self, step: int) -> None:
        n = len(self.positions())
        if n:
            self.ckpt = max(0, min(n - 1, self.ckpt + step))

    def action_checkpoint_to(self, index: int) -> None:
        n = len(self.positions())
        if n:
            self.ckpt = index % n

    def action_layer(self, step: int) -> None:
        if self.snap and self.snap.layers:
            self.layer_index = max(0, min(len(self.snap.layers) - 1, self.layer_index + step))

    def action_layer_to(self, index: int) -> None:
        if self.snap and self.snap.layers:
            self.layer_index = index % len(self.snap.layers)

    def action_kind(self, step: int) -> None:
        choices = self.kind_choices()
        if choices:
            i = choices.index(self.kind) if self.kind in choices else -1
            self.kind = choices[(i + step) % len(choices)]

    def action_method(self) -> None:
        self.method = "umap" if self.method == "pca" else "pca"

    def action_joint(self) -> None:
        self.joint = not self.joint

    def action_color_by(self) -> None:
        self.color_by = "kind" if self.color_by == "relation" else "relation"

    def action_series(self) -> None:
        if self.snap:
            s = self.snap.series()
            if s:
                self.series = s[(s.index(self.series) + 1) % len(s)] if self.series in s else s[0]

    def action_refresh(self) -> None:
        self.load_snapshot(notify=True)

    def action_back(self) -> None:
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()

    def action_find_fact(self) -> None:
        from .screens import FactPicker

        if self.snap is None or not self.snap.kinds:
            self.notify("no item tables in the store yet", severity="warning")
            return
        self.app.push_screen(FactPicker(self.snap), self.open_fact)

    def open_fact(self, fact_id: str | None) -> None:
        from .screens import FactScreen

        if fact_id:
            self.app.push_screen(FactScreen(self.data, fact_id, self._point_index(), self.series))

    def action_patching(self) -> None:
        from .screens import PatchingScreen

        panels: list[PatchingPanel] = patching_panels(self.snap.patching if self.snap else None, self.snap.points if self.snap else [])
        if not panels:
            self.notify("no patching results in this run (analyses.patching)", severity="warning")
            return
        self.app.push_screen(PatchingScreen(panels, self.data.run))

    def action_export(self) -> None:
        if self.snap is None or not self.snap.points or not self.snap.layers:
            self.notify("nothing to export yet", severity="warning")
            return
        self.export_view()

    @work(thread=True, exclusive=True, group="export")
    def export_view(self) -> None:
        from .export import ViewSelection, describe, export_view

        snap, req = self.snap, self.slab_request()
        if snap is None or req is None or not req.kinds:
            self.app.call_from_thread(self.notify, "no projection to export here", severity="warning")
            return
        sel = ViewSelection(req.kinds, req.name, req.checkpoint, req.layer,
                            with_delta_cossim=all(k in snap.delta_cossim for k in req.kinds))
        out_dir = getattr(self.app, "export_dir", None) or (self.data.run.figures_dir / "tui")
        try:
            paths = export_view(self.data.run, sel, out_dir)
        except Exception as err:  # a figure that fails must not take the browser down
            self.app.call_from_thread(self.notify, f"export failed: {err}", severity="error")
            return
        self.last_export = paths
        self.app.call_from_thread(self.notify, describe(paths), timeout=8)

    # ---------------------------------------------------------------- mouse
    @on(Timeline.Selected)
    def _timeline_clicked(self, event: Timeline.Selected) -> None:
        self.ckpt = event.index

    @on(LayerBar.Selected)
    def _layer_clicked(self, event: LayerBar.Selected) -> None:
        self.layer_index = event.index

    @on(ScatterPlot.PointClicked)
    def _point_clicked(self, event: ScatterPlot.PointClicked) -> None:
        if self.snap is None:
            return
        for kind, start, n in self._scatter_spans:
            if start <= event.index < start + n:
                fid = self.snap.items[kind]["fact_id"].iloc[event.index - start]
                self.open_fact(str(fid))
                return

    @on(DataTable.RowSelected, "#accuracy")
    def _kind_row(self, event: DataTable.RowSelected) -> None:
        k = str(event.row_key.value)
        if k in self.kind_choices():
            self.kind = k
