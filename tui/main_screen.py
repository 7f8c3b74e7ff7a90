"""The main screen: timeline and layer selector, the projection of the selected slab, curves and
the accuracy table. The selection is one reactive value (:class:`~rotelab.tui.views.Selection`);
each panel paints itself from the view model :mod:`rotelab.tui.views` computes for it. Snapshot
loads, and slab reads once one was slow (:attr:`MainScreen.INLINE_READ`), run in thread workers
that post their results as messages; results for an outdated selection are dropped."""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import DataTable, Footer
from textual.worker import get_current_worker

from . import views
from .actions import MAIN_ACTIONS, bindings
from .data import Point, RunData, Snapshot
from .panels import AccuracyPanel, CurvesPanel, PositionBar, ScatterPanel
from .screens import ExportDone, FactPicker, FactScreen, PatchingScreen, WhereScreen, notify_export
from .views import ALL, HeatmapPanel, Selection, SlabRequest, patching_panels, where_panels
from .widgets import LayerBar, ScatterPlot, Timeline, legend

__all__ = ["ALL", "MainScreen", "SlabRequest"]


def _selection_field(name: str) -> Any:
    """A property reading / setting one field of :attr:`MainScreen.selection` (setting it
    replaces the selection, which repaints)."""

    def get(self: MainScreen) -> Any:
        return getattr(self.selection, name)

    def set_(self: MainScreen, value: Any) -> None:
        self.selection = replace(self.selection, **{name: value})

    return property(get, set_, doc=f"``selection.{name}``")


