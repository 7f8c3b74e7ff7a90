"""Secondary screens: run picker, fact picker, fact drill-down, patching heatmap, help."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, OptionList, Static
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from rotelab.errors import RotelabError
from rotelab.run import Run

from .data import FactDetail, PatchingPanel, RunData, Snapshot, find_runs, fmt
from .widgets import Heatmap, LinePlot, legend


class RunPicker(Screen):
    """A folder of runs: pick one to browse."""

    BINDINGS = [Binding("enter", "open", "open run", show=True), Binding("r", "rescan", "rescan", show=True)]

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
            try:
                run = Run.open(p)
                model, n = run.config.model.name, str(len(run.checkpoints()))
            except RotelabError as err:
                model, n = f"unreadable: {err}"[:40], "—"
            store = p / "store.zarr"
            kinds = sorted(d.name for d in store.iterdir() if (d / "zarr.json").is_file() and d.name != "tables") if store.is_dir() else []
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
        from .main_screen import MainScreen

        try:
            data = RunData.open(path)
        except RotelabError as err:
            self.notify(str(err), severity="error")
            return
        self.app.push_screen(MainScreen(data))


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
    """One fact: its prompts per kind, generations and metrics at the selected checkpoint, and
    object probability per kind across checkpoints."""

    BINDINGS = [
        Binding("escape,backspace", "app.pop_screen", "back", show=True),
        Binding("left,h", "checkpoint(-1)", "◀ ckpt", show=True),
        Binding("right,l", "checkpoint(1)", "ckpt ▶", show=True),
    ]

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
        yield Footer()

    def on_mount(self) -> None:
        t = self.query_one("#prompts", DataTable)
        for c in ("kind", "tpl", "prompt", "P(obj)", "MC", "gen ok", "generation"):
            t.add_column(c, key=c)
        self.load_detail()

    @work(thread=True, exclusive=True, group="fact")
    def load_detail(self) -> None:
        try:
            detail = self.data.fact_detail(self.fact_id)
        except RotelabError as err:
            self.app.call_from_thread(self.notify, str(err), severity="error")
            return
        if not get_current_worker().is_cancelled:
            self.app.call_from_thread(self._show, detail)

    def _show(self, detail: FactDetail) -> None:
        self.detail = detail
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


class PatchingScreen(Screen):
    """The patching sweep as layer × checkpoint heatmaps (``t`` cycles the panels)."""

    BINDINGS = [
        Binding("escape,backspace", "app.pop_screen", "back", show=True),
        Binding("t", "panel", "next panel", show=True),
        Binding("e", "export", "export", show=True),
    ]

    def __init__(self, panels: list[PatchingPanel], run: Run | None = None) -> None:
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
        self.query_one("#position", Static).update(f"[b]patching[/] · {p.title} · panel {self.index + 1}/{len(self.panels)} · rows: layers, columns: checkpoints")
        self.query_one(Heatmap).set_values(p.values, [str(v) for v in p.layers], p.columns)
        self.query_one("#columns", Static).update("columns: " + "  ".join(f"{i}={c}" for i, c in enumerate(p.columns)))

    def action_export(self) -> None:
        if self.run is not None:
            self.export_panel()

    @work(thread=True, exclusive=True, group="export")
    def export_panel(self) -> None:
        from .export import describe, export_patching

        assert self.run is not None
        out_dir = getattr(self.app, "export_dir", None) or (self.run.figures_dir / "tui")
        try:
            paths = export_patching(self.run, self.panels[self.index].keys, out_dir)
        except Exception as err:  # a figure that fails must not take the browser down
            self.app.call_from_thread(self.notify, f"export failed: {err}", severity="error")
            return
        self.last_export = paths
        self.app.call_from_thread(self.notify, describe(paths), timeout=8)


class HelpScreen(ModalScreen[None]):
    """All key bindings (collected from the screens, so the list is always complete)."""

    BINDINGS = [Binding("escape,question_mark,q", "dismiss_help", "close")]

    def compose(self) -> ComposeResult:
        from .main_screen import MainScreen

        lines = ["[b]rotelab browser — keys[/]", ""]
        for title, bindings in (
            ("main screen", MainScreen.BINDINGS),
            ("fact drill-down", FactScreen.BINDINGS),
            ("patching", PatchingScreen.BINDINGS),
            ("run picker", RunPicker.BINDINGS),
            ("everywhere", [Binding("question_mark", "", "this help"), Binding("ctrl+p", "", "command palette"), Binding("q", "", "quit")]),
        ):
            lines.append(f"[b]{title}[/]")
            for b in bindings:
                assert isinstance(b, Binding)
                keys = ", ".join(_key_name(k) for k in b.key.split(","))
                lines.append(f"  [b]{keys:<18}[/] {b.description}")
            lines.append("")
        lines.append("mouse: click the timeline, the layer bar, a point (opens its fact) or an accuracy row (shows that kind)")
        lines.append("missing data is hatched or shown as —, never as 0; r re-reads what capture has committed since")
        with Vertical(id="help"):
            yield Static("\n".join(lines))

    def action_dismiss_help(self) -> None:
        self.dismiss(None)


def _key_name(key: str) -> str:
    return {"question_mark": "?", "escape": "esc"}.get(key, key)
