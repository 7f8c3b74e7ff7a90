"""The main screen's panels, each a widget that paints itself from its view model
(:mod:`rotelab.tui.views`): the position bar, the timeline and layer bar (:mod:`widgets`), the
projection scatter, the curves and the accuracy table. A panel only draws; what it shows is
computed without Textual, so it is tested on its own.
"""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from .data import METRICS, SPLITS
from .views import AccuracyView, CurvesView, CurveView, ScatterView, accuracy_cell
from .widgets import BorderTitles, LinePlot, ScatterPlot, legend


def set_text(widget: Static, text: str) -> None:
    """Update a fixed-size Static only if its text changed (no layout pass)."""
    if getattr(widget, "_rotelab_text", None) != text:
        widget._rotelab_text = text  # type: ignore[attr-defined]
        widget.update(text, layout=False)


class PositionBar(Static):
    """One line: run, series, checkpoint, layer, kind, method, coloring (markup text)."""

    def show(self, text: str) -> None:
        set_text(self, text)


class ScatterPanel(BorderTitles, Vertical):
    """The projection of the selected slab(s) with its legend; titles say what is shown."""

    def compose(self) -> ComposeResult:
        yield ScatterPlot(id="scatter")
        yield Static("", id="legend")

    def on_mount(self) -> None:
        self.border_title = "representation"

    def show(self, view: ScatterView, color_by: str) -> None:
        self.query_one(ScatterPlot).set_data(view.xy, view.colors, view.message, view_key=view.view_key)
        self.set_titles(view.title, view.subtitle)
        set_text(self.query_one("#legend", Static), legend(view.legend) + f"   [dim](colored by {color_by})[/]")

    def show_empty(self, message: str) -> None:
        self.query_one(ScatterPlot).set_data(None, np.zeros(0, dtype=np.int64), message)


def _show_curve(plot: LinePlot, view: CurveView) -> None:
    plot.set_series(view.series, view.colors, marker=view.marker, boundaries=view.boundaries, empty_message=view.empty_message)
    plot.set_titles(view.title, view.subtitle)


class CurvesPanel(Vertical):
    """ΔCosSim by layer, ΔCosSim by checkpoint, key-token alignment by checkpoint."""

    def compose(self) -> ComposeResult:
        yield LinePlot(id="dcs-layer", classes="curve")
        yield LinePlot(id="dcs-ckpt", classes="curve")
        yield LinePlot(id="align", classes="curve")

    def on_mount(self) -> None:
        self.query_one("#dcs-layer").border_title = "ΔCosSim by layer"
        self.query_one("#dcs-ckpt").border_title = "ΔCosSim by checkpoint"
        self.query_one("#align").border_title = "key-token alignment by checkpoint"

    def show(self, view: CurvesView) -> None:
        _show_curve(self.query_one("#dcs-layer", LinePlot), view.by_layer)
        _show_curve(self.query_one("#dcs-ckpt", LinePlot), view.by_ckpt)
        _show_curve(self.query_one("#align", LinePlot), view.align)


class AccuracyPanel(DataTable):
    """Accuracy per kind at the selected checkpoint and its change since the previous one."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, zebra_stripes=True, cursor_type="row")
        self.can_focus = False  # arrows and j/k belong to the timeline and the layers
        self._view_key: tuple | None = None

    def on_mount(self) -> None:
        self.add_column("kind", key="kind")
        for m, label in METRICS:
            for s in SPLITS:
                self.add_column(f"{label} {'held-out' if s == 'heldout' else 'train'}", key=f"{m}:{s}")
        self.border_title = "accuracy (Δ vs previous checkpoint)"

    def show(self, view: AccuracyView) -> None:
        if view.key == self._view_key:
            return
        self._view_key = view.key
        self.clear()
        if not view.title:
            return
        for kind, cells in view.rows:
            row: list[Text | str] = [kind]
            for value, delta in cells:
                v, d, style = accuracy_cell(value, delta)
                t = Text(v)
                if d:
                    t.append(d, style=style)
                row.append(t)
            self.add_row(*row, key=kind)
        self.border_title = view.title
