"""Secondary screens: run picker, fact picker, fact drill-down, patching and where-the-fact-lives
heatmaps, help."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from rotelab.errors import RotelabError
from rotelab.run import Run

from .actions import FACT_ACTIONS, PATCHING_ACTIONS, PICKER_ACTIONS, WHERE_ACTIONS, bindings, help_text
from .data import FactDetail, RunData, Snapshot, find_runs, fmt, store_kinds
from .views import HeatmapPanel, causal_trace_panel
from .widgets import Heatmap, LinePlot, legend


class ExportDone(Message):
    """An export worker finished: the files written, or why nothing was (``error``, shown with
    ``severity``)."""

    bubble = False

    def __init__(self, paths: list[Path], error: str = "", severity: str = "error") -> None:
        self.paths, self.error, self.severity = paths, error, severity
        super().__init__()


def notify_export(screen: Screen, message: ExportDone) -> None:
    """Tell the user how an export went."""
    from .export import describe

    if message.error:
        screen.notify(message.error, severity=message.severity)  # type: ignore[arg-type]
    else:
        screen.notify(describe(message.paths), timeout=8)


class RunPicker(Screen):
    """A folder of runs: pick one to browse (the app opens it on :class:`RunPicker.Chosen`)."""

    BINDINGS = bindings(PICKER_ACTIONS)

    class Chosen(Message):
        """The user picked a run; ``data`` is it, opened."""

        def __init__(self, data: RunData) -> None:
            self.data = data
            super().__init__()

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def compose(self) -> ComposeResult:
        yield Static(f"[b]runs in {self.folder.name or self.folder}[/] — enter opens, escape in a run comes back here", id="position")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        t = self.query_one(DataTable)
        for c in ("run", "model", "checkpoints", "store kinds", "modified"):
            t.add_column(c, key=c)
        self.action_rescan()

    def action_rescan(self) -> None:
        t = self.query_one(DataTable)
        t.clear()
        for p in find_runs(self.folder):
            kinds: list[str] = []
            try:
                run = Run.open(p)
                model, n = run.config.model.name, str(len(run.checkpoints()))
                kinds = store_kinds(run)
            except RotelabError as err:
                model, n = f"unreadable: {err}"[:40], "—"
            mtime = datetime.fromtimestamp(p.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
            t.add_row(p.name, model, n, ", ".join(kinds) or "—", mtime, key=str(p))
        if not t.row_count:
            self.notify(f"no runs (folders with config.yaml) in {self.folder}", severity="warning")

    def action_open(self) -> None:
        t = self.query_one(DataTable)
        if t.row_count:
            key = t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value
            self._open(str(key))

    @on(DataTable.RowSelected)
    def _selected(self, event: DataTable.RowSelected) -> None:
        self._open(str(event.row_key.value))

    def _open(self, path: str) -> None:
        try:
            data = RunData.open(path)
        except RotelabError as err:
            self.notify(str(err), severity="error")
            return
        self.post_message(self.Chosen(data))


class FactPicker(ModalScreen[str | None]):
    """Type to filter facts (id, subject, object); enter opens the drill-down."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]
    LIMIT = 300

    def __init__(self, snap: Snapshot) -> None:
        super().__init__()
        self.snap = snap
        self.facts = list(snap.fact_labels().items())

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Input(placeholder="filter facts: id, subject or object", id="fact-filter")
            yield OptionList(id="fact-list")

    def on_mount(self) -> None:
        self.query_one("#picker").border_title = f"find a fact ({len(self.facts)})"
        self._fill("")

    def _fill(self, query: str) -> None:
        q = query.lower().strip()
        ol = self.query_one(OptionList)
        ol.clear_options()
        hits = [(f, lab) for f, lab in self.facts if not q or q in f.lower() or q in lab.lower()]
        ol.add_options([Option(f"{f}  {lab}", id=f) for f, lab in hits[: self.LIMIT]])
        if hits:
            ol.highlighted = 0

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        self._fill(event.value)

    @on(Input.Submitted)
    def _submitted(self) -> None:
        ol = self.query_one(OptionList)
        if ol.highlighted is not None and ol.option_count:
            self.dismiss(ol.get_option_at_index(ol.highlighted).id)

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def key_down(self) -> None:
        self.query_one(OptionList).action_cursor_down()

    def key_up(self) -> None:
        self.query_one(OptionList).action_cursor_up()

    def action_cancel(self) -> None:
        self.dismiss(None)


