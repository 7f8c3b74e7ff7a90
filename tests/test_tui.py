"""The Textual browser driven with Pilot (navigate, filter, drill down, export, refresh after new
commits) and snapshot tests of its main screens, on a synthetic run written with the Store API."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from textual.widgets import DataTable

from rotelab.store import Store
from rotelab.tui import RotelabApp
from rotelab.tui.canvas import HATCH
from rotelab.tui.data import projection_name
from rotelab.tui.demo import DemoSpec, make_demo_run
from rotelab.tui.main_screen import ALL, MainScreen
from rotelab.tui.screens import FactScreen, HelpScreen, PatchingScreen, RunPicker
from rotelab.tui.widgets import LinePlot, ScatterPlot, Timeline

SIZE = (150, 48)
SPEC = DemoSpec(missing_slabs=[("p2-e02", 1)], missing_metrics=["p2-e02"])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tui") / "demo"
    make_demo_run(root, SPEC)
    return root


@pytest.fixture
def fresh_dir(demo_dir: Path, tmp_path: Path) -> Path:
    """A private copy for tests that write into the store."""
    dst = tmp_path / "demo"
    shutil.copytree(demo_dir, dst)
    return dst


async def settle(pilot) -> None:
    """Let thread workers finish and their results be applied and painted."""
    for _ in range(3):
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()


def store_slab(root: Path, kind: str, name: str, ckpt: str, layer: int) -> np.ndarray:
    g = Store.open(root / "store.zarr", mode="r").kind(kind)
    return g.read_derived(name, checkpoints=[ckpt], layers=[layer])[0, 0]


def scatter(app) -> ScatterPlot:
    return app.screen.query_one(ScatterPlot)


def cell_text(table: DataTable, row: str, col: str) -> str:
    return str(table.get_cell(row, col))


@pytest.mark.anyio
async def test_navigation_reads_the_selected_slab(demo_dir: Path, tmp_path: Path) -> None:
    app = RotelabApp(demo_dir, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        s = app.screen
        assert isinstance(s, MainScreen)
        ids = [p.id for p in s.snap.points]
        assert s._point().id == ids[-1] and s.kind == "key" and s.snap.layers[s.layer_index] == 2
        await pilot.press("left", "left", "up")
        await settle(pilot)
        assert s._point().id == ids[-3] and s.snap.layers[s.layer_index] == 3
        assert scatter(app).view_key[:2] == (ids[-3], 3)
        np.testing.assert_array_equal(scatter(app).xy, store_slab(demo_dir, "key", "proj_pca", ids[-3], 3))
        await pilot.press("h", "j", "j", "home", "G")
        await settle(pilot)
        assert s._point().id == "base" and s.snap.layers[s.layer_index] == 3
        await pilot.press("g", "end", "k")
        await settle(pilot)
        assert s._point().id == ids[-1] and s.snap.layers[s.layer_index] == 1
        # the position bar says where we are
        assert "p2-e02" in str(s.query_one("#position").render()) or s._point().id == "p2-e02"
        # clicking the timeline selects a checkpoint
        tl = s.query_one(Timeline)
        col = next(c for c, i in tl._cells if i == 2)
        await pilot.click(Timeline, offset=(col + 1, 1))  # +1: the widget's left padding
        await settle(pilot)
        assert s._point().id == ids[2]


@pytest.mark.anyio
async def test_missing_data_shows_as_missing(demo_dir: Path, tmp_path: Path) -> None:
    app = RotelabApp(demo_dir, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        s = app.screen
        await pilot.press("j")  # p2-e02 × layer 1 was left uncommitted
        await settle(pilot)
        sc = scatter(app)
        assert sc.view_key[:2] == ("p2-e02", 1)
        assert np.isnan(sc.xy).all() and sc.drawn == 0
        assert all(HATCH in "".join(t for t, _ in row) for row in sc._rows)
        assert "not committed" in sc.message
        table = s.query_one("#accuracy", DataTable)
        # metrics of p2-e02 not written: em dash, never 0
        assert cell_text(table, "key", "object_prob:heldout") == "—"
        await pilot.press("left")
        await settle(pilot)
        assert cell_text(table, "key", "object_prob:heldout") != "—"


@pytest.mark.anyio
async def test_kind_filter_method_and_joint(demo_dir: Path, tmp_path: Path) -> None:
    app = RotelabApp(demo_dir, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        s = app.screen
        assert s.kind_choices()[-1] == ALL
        await pilot.press("t")
        await settle(pilot)
        assert s.kind == "train"
        np.testing.assert_array_equal(scatter(app).xy, store_slab(demo_dir, "train", "proj_pca", "p2-e02", 2))
        await pilot.press("m")
        await settle(pilot)
        assert scatter(app).view_key[3] == "proj_umap"
        np.testing.assert_array_equal(scatter(app).xy, store_slab(demo_dir, "train", "proj_umap", "p2-e02", 2))
        await pilot.press("J")
        await settle(pilot)
        assert scatter(app).view_key[3] == "proj_umap_joint"
        while s.kind != ALL:
            await pilot.press("t")
        await pilot.press("m", "c")
        await settle(pilot)
        kinds = s.snap.projection_kinds(projection_name("pca", True))
        assert scatter(app).view_key[2] == tuple(kinds) and len(kinds) == 6
        expected = np.vstack([store_slab(demo_dir, k, "proj_pca_joint", "p2-e02", 2) for k in kinds])
        np.testing.assert_array_equal(scatter(app).xy, expected)
        assert set(scatter(app).color_idx.tolist()) == set(range(len(kinds)))  # colored by kind
        assert "colored by kind" in str(s.query_one("#legend").render())


@pytest.mark.anyio
async def test_drill_down_into_a_fact(demo_dir: Path, tmp_path: Path) -> None:
    app = RotelabApp(demo_dir, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        run = app.screen.data.run
        fid = "author-0002"
        await pilot.press("f")
        await pilot.pause()
        await pilot.press(*fid)
        await pilot.press("enter")
        await settle(pilot)
        fs = app.screen
        assert isinstance(fs, FactScreen) and fs.fact_id == fid
        table = fs.query_one("#prompts", DataTable)
        kinds = [k for k in run.kinds() if k in SPEC.kinds]
        assert table.row_count == sum(int((run.items(k)["fact_id"] == fid).sum()) for k in kinds)
        # P(obj) of the train prompt at the selected checkpoint (p2-e02: not evaluated -> —)
        first = table.get_row_at(2)
        assert first[0] == "train" and first[3] == "—"
        await pilot.press("left")
        await settle(pilot)
        items = run.items("train")
        item = int(items[items["fact_id"] == fid]["item"].iloc[0])
        g = Store.open(demo_dir / "store.zarr", mode="r").kind("train")
        p = g.read_item_array("object_prob", checkpoints=["p2-e01"], items=[item])[0, 0]
        assert table.get_row_at(2)[3] == f"{p:.3f}"
        assert fs.query_one(LinePlot).series  # curves per kind
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


@pytest.mark.anyio
async def test_clicking_a_point_opens_its_fact(demo_dir: Path, tmp_path: Path) -> None:
    app = RotelabApp(demo_dir, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        sc = scatter(app)
        w, h = sc.size.width, sc.size.height
        # the cell where point 7 is drawn: same mapping as the plot (5% padding on each side)
        xy = sc.xy
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        span = hi - lo
        lo, hi = lo - 0.05 * span, hi + 0.05 * span
        px = round((xy[7, 0] - lo[0]) / (hi[0] - lo[0]) * (2 * w - 1))
        py = round((hi[1] - xy[7, 1]) / (hi[1] - lo[1]) * (4 * h - 1))
        await pilot.click(ScatterPlot, offset=(px // 2, py // 4))
        await settle(pilot)
        fs = app.screen
        assert isinstance(fs, FactScreen)
        items = app.screen.data.run.items("key")
        # the nearest point under the click belongs to that fact (point 7 unless another shares the cell)
        near = [int(i) for i in range(len(xy))
                if round((xy[i, 0] - lo[0]) / (hi[0] - lo[0]) * (2 * w - 1)) // 2 == px // 2
                and round((hi[1] - xy[i, 1]) / (hi[1] - lo[1]) * (4 * h - 1)) // 4 == py // 4]
        assert fs.fact_id in {items["fact_id"][i] for i in near}


@pytest.mark.anyio
async def test_export_writes_figure_files(demo_dir: Path, tmp_path: Path) -> None:
    app = RotelabApp(demo_dir, export_dir=tmp_path / "figs")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("left", "e")
        await settle(pilot)
        paths = app.screen.last_export
        assert paths, [n.message for n in app._notifications]
        assert {p.suffix for p in paths} == {".png", ".pdf", ".svg", ".csv"}
        assert all(p.is_file() and p.parent == tmp_path / "figs" for p in paths)
        png = paths[0]
        assert png.suffix == ".png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "p2-e01" in png.name and "layer2" in png.name and "key" in png.name
        csv = png.with_suffix(".csv")
        data = pd.read_csv(csv)  # the data behind the figure is the slab on screen
        np.testing.assert_allclose(data[["x", "y"]].to_numpy(), store_slab(demo_dir, "key", "proj_pca", "p2-e01", 2), rtol=1e-6)
        assert any(str(png) in n.message for n in app._notifications)
        await pilot.press("p", "e")
        await settle(pilot)
        heat = app.screen.last_export
        assert heat and heat[0].is_file() and "patching" in heat[0].name


@pytest.mark.anyio
async def test_refresh_shows_newly_committed_data(fresh_dir: Path, tmp_path: Path) -> None:
    app = RotelabApp(fresh_dir, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("j")
        await settle(pilot)
        assert np.isnan(scatter(app).xy).all()
        # a capture/analysis process commits the slab and the metrics meanwhile
        st = Store.open(fresh_dir / "store.zarr")
        g = st.kind("key")
        new = np.random.default_rng(5).standard_normal((g.n_items, 2)).astype(np.float32)
        g.write_derived("proj_pca", ("checkpoint", "layer", "item", "component"), new, index={"checkpoint": "p2-e02", "layer": 1})
        g.write_item_arrays("p2-e02", {"object_prob": np.full(g.n_items, 0.25, dtype=np.float32)})
        await pilot.press("r")
        await settle(pilot)
        np.testing.assert_array_equal(scatter(app).xy, new)
        table = app.screen.query_one("#accuracy", DataTable)
        assert cell_text(table, "key", "object_prob:heldout").startswith("0.250")
        assert cell_text(table, "key", "mc_correct:heldout") == "—"  # still not written
        assert any("refreshed" in n.message for n in app._notifications)


@pytest.mark.anyio
async def test_stale_slab_results_are_dropped(demo_dir: Path, tmp_path: Path) -> None:
    app = RotelabApp(demo_dir, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        s = app.screen
        old_req = s.slab_request()
        old_id = s._request
        await pilot.press("left", "left", "up", "right", "down", "left")
        await settle(pilot)
        want = s.slab_request()
        assert scatter(app).view_key[:2] == (want.checkpoint, want.layer)
        before = scatter(app).xy.copy()
        s._apply_slabs(old_id, old_req, [np.zeros((len(before), 2), dtype=np.float32)])  # a late, outdated result
        np.testing.assert_array_equal(scatter(app).xy, before)


@pytest.mark.anyio
async def test_help_palette_and_patching(demo_dir: Path, tmp_path: Path) -> None:
    app = RotelabApp(demo_dir, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = str(app.screen.query_one("#help Static").render())
        for b in MainScreen.BINDINGS:
            assert b.description in text
        await pilot.press("escape")
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Toggle PCA")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, MainScreen) and app.screen.method == "umap"
        await pilot.press("p")
        await pilot.pause()
        ps = app.screen
        assert isinstance(ps, PatchingScreen)
        panel = ps.panels[0]
        assert panel.values.shape == (4, 6) and np.isfinite(panel.values).all()
        assert panel.keys == {"source_kind": "key", "target_kind": "test", "metric": "object_logprob", "position": "last"}


@pytest.mark.anyio
async def test_run_picker(demo_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(demo_dir, runs / "a-run")
    (runs / "not-a-run").mkdir()
    app = RotelabApp(runs, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, RunPicker)
        assert app.screen.query_one(DataTable).row_count == 1
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, MainScreen) and app.screen.snap.name == "a-run"
        await pilot.press("escape")
        assert isinstance(app.screen, RunPicker)


def test_cli_rejects_a_folder_without_runs(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "rotelab.cli", "tui", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("rotelab: error:") and "folder containing runs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- snapshots


def _snap(demo_dir: Path, tmp_path: Path, *keys: str):
    async def before(pilot) -> None:
        await settle(pilot)
        for k in keys:
            await pilot.press(k)
            await settle(pilot)

    return RotelabApp(demo_dir, export_dir=tmp_path), before


def test_snapshot_main(demo_dir: Path, tmp_path: Path, snap_compare) -> None:
    app, before = _snap(demo_dir, tmp_path, "left")
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_missing_slab(demo_dir: Path, tmp_path: Path, snap_compare) -> None:
    app, before = _snap(demo_dir, tmp_path, "j")
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_joint_colored_by_kind(demo_dir: Path, tmp_path: Path, snap_compare) -> None:
    app, before = _snap(demo_dir, tmp_path, "left", "T", "T", "c")
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_fact(demo_dir: Path, tmp_path: Path, snap_compare) -> None:
    app, before = _snap(demo_dir, tmp_path, "left", "f", "c", "a", "p", "i", "t", "a", "l", "-", "0", "0", "0", "1", "enter")
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_patching(demo_dir: Path, tmp_path: Path, snap_compare) -> None:
    app, before = _snap(demo_dir, tmp_path, "p")
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_snapshot_help(demo_dir: Path, tmp_path: Path, snap_compare) -> None:
    app, before = _snap(demo_dir, tmp_path, "question_mark")
    assert snap_compare(app, terminal_size=SIZE, run_before=before)


@pytest.mark.anyio
async def test_every_action_has_a_binding_a_help_line_and_a_palette_entry(demo_dir: Path, tmp_path: Path) -> None:
    """One action table feeds the keys, the help screen and the command palette: check all three
    from what the running app exposes (its screens' bindings, the help text, the palette hits)."""
    from textual.command import DiscoveryHit

    from rotelab.tui.actions import (
        APP_ACTIONS,
        FACT_ACTIONS,
        HELP_SECTIONS,
        MAIN_ACTIONS,
        PATCHING_ACTIONS,
        PICKER_ACTIONS,
        WHERE_ACTIONS,
    )
    from rotelab.tui.screens import WhereScreen
    from rotelab.tui.app import BrowserCommands

    def keys_of(bindings) -> dict[str, str]:
        return {k: b.action for b in bindings for k in b.key.split(",")}

    for screen, actions in ((MainScreen, MAIN_ACTIONS), (FactScreen, FACT_ACTIONS), (PatchingScreen, PATCHING_ACTIONS),
                            (WhereScreen, WHERE_ACTIONS), (RunPicker, PICKER_ACTIONS)):
        bound = keys_of(screen.BINDINGS)
        for a in actions:
            assert all(bound.get(k) == a.action for k in a.keys.split(",")), (screen.__name__, a)
            assert hasattr(screen, f"action_{a.action.split('(')[0]}") or a.action.startswith("app."), a
    app_bound = keys_of(RotelabApp.BINDINGS) | {RotelabApp.COMMAND_PALETTE_BINDING: "command_palette"}
    assert all(app_bound.get(a.keys) == a.action for a in APP_ACTIONS)
    assert [t for t, _ in HELP_SECTIONS] == ["main screen", "fact drill-down", "patching", "where the fact lives", "run picker",
                                             "everywhere"]

    app = RotelabApp(demo_dir, export_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        lines = str(app.screen.query_one("#help Static").render()).splitlines()
        names = {"question_mark": "?", "escape": "esc"}
        for _, actions in HELP_SECTIONS:
            for a in actions:
                keys = [names.get(k, k) for k in a.keys.split(",")]
                assert any(line.split()[: len(keys)] == [k + "," for k in keys[:-1]] + keys[-1:]
                           and line.rstrip().endswith(a.help_label or a.label) for line in lines), a
        await pilot.press("escape")
        await pilot.pause()
        provider = BrowserCommands(app.screen, None)
        hits = [h async for h in provider.discover()]
        assert all(isinstance(h, DiscoveryHit) for h in hits)
        assert [h.display for h in hits] == [a.title for a in MAIN_ACTIONS]
        assert [h.help for h in hits] == [a.help for a in MAIN_ACTIONS]
