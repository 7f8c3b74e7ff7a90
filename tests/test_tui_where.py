"""The browser's where-the-fact-lives views (issue 16 item 6) on a real tiny run with a captured
store and its analyses: the layer × checkpoint heatmaps equal the stored arrays (the logit lens as
the mean P over held-out items, computed here from the raw store array), the cursor is marked, and
the fact drill-down shows the fact's causal trace (mean effect per layer × column, from the
table by hand); the screens open from their keys in a running app."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixtures_runs import make_tiny_run
from rotelab.facts import split_mask
from rotelab.store import Store
from rotelab.tui import RotelabApp
from rotelab.tui.data import RunData
from rotelab.tui.main_screen import MainScreen
from rotelab.tui.screens import FactScreen, WhereScreen
from rotelab.tui.views import Selection, causal_trace_panel, where_panels
from rotelab.tui.widgets import Heatmap

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (150, 60)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def where_run(tmp_path_factory):
    from rotelab.analyses.where import where_run as run_where
    from rotelab.probe import capture_run

    cfg = {"analyses": {"causal_trace": {"facts_per_relation": 1, "layers": [0, 1, 2]}, "probe_folds": 2}}
    run = make_tiny_run(tmp_path_factory.mktemp("tui-where"), n_checkpoints=3, model="tiny-llama", config=cfg)
    capture_run(run, kinds=["key", "test"], progress=False)
    st = Store.open(run.store_path, fingerprint=run.fingerprint())
    run_where(run, st, ["key", "test"], progress=False, note=lambda m: None)
    return run


def test_where_heatmaps_equal_the_store(where_run):
    run = where_run
    data = RunData(run)
    snap = data.load()
    g = Store.open(run.store_path, mode="r").kind("test")
    lp = g.read_derived("logit_lens_logprob")  # [checkpoint, layer, item]
    held = split_mask(g.items["split"].astype(str).to_numpy(), "heldout")
    ref = np.exp(lp[:, :, held].astype(np.float64)).mean(axis=-1)  # [checkpoint, layer]
    sel = Selection(ckpt=1, layer_index=2, kind="test")
    panels = {p.keys["array"]: p for p in where_panels(snap, sel)}
    assert {"logit_lens_prob", "cka_base", "cka_prev"} <= set(panels)
    lens = panels["logit_lens_prob"]
    assert lens.columns == list(g.checkpoints) and lens.layers == list(g.layers)
    np.testing.assert_allclose(lens.values, ref.T, rtol=1e-5)
    np.testing.assert_array_equal(panels["cka_base"].values, g.read_derived("cka_base").T)
    assert lens.mark == (2, 1)  # (layer row, checkpoint column) of the cursor


def test_fact_causal_trace_panel_equals_the_table(where_run):
    snap = RunData(where_run).load()
    t = snap.causal_trace
    assert t is not None and len(t)
    fid = str(t["fact_id"].iloc[0])
    panel = causal_trace_panel(snap, fid)
    sub = t[t["fact_id"] == fid]
    assert panel is not None and panel.layers == sorted(set(sub["layer"]))
    for c, col in enumerate(panel.columns):
        ck, kind, pos = col.split("·")
        for r, layer in enumerate(panel.layers):
            cell = sub[(sub["checkpoint"] == ck) & (sub["kind"] == kind) & (sub["position"] == pos) & (sub["layer"] == layer)]
            assert panel.values[r, c] == pytest.approx(float(cell["effect"].mean()), nan_ok=True)
    assert causal_trace_panel(snap, "no-such-fact") is None


@pytest.mark.anyio
async def test_where_screen_and_fact_trace_in_the_app(where_run, tmp_path: Path) -> None:
    app = RotelabApp(where_run.root, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(3):
            await app.workers.wait_for_complete()
            await pilot.pause()
        assert isinstance(app.screen, MainScreen)
        await pilot.press("w")
        await pilot.pause()
        ws = app.screen
        assert isinstance(ws, WhereScreen) and len(ws.panels) >= 3
        heat = ws.query_one(Heatmap)
        first = heat.values.copy()
        assert heat.mark is not None and first.size
        await pilot.press("t")
        await pilot.pause()
        assert not np.array_equal(heat.values, first, equal_nan=True)  # the next panel is painted
        await pilot.press("e")
        for _ in range(3):
            await app.workers.wait_for_complete()
            await pilot.pause()
        assert ws.last_export and ws.last_export[0].is_file()
        await pilot.press("escape")
        await pilot.pause()
        fid = str(app.screen.data.snapshot.causal_trace["fact_id"].iloc[0])
        app.screen.open_fact(fid)
        for _ in range(3):
            await app.workers.wait_for_complete()
            await pilot.pause()
        fs = app.screen
        assert isinstance(fs, FactScreen)
        trace = fs.query_one("#fact-trace", Heatmap)
        assert trace.values.size and np.isfinite(trace.values).any()