class FactScreen(Screen):
    """One fact: its prompts per kind, generations and metrics at the selected checkpoint, object
    probability per kind across checkpoints, and its causal trace (layer × traced checkpoint ·
    kind · position) when the run has one."""

    BINDINGS = bindings(FACT_ACTIONS)

    def __init__(self, data: RunData, fact_id: str, point_index: int, series: str) -> None:
        super().__init__()
        self.data, self.fact_id, self.series = data, fact_id, series
        self.snap = data.snapshot
        assert self.snap is not None
        self.positions = self.snap.series_positions(series) or list(range(len(self.snap.points)))
        self.pos = self.positions.index(point_index) if point_index in self.positions else 0
        self.detail: FactDetail | None = None

    def compose(self) -> ComposeResult:
        yield Static(f"fact {self.fact_id} — loading…", id="position")
        yield LinePlot(id="fact-curve")
        yield DataTable(id="prompts", zebra_stripes=True, cursor_type="row")
        yield Heatmap(id="fact-trace", empty_message="no causal trace of this fact (analyses.causal_trace)")
        yield Static("", id="trace-columns")
        yield Footer()

    def on_mount(self) -> None:
        t = self.query_one("#prompts", DataTable)
        for c in ("kind", "tpl", "prompt", "P(obj)", "MC", "gen ok", "generation"):
            t.add_column(c, key=c)
        self.load_detail()

    class DetailLoaded(Message):
        """A worker read the fact's drill-down (``detail``), or failed (``error``)."""

        def __init__(self, detail: FactDetail | None, error: str = "") -> None:
            self.detail, self.error = detail, error
            super().__init__()

    @work(thread=True, exclusive=True, group="fact")
    def load_detail(self) -> None:
        try:
            detail = self.data.fact_detail(self.fact_id)
        except RotelabError as err:
            self.post_message(self.DetailLoaded(None, str(err)))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(self.DetailLoaded(detail))

    @on(DetailLoaded)
    def _show(self, message: DetailLoaded) -> None:
        if message.detail is None:
            self.notify(message.error, severity="error")
            return
        self.detail = message.detail
        self.paint()

    def action_checkpoint(self, step: int) -> None:
        self.pos = max(0, min(len(self.positions) - 1, self.pos + step))
        self.paint()

    def paint(self) -> None:
        d, snap = self.detail, self.snap
        if d is None or snap is None:
            return
        gi = self.positions[self.pos]
        p = snap.points[gi]
        self.query_one("#position", Static).update(
            f"[b]{d.fact_id}[/] · {snap.fact_label(d.fact_id)} · relation {d.relation} · split [b]{d.split}[/] · "
            f"checkpoint [b]{p.id}[/] ({p.label})"
        )
        kinds = list(dict.fromkeys(d.prompts["kind"].tolist()))
        curves = []
        for k in kinds:
            rows = (d.prompts["kind"] == k).to_numpy()
            vals = d.object_prob[rows][:, self.positions]
            cnt = np.sum(np.isfinite(vals), axis=0)
            curves.append(np.where(cnt > 0, np.nansum(np.nan_to_num(vals, nan=0.0), axis=0) / np.maximum(cnt, 1), np.nan))
        plot = self.query_one(LinePlot)
        plot.set_series(curves, list(range(len(kinds))), marker=self.pos, empty_message="no object probabilities for this fact yet")
        plot.border_title = "object probability by checkpoint (mean over templates)"
        plot.border_subtitle = legend(kinds)
        t = self.query_one("#prompts", DataTable)
        t.clear()
        for r, row in d.prompts.iterrows():
            gen = d.gen_text[r][gi]

            def mark(v: float) -> Text:
                return Text("—", style="dim") if not np.isfinite(v) else Text("✓", style="green") if v >= 0.5 else Text("✗", style="red")

            t.add_row(row["kind"], str(row["template_id"]), row["text"], fmt(d.object_prob[r, gi]), mark(d.mc_correct[r, gi]),
                      mark(d.gen_correct[r, gi]), "—" if gen is None else repr(gen))
        t.border_title = f"prompts of {d.fact_id} at {p.id} (object: {d.object})"
        trace = causal_trace_panel(snap, d.fact_id)
        heat = self.query_one("#fact-trace", Heatmap)
        heat.display = trace is not None  # no room taken where the run has no trace of this fact
        self.query_one("#trace-columns", Static).display = trace is not None
        if trace is not None:
            heat.set_values(trace.values, [str(v) for v in trace.layers], trace.columns)
            heat.border_title = trace.title
            self.query_one("#trace-columns", Static).update("trace columns: " + "  ".join(f"{i}={c}" for i, c in enumerate(trace.columns)))


