"""The browser's data layer and drawing (no Textual app): values against brute-force references
computed here from the store and from the formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from rotelab.store import Store
from rotelab.tui import canvas
from rotelab.tui.data import SPLITS, RunData, fmt
from rotelab.tui.demo import DemoSpec, make_demo_run
from rotelab.tui.views import patching_panels

SPEC = DemoSpec(
    kinds=("key", "train", "test"),
    methods=("pca",),
    joint=False,
    missing_slabs=[("p2-e02", 1)],
    missing_metrics=["p2-e02"],
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    return make_demo_run(tmp_path_factory.mktemp("tuidata") / "demo", SPEC)


def test_snapshot_aligns_series_layers_and_missing(run) -> None:
    snap = RunData(run).load()
    assert [p.id for p in snap.points] == [e.id for e in run.checkpoints()]
    assert snap.kinds == ["key", "train", "test"]  # display order, not alphabetical
    assert snap.layers == [0, 1, 2, 3]
    st = Store.open(run.store_path, mode="r")
    ref = st.kind("train").read_derived("delta_cossim")
    np.testing.assert_allclose(snap.delta_cossim["train"], ref)
    # metrics of p2-e02 were never written: NaN, never zero
    last = [p.id for p in snap.points].index("p2-e02")
    assert np.isnan(snap.accuracy["key"][last]).all()
    assert np.isfinite(snap.accuracy["key"][last - 1]).all()


def test_accuracy_is_the_split_mean_of_the_store_arrays(run) -> None:
    snap = RunData(run).load()
    items = run.items("test")
    g = Store.open(run.store_path, mode="r").kind("test")
    for m, name in enumerate(("object_prob", "mc_correct", "gen_correct")):
        vals = g.read_item_array(name)
        for ci in range(len(snap.points) - 1):
            for s, split in enumerate(SPLITS):
                members = ("validation", "test") if split == "heldout" else (split,)  # heldout = validation ∪ test
                rows = [i for i in range(len(items)) if items["split"][i] in members]
                assert rows
                expected = sum(float(vals[ci, i]) for i in rows) / len(rows)
                assert snap.accuracy["test"][ci, s, m] == pytest.approx(expected, rel=1e-6)


def test_projection_slab_and_uncommitted_slab(run) -> None:
    data = RunData(run)
    data.load()
    g = Store.open(run.store_path, mode="r").kind("key")
    got = data.projection("key", "proj_pca", "p1-e02", 2)
    raw = np.asarray(zarr.open_group(str(run.store_path), mode="r")["key"]["proj_pca"][2, 2])  # position of p1-e02 is 2
    np.testing.assert_array_equal(got, raw[:, :2])
    missing = data.projection("key", "proj_pca", "p2-e02", 1)
    assert missing is not None and np.isnan(missing).all()
    assert data.projection("key", "proj_umap", "p1-e02", 2) is None  # no such array
    assert data.cached("key", "proj_pca", "p1-e02", 2)


def test_view_models_of_the_main_panels(run) -> None:
    """Accuracy rows (value and change since the previous checkpoint of the series) and the
    scatter (points, colors, counts) against the store's arrays and item table, by hand."""
    from rotelab.tui.views import Selection, accuracy_view, scatter_view, slab_request, timeline_view

    data = RunData(run)
    snap = data.load()
    ids = [p.id for p in snap.points]
    sel = Selection(ckpt=ids.index("p1-e02"), layer_index=2, kind="test")
    items = run.items("test")
    g = Store.open(run.store_path, mode="r").kind("test")
    acc = accuracy_view(snap, sel)
    row = dict(acc.rows)["test"]
    for m, name in enumerate(("object_prob", "mc_correct", "gen_correct")):
        vals = g.read_item_array(name)
        for s, split in enumerate(SPLITS):
            members = {"heldout": ("validation", "test", "heldout")}.get(split, (split,))  # heldout = validation ∪ test
            cols = [i for i in range(len(items)) if items["split"][i] in members]
            now = sum(float(vals[g.checkpoints.index("p1-e02"), i]) for i in cols) / len(cols)
            before = sum(float(vals[g.checkpoints.index("p1-e01"), i]) for i in cols) / len(cols)
            value, delta = row[m * len(SPLITS) + s]
            assert value == pytest.approx(now, rel=1e-6) and delta == pytest.approx(now - before, rel=1e-5, abs=1e-9)
    assert acc.title.startswith("accuracy at p1-e02 (Δ vs p1-e01)")
    tl = timeline_view(snap, sel)
    assert [p.id for p in tl.points] == ids and tl.selected == ids.index("p1-e02")
    req = slab_request(snap, sel)
    assert req is not None and (req.kinds, req.checkpoint, req.layer) == (("test",), "p1-e02", 2)
    part = data.projection("test", req.name, req.checkpoint, req.layer)
    view = scatter_view(snap, sel, req, [part])
    want = g.read_derived(req.name, checkpoints=["p1-e02"], layers=[2])[0, 0, :, :2]
    np.testing.assert_array_equal(view.xy, want)
    rels = sorted(set(items["relation"]))
    np.testing.assert_array_equal(view.colors, [rels.index(r) for r in items["relation"]])
    assert view.subtitle == f"{len(items)} of {len(items)} points" and view.spans == [("test", 0, len(items))]


def test_alignment_curves_match_pandas(run) -> None:
    snap = RunData(run).load()
    df = Store.open(run.store_path, mode="r").read_table("alignment")
    curves = snap.alignment_curves(2)
    sub = df[df["layer"] == 2]
    for kind in ("train", "test"):
        for ci, p in enumerate(snap.points):
            vals = sub[(sub["kind"] == kind) & (sub["checkpoint"] == p.id) & (sub["split"] == "all")]["cosine"]
            assert curves[kind][ci] == pytest.approx(vals.mean())
    assert list(curves)[:2] == ["train", "test"]