class MainScreen(Screen):
    """Layers × epochs of one run."""

    AUTO_FOCUS = None
    PANEL_WAIT = 0.05
    """Seconds the panels wait for a slab read before they are painted without it."""
    PREFETCH = False
    """Read the neighbouring slabs in the background after each step. Off by default: a slab read
    costs ~1 ms against ~25 ms of painting (bench_tui.py), so it only pays on slow file systems."""
    INLINE_READ = 0.005
    """Seconds: while slab reads take at most this long, the slab is read on the UI thread (no
    worker thread to wake, no second message: ~10 ms less per press on a loaded machine,
    bench_tui.py); after a slower read, reads go to a worker again until one is fast. Not with
    :attr:`PREFETCH` (its worker holds the reader while it reads)."""

    BINDINGS = bindings(MAIN_ACTIONS)

    class SnapshotLoaded(Message):
        """A worker read the run's snapshot (``before``: committed slab counts before a refresh
        the user asked for, else None)."""

        def __init__(self, snapshot: Snapshot, before: dict[str, int] | None) -> None:
            self.snapshot, self.before = snapshot, before
            super().__init__()

    class SlabsLoaded(Message):
        """A worker read the slabs of request number ``request`` (one part per kind, None where
        the kind has no such array)."""

        def __init__(self, request: int, req: SlabRequest, parts: list[np.ndarray | None]) -> None:
            self.request, self.req, self.parts = request, req, parts
            super().__init__()

    selection: var[Selection] = var(Selection(), init=False)
    ckpt = _selection_field("ckpt")
    layer_index = _selection_field("layer_index")
    kind = _selection_field("kind")
    method = _selection_field("method")
    joint = _selection_field("joint")
    color_by = _selection_field("color_by")
    series = _selection_field("series")

    def __init__(self, data: RunData) -> None:
        super().__init__()
        self.data = data
        self.snap: Snapshot | None = None
        self._request = 0
        self._scatter_spans: list[tuple[str, int, int]] = []  # (kind, first row, rows) per kind drawn
        self._panels_pending: int | None = None
        self._last_read_s = float("inf")
        """Seconds the last slab read took (inf: none yet, so the first one goes to a worker)."""
        self.last_export: list[Path] = []
        """Files of the last export (PNG, PDF, SVG, CSV)."""

    # ---------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield PositionBar("loading…", id="position")
        yield Timeline(id="timeline")
        yield LayerBar(id="layerbar")
        with Horizontal(id="body"):
            yield ScatterPanel(id="scatter-box")
            yield CurvesPanel(id="curves")
        yield AccuracyPanel(id="accuracy")
        yield Footer()

    def on_mount(self) -> None:
        self.load_snapshot()

    # ---------------------------------------------------------------- loading
    @work(thread=True, exclusive=True, group="snapshot")
    def load_snapshot(self, notify: bool = False) -> None:
        before = dict(self.snap.slabs_committed) if self.snap else {}
        snap = self.data.load()
        if snap.layers:  # the curves of every layer, here rather than on the first key press
            snap.alignment_curves(snap.layers[0])
        if get_current_worker().is_cancelled:
            return
        self.post_message(self.SnapshotLoaded(snap, before if notify else None))

    @on(SnapshotLoaded)
    def _snapshot_loaded(self, message: SnapshotLoaded) -> None:
        self._apply_snapshot(message.snapshot, message.before)

    def _apply_snapshot(self, snap: Snapshot, before: dict[str, int] | None) -> None:
        old = self.snap
        sel = self.selection
        keep_ck = self._point().id if old and old.points else None
        keep_layer = old.layers[sel.layer_index] if old and old.layers and sel.layer_index < len(old.layers) else None
        self.snap = snap
        series = snap.series()
        if sel.series not in series and series:
            sel = replace(sel, series="main" if "main" in series else series[0])
        pos = snap.series_positions(sel.series)
        ids = [snap.points[i].id for i in pos]
        kinds = views.kind_choices(snap)
        # keep the selection by checkpoint id and layer value; first load: last checkpoint, middle layer
        if keep_ck in ids:
            ck = ids.index(keep_ck)
        else:
            ck = max(0, len(ids) - 1) if old is None else min(sel.ckpt, max(0, len(ids) - 1))
        if keep_layer in snap.layers:
            layer = snap.layers.index(keep_layer)
        else:
            layer = len(snap.layers) // 2 if snap.layers else 0
        n_rows = sum(1 for k in snap.kinds if snap.metrics_present.get(k))
        self.query_one(AccuracyPanel).styles.height = max(4, n_rows + 3)  # fixed: no layout per step
        sel = replace(sel, ckpt=ck, layer_index=layer)
        if sel.kind not in kinds:
            sel = replace(sel, kind="key" if "key" in kinds else (kinds[0] if kinds else ""))
        self.set_reactive(MainScreen.selection, sel)
        # the run's tables, DOM and modules are long-lived: keep them out of the collector's full
        # passes, which otherwise stall a key press now and then (bench_tui.py: p95 CPU 115 → ~70 ms)
        gc.unfreeze()  # let the previous snapshot's cycles go first
        gc.collect()
        gc.freeze()
        if before is not None:
            new = sum(snap.slabs_committed.values()) - sum(before.values())
            self.notify(f"refreshed from the store: {sum(snap.slabs_committed.values())} projection slabs committed ({new:+d})")
        self.update_view()

    # ---------------------------------------------------------------- state helpers
    def positions(self) -> list[int]:
        return views.positions(self.snap, self.selection)

    def _point_index(self) -> int:
        return views.point_index(self.snap, self.selection)

    def _point(self) -> Point:
        assert self.snap is not None
        return self.snap.points[self._point_index()]

    def kind_choices(self) -> list[str]:
        return views.kind_choices(self.snap)

    def slab_request(self) -> SlabRequest | None:
        return views.slab_request(self.snap, self.selection)

    def watch_selection(self, old: Selection, new: Selection) -> None:
        if new.series != old.series:  # keep the index inside the new series' timeline
            clamped = min(new.ckpt, max(0, len(self.positions()) - 1))
            if clamped != new.ckpt:
                self.set_reactive(MainScreen.selection, replace(new, ckpt=clamped))
        self.update_view()

    # ---------------------------------------------------------------- painting
    def update_view(self) -> None:
        """Repaint for the current selection. The slab is read right here while reads are fast
        (:attr:`INLINE_READ`), else in a worker; the other panels are painted together with it
        (one frame), or after ``PANEL_WAIT`` s if the worker's read is slow."""
        snap = self.snap
        if snap is None:
            return
        req = self.slab_request()
        self._request += 1
        if req is None:
            self._paint_panels()
            self.query_one(ScatterPanel).show_empty(snap.message or "nothing captured yet")
            return
        cached = all(self.data.cached(k, req.name, req.checkpoint, req.layer) for k in req.kinds)
        if cached or (self._last_read_s <= self.INLINE_READ and not self.PREFETCH):
            t = time.perf_counter()
            parts = [self.data.projection(k, req.name, req.checkpoint, req.layer) for k in req.kinds]
            if not cached:
                self._last_read_s = time.perf_counter() - t
            self._apply_slabs(self._request, req, parts)
        else:
            self._panels_pending = self._request
            self.load_slabs(self._request, req)
            self.set_timer(self.PANEL_WAIT, self._paint_pending_panels)

    def _paint_panels(self) -> None:
        """Every panel but the scatter, from its view."""
        self._panels_pending = None
        snap, sel = self.snap, self.selection
        assert snap is not None
        self.query_one(PositionBar).show(views.position_text(snap, sel))
        self.query_one(Timeline).show(views.timeline_view(snap, sel))
        self.query_one(LayerBar).show(views.layer_view(snap, sel))
        self.query_one(CurvesPanel).show(views.curves_view(snap, sel, legend))
        self.query_one(AccuracyPanel).show(views.accuracy_view(snap, sel))

    def _paint_pending_panels(self) -> None:
        if self._panels_pending is not None:
            self._paint_panels()

    @work(thread=True, exclusive=True, group="slab")
    def load_slabs(self, request: int, req: SlabRequest) -> None:
        worker = get_current_worker()
        parts = []
        t = time.perf_counter()
        for k in req.kinds:
            if worker.is_cancelled:
                return
            parts.append(self.data.projection(k, req.name, req.checkpoint, req.layer))
        self._last_read_s = time.perf_counter() - t
        if not worker.is_cancelled:
            self.post_message(self.SlabsLoaded(request, req, parts))

    @on(SlabsLoaded)
    def _slabs_loaded(self, message: SlabsLoaded) -> None:
        self._apply_slabs(message.request, message.req, message.parts)

    def _apply_slabs(self, request: int, req: SlabRequest, parts: list[np.ndarray | None]) -> None:
        if request != self._request or self.snap is None:  # stale: the selection moved on
            return
        self._paint_panels()
        view = views.scatter_view(self.snap, self.selection, req, parts)
        self._scatter_spans = view.spans
        self.query_one(ScatterPanel).show(view, self.selection.color_by)
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
        if self.snap is None or not self.snap.kinds:
            self.notify("no item tables in the store yet", severity="warning")
            return
        self.app.push_screen(FactPicker(self.snap), self.open_fact)

    def open_fact(self, fact_id: str | None) -> None:
        if fact_id:
            self.app.push_screen(FactScreen(self.data, fact_id, self._point_index(), self.series))

    def action_patching(self) -> None:
        panels: list[HeatmapPanel] = patching_panels(self.snap.patching if self.snap else None, self.snap.points if self.snap else [])
        if not panels:
            self.notify("no patching results in this run (analyses.patching)", severity="warning")
            return
        self.app.push_screen(PatchingScreen(panels, self.data.run))

    def action_where(self) -> None:
        panels = where_panels(self.snap, self.selection)
        if not panels:
            self.notify("no logit lens, probe or CKA results in this run (rotelab analyze)", severity="warning")
            return
        self.app.push_screen(WhereScreen(panels, self.data.run))

    def action_export(self) -> None:
        if self.snap is None or not self.snap.points or not self.snap.layers:
            self.notify("nothing to export yet", severity="warning")
            return
        self.export_view()

    @work(thread=True, exclusive=True, group="export")
    def export_view(self) -> None:
        from .export import ViewSelection, export_view

        snap, req = self.snap, self.slab_request()
        if snap is None or req is None or not req.kinds:
            self.post_message(ExportDone([], "no projection to export here", "warning"))
            return
        sel = ViewSelection(req.kinds, req.name, req.checkpoint, req.layer,
                            with_delta_cossim=all(k in snap.delta_cossim for k in req.kinds))
        out_dir = getattr(self.app, "export_dir", None) or (self.data.run.figures_dir / "tui")
        try:
            paths = export_view(self.data.run, sel, out_dir)
        except Exception as err:  # a figure that fails must not take the browser down
            self.post_message(ExportDone([], f"export failed: {err}"))
            return
        self.last_export = paths
        self.post_message(ExportDone(paths))

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

    @on(ExportDone)
    def _exported(self, message: ExportDone) -> None:
        notify_export(self, message)

    @on(DataTable.RowSelected, "#accuracy")
    def _kind_row(self, event: DataTable.RowSelected) -> None:
        k = str(event.row_key.value)
        if k in self.kind_choices():
            self.kind = k
