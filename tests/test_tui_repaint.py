"""What a key press repaints, read off the composed screen and checked against the store.

The browser repaints as little as it can (issue 14, TUI latency): strips are drawn once per data
change, the size is looked up once per repaint, the scatter box repaints only its border lines
when its title changes, the alignment curves of every layer are computed once. These tests make
sure that each step still shows the new slab's data: after every layer and checkpoint step the
screen's text (the compositor's render of every widget, through the same line caches a partial
update uses) must equal a brute-force braille plot of the slab read from the store, and the
titles, axis labels and layer bar must carry the store's ΔCosSim at the new cell.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rotelab.store import Store
from rotelab.tui import RotelabApp
from rotelab.tui.data import fmt
from rotelab.tui.demo import DemoSpec, make_demo_run
from rotelab.tui.main_screen import MainScreen
from rotelab.tui.widgets import LayerBar, LinePlot, ScatterPlot

SIZE = (150, 48)
BITS = {(0, 0): 0x01, (0, 1): 0x02, (0, 2): 0x04, (0, 3): 0x40, (1, 0): 0x08, (1, 1): 0x10, (1, 2): 0x20, (1, 3): 0x80}
"""Braille dot (column, row) in a cell -> bit of U+2800 (the Unicode braille layout)."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repaint") / "demo"
    make_demo_run(root, DemoSpec())
    return root


def padded_range(v: np.ndarray, pad: float) -> tuple[float, float]:
    lo, hi = float(np.min(v)), float(np.max(v))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def brute_scatter(xy: np.ndarray, width: int, height: int) -> list[str]:
    """The braille text of a scatter of ``xy`` float [n, 2] (NaN rows skipped) on ``width ×
    height`` cells, point by point: extremes 5 % inside the borders, y up, round half to even."""
    pts = [(float(x), float(y)) for x, y in np.asarray(xy, dtype=np.float64) if np.isfinite(x) and np.isfinite(y)]
    (x0, x1) = padded_range(np.array([p[0] for p in pts]), 0.05)
    (y0, y1) = padded_range(np.array([p[1] for p in pts]), 0.05)
    grid = [[0] * width for _ in range(height)]
    for x, y in pts:
        px = round((x - x0) / (x1 - x0) * (2 * width - 1))
        py = round((y1 - y) / (y1 - y0) * (4 * height - 1))
        grid[py // 4][px // 2] |= BITS[(px % 2, py % 4)]
    return ["".join(chr(0x2800 + b) if b else " " for b in row) for row in grid]


def screen_text(screen: MainScreen) -> list[str]:
    """The whole screen as text, composed from every widget's (cached) lines."""
    return [strip.text for strip in screen._compositor.render_strips()]


def cut(lines: list[str], region) -> list[str]:
    return [line[region.x : region.x + region.width] for line in lines[region.y : region.y + region.height]]


@pytest.mark.anyio
@pytest.mark.parametrize("inline_read", [MainScreen.INLINE_READ, -1.0], ids=["reads-inline", "reads-in-worker"])
async def test_every_step_paints_the_new_slab_and_its_delta_cossim(demo_dir: Path, tmp_path: Path, inline_read: float,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways a slab reaches the panels: read on the UI thread (fast reads) and in a worker
    (after a slow read; -1 s: always)."""
    monkeypatch.setattr(MainScreen, "INLINE_READ", inline_read)
    store = Store.open(demo_dir / "store.zarr", mode="r").kind("key")
    app = RotelabApp(demo_dir, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(3):
            await app.workers.wait_for_complete()
            await pilot.pause()
        s = app.screen
        assert isinstance(s, MainScreen) and s.kind == "key"
        ids = [p.id for p in s.snap.points]
        seen: set[tuple[str, int]] = set()
        for key in ["up", "left", "down", "down", "left", "up", "right"]:  # layer and checkpoint steps, some revisits
            await pilot.press(key)
            for _ in range(3):
                await app.workers.wait_for_complete()
                await pilot.pause()
            ck, layer = ids[s._point_index()], s.snap.layers[s.layer_index]
            seen.add((ck, layer))
            text = screen_text(s)
            xy = store.read_derived("proj_pca", checkpoints=[ck], layers=[layer])[0, 0]
            dcs = store.read_derived("delta_cossim", checkpoints=[ck], layers=[layer])[0, 0]
            column = store.read_derived("delta_cossim", checkpoints=ids, layers=[layer])[:, 0]

            plot = s.query_one(ScatterPlot).content_region
            assert cut(text, plot) == brute_scatter(xy, plot.width, plot.height), (key, ck, layer)
            box = s.query_one("#scatter-box").region
            assert f"{ck} · layer {layer} · ΔCosSim {fmt(dcs)}" in text[box.y]  # the box's top border
            assert f"{np.isfinite(xy).all(axis=1).sum()} of {len(xy)} points" in text[box.bottom - 1]

            curve = s.query_one("#dcs-ckpt", LinePlot)
            outer, inner = curve.region, curve.content_region
            assert f"ΔCosSim by checkpoint · layer {layer}" in text[outer.y]
            lo, hi = padded_range(column[np.isfinite(column)], 0.08)  # the y axis follows the new layer's values
            assert text[inner.y][inner.x : inner.x + 7] == f"{hi:>6.3f} "
            assert text[inner.bottom - 1][inner.x : inner.x + 7] == f"{lo:>6.3f} "

            bar = s.query_one(LayerBar).content_region
            assert f"layer {layer} of " in text[bar.y + 1] and f"ΔCosSim {fmt(dcs)}" in text[bar.y + 1]
            assert f"checkpoint {ck} " in text[0] and f"layer {layer} " in text[0]
        assert len(seen) >= 5