def test_patching_panels_match_pivot(run) -> None:
    snap = RunData(run).load()
    panels = patching_panels(snap.patching, snap.points)
    assert len(panels) == 1
    p = panels[0]
    df = snap.patching
    for li, layer in enumerate(p.layers):
        for ci, col in enumerate(p.columns):
            sel = df[(df["layer"] == layer) & (df["target_checkpoint"] == col)]
            assert p.values[li, ci] == pytest.approx(sel["effect"].mean())
    assert p.columns == [q.id for q in snap.points]  # series order
    # cross-checkpoint rows are labelled by the pair, panels split by kinds; a gap stays NaN
    cross = pd.DataFrame({
        "source_checkpoint": ["p2-e01", "p2-e01", "p2-e01"], "target_checkpoint": ["p1-e02", "p1-e01", "p1-e01"],
        "source_kind": ["key", "key", "train"], "target_kind": ["test"] * 3, "layer": [0, 1, 1], "effect": [1.0, 2.0, 4.0],
    })
    panels = patching_panels(cross, snap.points)
    assert [q.keys for q in panels] == [{"source_kind": "key", "target_kind": "test"}, {"source_kind": "train", "target_kind": "test"}]
    assert panels[0].columns == ["p2-e01→p1-e01", "p2-e01→p1-e02"]
    np.testing.assert_array_equal(panels[0].values, [[np.nan, 1.0], [2.0, np.nan]])
    assert patching_panels(pd.DataFrame({"x": [1]}), snap.points) == []
    assert patching_panels(None, snap.points) == []


def test_fact_detail(run) -> None:
    data = RunData(run)
    snap = data.load()
    fid = snap.fact_ids()[3]
    d = data.fact_detail(fid)
    n_prompts = sum(int((run.items(k)["fact_id"] == fid).sum()) for k in ("key", "train", "test"))
    assert len(d.prompts) == n_prompts
    g = Store.open(run.store_path, mode="r").kind("train")
    items = run.items("train")
    first = int(items[items["fact_id"] == fid]["item"].iloc[0])
    row = d.prompts.index[(d.prompts["kind"] == "train") & (d.prompts["item"] == first)][0]
    np.testing.assert_allclose(d.object_prob[row, :-1], g.read_item_array("object_prob")[:-1, first])
    assert np.isnan(d.object_prob[row, -1])
    assert d.gen_text[row][-1] is None  # not evaluated: missing, not ""


def test_no_store_yet(tmp_path: Path) -> None:
    run = make_demo_run(tmp_path / "r", DemoSpec(kinds=("key",), methods=(), metrics=False, tables=False))
    import shutil

    shutil.rmtree(run.store_path)
    snap = RunData(run).load()
    assert snap.kinds == [] and "no store" in snap.message
    assert [p.id for p in snap.points][0] == "base"


# ----------------------------------------------------------------------------- drawing


def _brute_braille(px: list[int], py: list[int], w: int, h: int) -> list[str]:
    """Independent braille rendering: dot (x, y) sets bit per the Unicode braille layout."""
    dots = {(0, 0): 0, (0, 1): 1, (0, 2): 2, (1, 0): 3, (1, 1): 4, (1, 2): 5, (0, 3): 6, (1, 3): 7}
    grid = [[0] * w for _ in range(h)]
    for x, y in zip(px, py):
        grid[y // 4][x // 2] |= 1 << dots[(x % 2, y % 4)]
    return ["".join(chr(0x2800 + b) if b else " " for b in row) for row in grid]


def test_braille_dots_match_unicode_layout() -> None:
    rng = np.random.default_rng(0)
    px, py = rng.integers(0, 20, 50), rng.integers(0, 16, 50)
    c = canvas.BrailleCanvas(10, 4)
    c.set_dots(px, py, 0)
    got = ["".join(t for t, _ in row) for row in c.rows()]
    assert got == _brute_braille(px.tolist(), py.tolist(), 10, 4)


def test_scatter_maps_extremes_to_corners_and_skips_nan() -> None:
    xy = np.array([[0.0, 0.0], [1.0, 1.0], [np.nan, 0.5]])
    rows, n = canvas.scatter(xy, np.array([0, 1, 2]), 10, 5)
    assert n == 2
    text = ["".join(t for t, _ in r) for r in rows]
    # (1, 1) is top-right, (0, 0) bottom-left; 5% padding keeps them one dot in
    assert text[0][-1] != " " and text[-1][0] != " "
    assert sum(ch != " " for line in text for ch in line) == 2
    colors = [c for r in rows for t, c in r if t.strip()]
    assert sorted(colors) == [0, 1]


def test_line_plot_gaps_and_sparkline() -> None:
    rows, yr = canvas.line_plot([np.array([0.0, np.nan, 1.0])], [0], 12, 4)
    assert yr is not None and yr[0] < 0 < 1 < yr[1]
    text = ["".join(t for t, _ in r) for r in rows]
    middle = [line[5:7] for line in text]  # no line is drawn through the NaN in the middle
    assert all(ch == " " for part in middle for ch in part)
    assert canvas.sparkline(np.array([0.0, np.nan, 1.0])) == "▁·█"
    lev, lo, hi = canvas.heatmap_cells(np.array([[0.0, np.nan], [1.0, 0.5]]))
    assert lev.tolist() == [[0, -1], [7, 4]] and (lo, hi) == (0.0, 1.0)


def test_fmt_missing_is_never_zero() -> None:
    assert fmt(float("nan")) == "—" and fmt(None) == "—" and fmt(np.float32("nan")) == "—"
    assert fmt(0.0) == "0.000"