class HeatmapScreen(Screen):
    """Layer × column heatmap panels (``t`` cycles them, ``e`` exports the panel's figure): the
    patching sweep (:class:`PatchingScreen`) or the where-the-fact-lives analyses
    (:class:`WhereScreen`)."""

    what = "heatmaps"
    columns_are = "checkpoints"

    def __init__(self, panels: list[HeatmapPanel], run: Run | None = None) -> None:
        super().__init__()
        self.panels = panels
        self.run = run
        self.index = 0
        self.last_export: list[Path] = []

    def compose(self) -> ComposeResult:
        yield Static("", id="position")
        yield Heatmap(id="heatmap")
        yield Static("", id="columns")
        yield Footer()

    def on_mount(self) -> None:
        self.paint()

    def action_panel(self) -> None:
        self.index = (self.index + 1) % len(self.panels)
        self.paint()

    def paint(self) -> None:
        p = self.panels[self.index]
        self.query_one("#position", Static).update(
            f"[b]{self.what}[/] · {p.title} · panel {self.index + 1}/{len(self.panels)} · rows: layers, columns: {self.columns_are}")
        self.query_one(Heatmap).set_values(p.values, [str(v) for v in p.layers], p.columns, p.mark)
        self.query_one("#columns", Static).update("columns: " + "  ".join(f"{i}={c}" for i, c in enumerate(p.columns)))

    def export_figure(self, keys: dict[str, str], out_dir: Path) -> list[Path]:
        """The paper figure of the panel with ``keys`` (each subclass names its analysis)."""
        raise NotImplementedError(f"{type(self).__name__} exports no figure")

    def action_export(self) -> None:
        if self.run is not None:
            self.export_panel()

    @work(thread=True, exclusive=True, group="export")
    def export_panel(self) -> None:
        assert self.run is not None
        out_dir = getattr(self.app, "export_dir", None) or (self.run.figures_dir / "tui")
        try:
            paths = self.export_figure(self.panels[self.index].keys, out_dir)
        except Exception as err:  # a figure that fails must not take the browser down
            self.post_message(ExportDone([], f"export failed: {err}"))
            return
        self.last_export = paths
        self.post_message(ExportDone(paths))

    @on(ExportDone)
    def _exported(self, message: ExportDone) -> None:
        notify_export(self, message)


class PatchingScreen(HeatmapScreen):
    """The patching sweep as layer × checkpoint heatmaps."""

    BINDINGS = bindings(PATCHING_ACTIONS)
    what = "patching"

    def export_figure(self, keys: dict[str, str], out_dir: Path) -> list[Path]:
        from .export import export_patching

        assert self.run is not None
        return export_patching(self.run, keys, out_dir)


class WhereScreen(HeatmapScreen):
    """Where the fact lives: logit lens, relation probes and CKA drift as layer × checkpoint
    heatmaps of one kind, the browser's cursor (layer, checkpoint) marked ``◆``."""

    BINDINGS = bindings(WHERE_ACTIONS)
    what = "where the fact lives"

    def export_figure(self, keys: dict[str, str], out_dir: Path) -> list[Path]:
        from .export import export_where

        assert self.run is not None
        return export_where(self.run, keys, out_dir)


class HelpScreen(ModalScreen[None]):
    """All key bindings (the action tables of :mod:`rotelab.tui.actions`, which also make the
    screens' bindings, so the list is always complete)."""

    BINDINGS = [Binding("escape,question_mark,q", "dismiss_help", "close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Static(help_text())

    def action_dismiss_help(self) -> None:
        self.dismiss(None)

