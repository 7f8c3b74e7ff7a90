"""The browser's widgets: timeline, layer bar, scatter, line plots and heatmap (drawn with
:mod:`rotelab.tui.canvas`), each a plain Textual widget using the line API."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Self

import numpy as np
from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.geometry import Region, Size
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget

from . import canvas
from .canvas import Rows, Run
from .data import Point, fmt
from .views import LayerView, TimelineView

#: Colors of relations / prompt kinds (Tableau 10, the same order the export uses).
PALETTE: tuple[str, ...] = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)
HEAT: tuple[str, ...] = ("#30123b", "#4662d7", "#36aaf9", "#1ae4b6", "#72fe5e", "#c8ef34", "#faba39", "#e4460a")
PHASE_COLORS = {"base": "#bab0ac", "phase1": "#4e79a7", "phase2": "#f28e2b"}
DIM = Style(color="#808080")
MISSING = Style(color="#606060")


def palette_styles(colors: Sequence[str] = PALETTE) -> list[Style]:
    return [Style(color=c) for c in colors]


class BorderTitles:
    """Mixin for a bordered widget whose titles change more often than its content (the scatter's
    box: a new slab changes its title, the plot inside repaints itself): :meth:`set_titles`
    repaints only the two border lines, not every line of the box. Textual's ``border_title``
    setter refreshes the whole widget, so that refresh is held back while the titles are set."""

    _titles: tuple[str | None, str | None] | None = None
    _border_only = False

    def set_titles(self, title: str | None, subtitle: str | None) -> None:
        """Set the border title and subtitle (markup); None leaves that one as it is."""
        assert isinstance(self, Widget)
        old_title, old_sub = self._titles or (None, None)
        new = (old_title if title is None else title, old_sub if subtitle is None else subtitle)
        if new == self._titles:
            return
        self._titles = new
        self._border_only = True
        try:
            if new[0] is not None:
                self.border_title = new[0]
            if new[1] is not None:
                self.border_subtitle = new[1]
        finally:
            self._border_only = False
        w, h = self.outer_size
        if not (w and h):  # not laid out yet: the first layout paints everything
            self.refresh()
            return
        top, left = self.styles.gutter.top, self.styles.gutter.left  # regions are content-relative
        self.refresh(Region(-left, -top, w, 1), Region(-left, h - 1 - top, w, 1))

    def refresh(self, *regions: Region, repaint: bool = True, layout: bool = False, recompose: bool = False) -> Self:
        if self._border_only:
            return self
        return super().refresh(*regions, repaint=repaint, layout=layout, recompose=recompose)  # type: ignore[misc]


class LineWidget(Widget):
    """A widget drawn from :data:`Rows` recomputed when its size or data changes."""

    DEFAULT_CSS = "LineWidget { height: 1fr; }"

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._rows: Rows = []
        self._rows_key: tuple[int, int, int] | None = None
        self._strips: list[Strip] = []
        self._blank = Strip.blank(0)
        self._styles: list[Style] = palette_styles()
        self.version = 0
        """Bumped on every data change; :attr:`painted_version` follows once drawn."""
        self.painted_version = -1

    def draw(self, width: int, height: int) -> Rows:  # pragma: no cover - abstract
        raise NotImplementedError

    def changed(self, key: object = None) -> None:
        """New data: repaint (skipped when ``key`` equals the previous data's key)."""
        if key is not None and key == getattr(self, "_data_key", None):
            return
        self._data_key = key
        self.version += 1
        self.refresh()

    def style_of(self, color: int | None) -> Style | None:
        if color is None:
            return None
        if color < 0:
            return DIM
        return self._styles[color % len(self._styles)]

    def render_lines(self, crop: Region) -> list[Strip]:
        """Textual's entry point for a repaint: look the size up once (it walks the DOM), draw
        if the data or the size changed, then let Textual compose the lines."""
        self._prepare(self.size)
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        if self._rows_key is None or self._rows_key[2] != self.version:
            self._prepare(self.size)
        return self._strips[y] if y < len(self._strips) else self._blank

    def _prepare(self, size: Size) -> None:
        """Draw once per data/size change and keep the strips (one per row)."""
        w, h = size.width, size.height
        key = (w, h, self.version)
        if key == self._rows_key:
            return
        self._rows = self.draw(w, h)
        self._rows_key = key
        base = self.rich_style
        combined: dict[int | None, Style] = {}

        def style(c: int | None) -> Style:
            if c not in combined:
                st = self.style_of(c)
                combined[c] = base + st if st is not None else base
            return combined[c]

        # a row's cell length from its text in one call (Strip would measure each segment)
        self._strips = [Strip([Segment(t, style(c)) for t, c in row], cell_len("".join(t for t, _ in row))).adjust_cell_length(w, base)
                        for row in self._rows]
        self._blank = Strip.blank(w, base)
        self.painted_version = self.version


def _hatch(width: int, height: int, message: str) -> Rows:
    """A hatched area with a centred message: how missing data looks (never as zeros)."""
    rows: Rows = []
    for r in range(height):
        line = canvas.HATCH * width
        if r == height // 2 and message:
            msg = f" {message} "[:width]
            start = max(0, (width - len(msg)) // 2)
            rows.append([(line[:start], -1), (msg, None), (line[start + len(msg) :], -1)])
        else:
            rows.append([(line, -1)])
    return rows


class Timeline(LineWidget):
    """Checkpoint timeline of one series: base → phase 1 → phase 2, phase boundaries marked ``┃``,
    the selected checkpoint highlighted. Click a checkpoint to select it."""

    DEFAULT_CSS = "Timeline { height: 3; }"

    class Selected(Message):
        def __init__(self, index: int) -> None:
            self.index = index
            super().__init__()

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.points: list[Point] = []
        self.selected = 0
        self.available: list[bool] = []
        self._cells: list[tuple[int, int]] = []  # (start col, index)
        self._styles = [Style(color=PHASE_COLORS["base"]), Style(color=PHASE_COLORS["phase1"]),
                        Style(color=PHASE_COLORS["phase2"]), Style(color="#59a14f"), Style(bold=True, reverse=True)]

    def show(self, view: TimelineView) -> None:
        """Paint the timeline view (a panel of the main screen)."""
        self.set_points(view.points, view.selected, view.available)

    def set_points(self, points: list[Point], selected: int, available: list[bool]) -> None:
        self.points, self.selected, self.available = points, selected, available
        self.changed((tuple(p.id for p in points), selected, tuple(available)))

    def _color(self, p: Point) -> int:
        return {"base": 0, "phase1": 1, "phase2": 2}.get(p.phase, 3)

    def draw(self, width: int, height: int) -> Rows:
        n = len(self.points)
        if n == 0:
            return [[("no checkpoints yet", -1)]]
        cell = max(1, min(4, (width - 2) // max(1, n) - 0))
        # window around the selection if the series does not fit
        fit = max(1, (width - 2) // cell)
        start = 0 if n <= fit else min(max(0, self.selected - fit // 2), n - fit)
        labels: list[Run] = []
        ticks: list[Run] = []
        self._cells = []
        col = 0
        prev_phase = None
        for i in range(start, min(n, start + fit)):
            p = self.points[i]
            if prev_phase is not None and p.phase != prev_phase:
                ticks.append(("┃", -1))
                labels.append((" ", None))
                col += 1
            if p.phase != prev_phase:
                name = {"base": "base", "phase1": "phase 1", "phase2": "phase 2"}.get(p.phase, p.phase)
                span = sum(1 for q in self.points[i : start + fit] if q.phase == p.phase) * cell
                labels.append((name[: max(1, span)].ljust(span), self._color(p)))
            else:
                pass
            prev_phase = p.phase
            ch = "●" if self.available[i] else "○"
            text = (ch + "─" * (cell - 1)) if cell > 1 else ch
            ticks.append((text, 4 if i == self.selected else self._color(p)))
            self._cells.append((col, i))
            col += cell
        sel = self.points[self.selected]
        info = f"◀ {sel.id} · {sel.label}" + (f" · loss {sel.loss:.3f}" if sel.loss is not None else "") + f" · {self.selected + 1}/{n} ▶"
        return [labels, ticks, [(info, None)]]

    def index_at(self, x: int) -> int | None:
        best = None
        for col, i in self._cells:
            if col <= x:
                best = i
        return best

    def on_click(self, event: events.Click) -> None:
        i = self.index_at(event.x)
        if i is not None:
            self.post_message(self.Selected(i))


class LayerBar(LineWidget):
    """Layer selector: one cell per layer (height of ΔCosSim as a sparkline when known), the
    selected layer highlighted. Click a layer to select it."""

    DEFAULT_CSS = "LayerBar { height: 2; }"

    class Selected(Message):
        def __init__(self, index: int) -> None:
            self.index = index
            super().__init__()

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.layer_values: list[int] = []
        self.selected = 0
        self.values: np.ndarray = np.zeros(0)
        self._cell = 1
        self._styles = [Style(color="#76b7b2"), Style(bold=True, reverse=True, color="#edc948")]

    def show(self, view: LayerView) -> None:
        """Paint the layer view (a panel of the main screen)."""
        self.set_layers(view.layers, view.selected, view.values)

    def set_layers(self, layers: list[int], selected: int, values: np.ndarray) -> None:
        self.layer_values, self.selected, self.values = layers, selected, values
        self.changed((tuple(layers), selected, np.asarray(values, dtype=np.float64).tobytes()))

    def draw(self, width: int, height: int) -> Rows:
        n = len(self.layer_values)
        if n == 0:
            return [[("no layers captured yet", -1)]]
        prefix = "layer "
        self._cell = cell = max(1, min(3, (width - len(prefix) - 1) // n))
        spark = canvas.sparkline(self.values) if len(self.values) == n else "·" * n
        row: list[Run] = [(prefix, -1)]
        for i, ch in enumerate(spark):
            row.append((ch * cell, 1 if i == self.selected else 0))
        v = self.values[self.selected] if len(self.values) == n else float("nan")
        info = f"layer {self.layer_values[self.selected]} of {self.layer_values[0]}–{self.layer_values[-1]} · ΔCosSim {fmt(v)} (bars: ΔCosSim by layer)"
        return [row, [(info, None)]]

    def on_click(self, event: events.Click) -> None:
        if event.y == 0 and event.x >= 6 and self.layer_values:
            i = (event.x - 6) // self._cell
            if 0 <= i < len(self.layer_values):
                self.post_message(self.Selected(int(i)))


class ScatterPlot(LineWidget):
    """The 2-D projection of one slab: points colored by a category (relation or kind); missing
    slabs are hatched with the reason. Click near a point to drill into its fact."""

    class PointClicked(Message):
        def __init__(self, index: int) -> None:
            self.index = index
            super().__init__()

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.xy: np.ndarray | None = None
        self.color_idx: np.ndarray = np.zeros(0, dtype=np.int64)
        self.message = "loading…"
        self.drawn = 0
        self.view_key: tuple | None = None
        """What the drawn data is (set with the data); tests and the benchmark read it."""

    def set_data(self, xy: np.ndarray | None, colors: np.ndarray, message: str, view_key: tuple | None = None) -> None:
        self.xy, self.color_idx, self.message, self.view_key = xy, colors, message, view_key
        self.changed()

    def draw(self, width: int, height: int) -> Rows:
        if self.xy is None or not np.isfinite(self.xy).all(axis=1).any():
            self.drawn = 0
            return _hatch(width, height, self.message)
        rows, self.drawn = canvas.scatter(self.xy, self.color_idx, width, height)
        return rows

    def on_click(self, event: events.Click) -> None:
        if self.xy is None:
            return
        i = canvas.nearest_point(self.xy, self.size.width, self.size.height, event.x, event.y)
        if i is not None:
            self.post_message(self.PointClicked(i))


class LinePlot(BorderTitles, LineWidget):
    """Curves over an index axis with a y-axis label column, NaN gaps, a marker and boundaries."""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.series: list[np.ndarray] = []
        self.color_idx: list[int] = []
        self.marker: int | None = None
        self.boundaries: list[float] = []
        self.empty_message = "no data"

    def set_series(self, series: list[np.ndarray], colors: list[int], marker: int | None = None,
                   boundaries: Sequence[float] = (), empty_message: str = "no data") -> None:
        self.series, self.color_idx, self.marker = series, colors, marker
        self.boundaries, self.empty_message = list(boundaries), empty_message
        self.changed((tuple(np.asarray(v, dtype=np.float64).tobytes() for v in series), tuple(colors), marker,
                      tuple(boundaries), empty_message))

    def draw(self, width: int, height: int) -> Rows:
        label_w = 7
        if not self.series or not any(np.isfinite(s).any() for s in self.series):
            return _hatch(width, height, self.empty_message)
        rows, yr = canvas.line_plot(self.series, self.color_idx, max(1, width - label_w), height,
                                    marker=self.marker, marker_color=-1, boundaries=self.boundaries, boundary_color=-1)
        assert yr is not None
        out: Rows = []
        for r, row in enumerate(rows):
            if r == 0:
                lab = f"{yr[1]:>6.3f} "
            elif r == height - 1:
                lab = f"{yr[0]:>6.3f} "
            else:
                lab = " " * label_w
            out.append([(lab[:label_w], -1), *row])
        return out


class Heatmap(LineWidget):
    """Values float [rows, cols] as colored blocks (two characters per cell), NaN as ``╳``,
    with row labels on the left and a color scale."""

    def __init__(self, *, id: str | None = None, empty_message: str = "no patching results in this run") -> None:
        super().__init__(id=id)
        self.values = np.zeros((0, 0))
        self.row_labels: list[str] = []
        self.col_labels: list[str] = []
        self.mark: tuple[int, int] | None = None
        self.empty_message = empty_message
        self._styles = [Style(color=c) for c in HEAT]

    def set_values(self, values: np.ndarray, row_labels: list[str], col_labels: list[str],
                   mark: tuple[int, int] | None = None) -> None:
        """``values`` float [row, col]; ``mark`` (row, col) is drawn as ``◆`` (the cursor)."""
        self.values, self.row_labels, self.col_labels, self.mark = values, row_labels, col_labels, mark
        self.changed()

    def draw(self, width: int, height: int) -> Rows:
        if self.values.size == 0:
            return _hatch(width, height, self.empty_message)
        lev, lo, hi = canvas.heatmap_cells(self.values)
        lab_w = max(len(s) for s in self.row_labels) + 1 if self.row_labels else 0
        ncol = max(1, lev.shape[1])
        cw = max(2, min(8, (width - lab_w) // ncol))  # cell width: fill the panel
        rows: Rows = []
        for r in range(lev.shape[0] - 1, -1, -1):  # highest layer on top
            row: list[Run] = [(self.row_labels[r].rjust(lab_w - 1) + " ", -1)]
            for c in range(lev.shape[1]):
                lv = int(lev[r, c])
                if self.mark == (r, c):
                    row.append(("◆" * (cw - 1) + " ", lv if lv >= 0 else -1))
                else:
                    row.append(("╳" * cw, -1) if lv < 0 else ("█" * (cw - 1) + " ", lv))
            rows.append(row)
        rows.append([(" " * lab_w, None), ("".join(f"{c:<{cw}d}" for c in range(lev.shape[1])), -1)])
        scale: list[Run] = [(f"{' ' * lab_w}{lo:.3f} ", -1)]
        scale += [("██", i) for i in range(len(HEAT))]
        marked = " · ◆ = cursor" if self.mark is not None else ""
        scale.append((f" {hi:.3f}   ╳ = missing{marked} · rows: layers (top = last) · columns: see below", -1))
        rows.append(scale)
        return rows


def legend(names: Sequence[str], colors: Callable[[int], str] = lambda i: PALETTE[i % len(PALETTE)]) -> str:
    """Textual markup of a color legend."""
    return "  ".join(f"[{colors(i)}]●[/] {n}" for i, n in enumerate(names))
