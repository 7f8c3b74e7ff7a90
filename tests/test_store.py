"""Tests of rotelab.store (zarr v3 store, commit markers, concurrency, kill -9 resume)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

from rotelab.errors import RotelabError
from rotelab.store import KindGroup, MissingDataError, Store, StoreError, StoreMismatchError

N_ITEMS, HIDDEN = 12, 8
CKPTS = ["base", "p1-ep1", "p1-ep2", "p2-step10"]
LAYERS = list(range(4))


def make_items(n: int = N_ITEMS) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item": np.arange(100, 100 + n),
            "fact_id": [f"f{i // 2}" for i in range(n)],
            "relation": ["capital" if i % 3 else "language" for i in range(n)],
            "template_id": [i % 2 for i in range(n)],
            "text": [f"The capital of S{i} is" for i in range(n)],
            "object": [f"Obj{i}" for i in range(n)],
            "split": ["train" if i % 4 else "heldout" for i in range(n)],
        }
    )


def slab(ci: int, li: int, n: int = N_ITEMS, h: int = HIDDEN) -> np.ndarray:
    """Deterministic slab content for (checkpoint position, layer position)."""
    rng = np.random.default_rng(1000 * ci + li)
    return rng.standard_normal((n, h)).astype(np.float16).astype(np.float32)


def make_store(tmp_path: Path, **kw) -> tuple[Store, KindGroup]:
    st = Store.open(tmp_path / "store.zarr", fingerprint={"model": "m1", "tokenizer": "t1", "dataset": "d1"})
    kg = st.ensure_kind("key", checkpoints=kw.get("checkpoints", CKPTS), layers=LAYERS, items=make_items(), hidden=HIDDEN)
    return st, kg


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


# --------------------------------------------------------------------------- create / open


def test_create_and_reopen(tmp_path: Path) -> None:
    st, kg = make_store(tmp_path)
    assert (tmp_path / "store.zarr" / "zarr.json").is_file()
    assert st.path == tmp_path / "store.zarr"
    assert st.fingerprint == {"model": "m1", "tokenizer": "t1", "dataset": "d1"}
    assert st.kinds() == ["key"]
    st.write_table("x", pd.DataFrame({"a": [1]}))  # the tables group is not a kind
    assert st.kinds() == ["key"]
    r = Store.open(st.path, mode="r")
    assert r.fingerprint == st.fingerprint
    kg2 = r.kind("key")
    assert kg2.checkpoints == CKPTS and kg2.layers == LAYERS and kg2.hidden == HIDDEN
    assert Store.open(st.path, fingerprint=st.fingerprint).kinds() == ["key"]
    # zarr v3 all the way
    g = zarr.open_group(str(st.path), mode="r")
    assert g.metadata.zarr_format == 3
    assert g["key"]["activations"].metadata.dimension_names == ("checkpoint", "layer", "item", "hidden")
    assert g["key"]["activations"].chunks == (1, 1, N_ITEMS, HIDDEN)


def test_fingerprint_mismatch(tmp_path: Path) -> None:
    st, _ = make_store(tmp_path)
    with pytest.raises(StoreMismatchError) as ei:
        Store.open(st.path, fingerprint={"model": "m2", "tokenizer": "t1", "dataset": "d1"})
    msg = str(ei.value)
    assert "\n" not in msg and str(st.path) in msg and "model" in msg and "tokenizer" not in msg
    assert isinstance(ei.value, RotelabError)
    with pytest.raises(StoreMismatchError, match="extra"):
        Store.open(st.path, fingerprint={"model": "m1", "tokenizer": "t1", "dataset": "d1", "extra": "x"})


def test_missing_and_readonly(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="no store"):
        Store.open(tmp_path / "nope.zarr", mode="r")
    assert not (tmp_path / "nope.zarr").exists()
    st, _ = make_store(tmp_path)
    with pytest.raises(MissingDataError) as ei:
        st.kind("test")
    assert "'test'" in str(ei.value) and str(st.path) in str(ei.value)
    r = Store.open(st.path, mode="r")
    kg = r.kind("key")
    with pytest.raises(StoreError, match="read-only"):
        kg.write_slab("base", 0, slab(0, 0))
    with pytest.raises(StoreError, match="read-only"):
        r.ensure_kind("zero", checkpoints=CKPTS, layers=LAYERS, items=make_items())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not a zarr store"):
        Store.open(tmp_path / "junk")


# --------------------------------------------------------------------------- item table


def test_item_table_roundtrip_and_mismatch(tmp_path: Path) -> None:
    st, kg = make_store(tmp_path)
    items = make_items()
    got = kg.items
    assert list(got.columns) == list(items.columns)
    for c in items.columns:
        assert got[c].tolist() == items[c].tolist(), c
    # same arguments again: fine, idempotent
    st.ensure_kind("key", checkpoints=CKPTS, layers=LAYERS, items=items, hidden=HIDDEN)
    bad = items.copy()
    bad.loc[3, "text"] = "changed"
    with pytest.raises(StoreMismatchError) as ei:
        st.ensure_kind("key", checkpoints=CKPTS, layers=LAYERS, items=bad)
    assert "'key'" in str(ei.value) and "text" in str(ei.value) and str(st.path) in str(ei.value)
    with pytest.raises(StoreMismatchError, match="item table"):
        st.ensure_kind("key", checkpoints=CKPTS, layers=LAYERS, items=items.iloc[:-1])
    with pytest.raises(StoreMismatchError, match="layers"):
        st.ensure_kind("key", checkpoints=CKPTS, layers=[0, 1, 2, 5], items=items)
    with pytest.raises(StoreMismatchError, match="extension"):
        st.ensure_kind("key", checkpoints=["base", "other"] + CKPTS[2:], layers=LAYERS, items=items)
    with pytest.raises(StoreMismatchError, match="hidden"):
        st.ensure_kind("key", checkpoints=CKPTS, layers=LAYERS, items=items, hidden=HIDDEN + 1)
    with pytest.raises(StoreError, match="lacks columns"):
        st.ensure_kind("zero", checkpoints=CKPTS, layers=LAYERS, items=items.drop(columns=["split"]))


# --------------------------------------------------------------------------- NaN & commits


def test_unwritten_reads_nan(tmp_path: Path) -> None:
    _, kg = make_store(tmp_path)
    a = kg.read_activations()
    assert a.shape == (len(CKPTS), len(LAYERS), N_ITEMS, HIDDEN) and a.dtype == np.float32
    assert np.isnan(a).all()
    assert np.isnan(kg.read_final_norm()).all()
    assert not kg.committed("activations").any()
    with pytest.raises(MissingDataError, match="not committed"):
        kg.read_slab("base", 0)
    # the raw zarr array has NaN fill, never zeros
    raw = zarr.open_group(str(kg.store_path), mode="r")["key"]["activations"][0, 0]
    assert np.isnan(raw).all()


def test_commit_discipline(tmp_path: Path) -> None:
    st, kg = make_store(tmp_path)
    raw = zarr.open_group(str(st.path), mode="r+")["key"]["activations"]
    raw[1, 2] = slab(1, 2).astype(np.float16)  # data without marker, as after a kill between the two
    assert np.isnan(kg.read_activations(checkpoints=["p1-ep1"], layers=[2])).all()
    assert not kg.is_committed("activations", "p1-ep1", 2)
    with pytest.raises(MissingDataError):
        kg.read_slab("p1-ep1", 2)
    # a corrupt (empty) marker file is "uncommitted"
    mfile = st.path / "key" / "commit_activations" / "c" / "1" / "2"
    mfile.parent.mkdir(parents=True, exist_ok=True)
    mfile.write_bytes(b"")
    assert not kg.is_committed("activations", "p1-ep1", 2)
    assert np.isnan(kg.read_activations()).all()
    # the proper write commits it
    kg.write_slab("p1-ep1", 2, slab(1, 2))
    assert kg.is_committed("activations", "p1-ep1", 2)
    np.testing.assert_array_equal(kg.read_slab("p1-ep1", 2), slab(1, 2))
    assert kg.committed("activations").sum() == 1
    # rewriting a committed slab overwrites it
    kg.write_slab("p1-ep1", 2, slab(3, 3))
    np.testing.assert_array_equal(kg.read_slab("p1-ep1", 2), slab(3, 3))
    # a corrupt data chunk of a committed slab: read_slab refuses, read_activations masks it
    kg.write_slab("base", 0, slab(0, 0))
    (st.path / "key" / "activations" / "c" / "0" / "0" / "0" / "0").write_bytes(b"garbage")
    with pytest.raises(MissingDataError, match="unreadable"):
        kg.read_slab("base", 0)
    a = kg.read_activations()
    assert np.isnan(a[0, 0]).all()
    np.testing.assert_array_equal(a[1, 2], slab(3, 3))
    # stray .partial files from a killed writer do not disturb anything
    (st.path / "key" / "zarr.deadbeef.partial").write_bytes(b"{")
    (st.path / "key" / "commit_activations" / "c" / "0" / "1.cafe.partial").parent.mkdir(parents=True, exist_ok=True)
    (st.path / "key" / "commit_activations" / "c" / "0" / "1.cafe.partial").write_bytes(b"\x01")
    assert not kg.is_committed("activations", "base", 1)
    assert Store.open(st.path, mode="r").kind("key").committed("activations").sum() == 2
    assert st.remove_stale_partials(older_than_s=0) == 2


def test_single_cell_reads_open_only_that_cells_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path: a one-cell read never scans the marker directory, and a cell whose data
    chunk is there without its marker (killed writer), with a marker of other content, or never
    written, still reads as missing, not as the bytes in its chunk."""
    import rotelab.store.cells as cells

    st, kg = make_store(tmp_path)
    kg.write_slab(CKPTS[1], 2, slab(1, 2))
    xy = np.arange(N_ITEMS * 2, dtype=np.float32).reshape(N_ITEMS, 2)
    dims = ("checkpoint", "layer", "item", "component")
    kg.write_derived("proj", dims, xy, index={"checkpoint": CKPTS[1], "layer": 2}, extra_coords={"component": [0, 1]})
    raw = zarr.open_group(str(st.path), mode="r+")["key"]
    # data chunks without a marker (a writer killed between its data and its marker)
    raw["activations"][2, 3] = slab(2, 3)
    raw["proj"][2, 3] = xy + 1
    # a marker file of the wrong content, over data that is there
    raw["activations"][3, 0] = slab(3, 0)
    (st.path / "key" / "commit_activations" / "c" / "3").mkdir(parents=True, exist_ok=True)
    (st.path / "key" / "commit_activations" / "c" / "3" / "0").write_bytes(b"\x02")

    def no_scan(*_a: object, **_k: object) -> np.ndarray:
        raise AssertionError("a single-cell read scanned every marker")

    monkeypatch.setattr(cells, "scan_markers", no_scan)
    r = Store.open(st.path, mode="r").kind("key")
    np.testing.assert_array_equal(r.read_activations(checkpoints=[CKPTS[1]], layers=[2])[0, 0], slab(1, 2))
    np.testing.assert_array_equal(r.read_derived("proj", checkpoints=[CKPTS[1]], layers=[2])[0, 0], xy)
    for c, v in ((CKPTS[2], 3), (CKPTS[3], 0), (CKPTS[0], 0)):
        assert np.isnan(r.read_activations(checkpoints=[c], layers=[v])).all(), (c, v)
        assert np.isnan(r.read_derived("proj", checkpoints=[c], layers=[v])).all(), (c, v)
        assert not r.is_committed("activations", c, v)
        with pytest.raises(MissingDataError, match="not committed"):
            r.read_slab(c, v)
    # two cells: one committed, one not
    both = r.read_activations(checkpoints=[CKPTS[1], CKPTS[2]], layers=[2, 3])
    np.testing.assert_array_equal(both[0, 0], slab(1, 2))
    assert np.isnan(both[0, 1]).all() and np.isnan(both[1]).all()


def test_cell_masks_of_selections_agree_with_a_full_scan(tmp_path: Path) -> None:
    """committed_cells (per-cell files or one scan, by selection size) against the scan of all
    markers indexed by the selection, for random selections of a random commit pattern."""
    import rotelab.store.cells as cells

    _, kg = make_store(tmp_path)
    rng = np.random.default_rng(3)
    want = rng.random((len(CKPTS), len(LAYERS))) < 0.5
    for ci, li in zip(*np.nonzero(want), strict=True):
        kg.write_slab(CKPTS[ci], LAYERS[li], slab(ci, li))
    mdir = kg.store_path / "key" / "commit_activations"
    full = cells.scan_markers(mdir, want.shape)
    np.testing.assert_array_equal(full, want)
    for _ in range(30):
        pc = rng.choice(len(CKPTS), size=int(rng.integers(1, len(CKPTS) + 1)), replace=False)
        pl = rng.choice(len(LAYERS), size=int(rng.integers(1, len(LAYERS) + 1)), replace=False)
        np.testing.assert_array_equal(cells.committed_cells(mdir, want.shape, [pc, pl]), want[np.ix_(pc, pl)])


@pytest.mark.parametrize("per_cell", [False, True])
def test_read_activations_selection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_cell: bool) -> None:
    import rotelab.store.cells as kgmod

    monkeypatch.setattr(kgmod, "BIG_CELL", 1 if per_cell else 10**9)
    _, kg = make_store(tmp_path)
    ref = np.full((len(CKPTS), len(LAYERS), N_ITEMS, HIDDEN), np.nan, dtype=np.float32)
    rng = np.random.default_rng(0)
    for ci in range(len(CKPTS)):
        for li in range(len(LAYERS)):
            if rng.random() < 0.6:
                kg.write_slab(CKPTS[ci], LAYERS[li], slab(ci, li))
                ref[ci, li] = slab(ci, li)
    np.testing.assert_array_equal(kg.read_activations(), ref)
    np.testing.assert_array_equal(kg.committed("activations"), ~np.isnan(ref[:, :, 0, 0]))
    item_ids = kg.items["item"].to_numpy()
    sel_c, sel_l, sel_i = [CKPTS[3], CKPTS[0]], [2, 0, 3], [item_ids[5], item_ids[1], item_ids[11]]
    got = kg.read_activations(checkpoints=sel_c, layers=sel_l, items=sel_i)
    want = ref[np.ix_([3, 0], [2, 0, 3], [5, 1, 11])]
    assert got.shape == (2, 3, 3, HIDDEN)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(kg.read_activations(layers=[1]), ref[:, [1]])
    np.testing.assert_array_equal(kg.read_activations(checkpoints=["p1-ep2"]), ref[[2]])
    ci, li = map(int, np.argwhere(~np.isnan(ref[:, :, 0, 0]))[0])
    np.testing.assert_array_equal(kg.read_slab(CKPTS[ci], LAYERS[li]), ref[ci, li])
    with pytest.raises(MissingDataError, match="unknown checkpoint"):
        kg.read_activations(checkpoints=["nope"])
    with pytest.raises(StoreError, match="shape"):
        kg.write_slab("base", 0, np.zeros((N_ITEMS, HIDDEN + 1)))
    # final_norm
    kg.write_final_norm("p1-ep1", slab(9, 9))
    fn = kg.read_final_norm()
    assert fn.shape == (len(CKPTS), N_ITEMS, HIDDEN)
    np.testing.assert_array_equal(fn[1], slab(9, 9))
    assert np.isnan(fn[[0, 2, 3]]).all()
    np.testing.assert_array_equal(kg.committed("final_norm"), [False, True, False, False])


# --------------------------------------------------------------------------- metrics


def test_item_arrays(tmp_path: Path) -> None:
    _, kg = make_store(tmp_path)
    prob = np.linspace(0, 1, N_ITEMS)
    correct = np.arange(N_ITEMS) % 2 == 0
    rank = np.arange(N_ITEMS)
    text = np.array([f"answer {i}" for i in range(N_ITEMS)])
    kg.write_item_arrays(
        "p1-ep1",
        {"object_prob": prob, "mc_correct": correct, "mc_rank": rank, "gen_text": text},
        attrs={"engine": "vllm", "version": "0.32.0", "batch_size": 8},
    )
    assert kg.item_arrays() == ["gen_text", "mc_correct", "mc_rank", "object_prob"]
    p = kg.read_item_array("object_prob")
    assert p.shape == (len(CKPTS), N_ITEMS) and p.dtype == np.float32
    np.testing.assert_allclose(p[1], prob.astype(np.float32))
    assert np.isnan(p[[0, 2, 3]]).all()
    np.testing.assert_array_equal(kg.read_item_array("mc_correct")[1], correct.astype(np.float32))
    np.testing.assert_array_equal(kg.read_item_array("mc_rank", checkpoints=["p1-ep1"])[0], rank)
    t = kg.read_item_array("gen_text")
    assert t[1].tolist() == text.tolist() and t[0].tolist() == [""] * N_ITEMS
    np.testing.assert_array_equal(kg.committed("gen_text"), [False, True, False, False])
    assert kg.is_committed("object_prob", "p1-ep1") and not kg.is_committed("object_prob", "base")
    attrs = kg.to_xarray()["object_prob"].attrs
    assert attrs["engine"] == "vllm" and attrs["batch_size"] == 8
    # data written without its marker reads missing
    raw = zarr.open_group(str(kg.store_path), mode="r+")["key"]
    raw["object_prob"][2, :] = prob.astype(np.float32)
    raw["gen_text"][2, :] = text
    assert np.isnan(kg.read_item_array("object_prob")[2]).all()
    assert kg.read_item_array("gen_text")[2].tolist() == [""] * N_ITEMS
    # type change refused; names of the layout refused
    with pytest.raises(StoreMismatchError):
        kg.write_item_arrays("base", {"gen_text": prob})
    with pytest.raises(StoreError, match="reserved"):
        kg.write_item_arrays("base", {"relation": prob})
    with pytest.raises(StoreError, match="shape"):
        kg.write_item_arrays("base", {"object_prob": prob[:-1]})
    with pytest.raises(MissingDataError):
        kg.read_item_array("nope")


# --------------------------------------------------------------------------- derived


def test_derived_arrays(tmp_path: Path) -> None:
    _, kg = make_store(tmp_path)
    kg.write_derived("delta_cossim", ("checkpoint", "layer"), np.float32(0.25), index={"checkpoint": "p1-ep1", "layer": 2})
    d = kg.read_derived("delta_cossim")
    assert d.shape == (len(CKPTS), len(LAYERS))
    assert d[1, 2] == np.float32(0.25) and np.isnan(d).sum() == d.size - 1
    np.testing.assert_array_equal(kg.committed("delta_cossim"), ~np.isnan(d))
    # a whole checkpoint row at once
    kg.write_derived("delta_cossim", ("checkpoint", "layer"), np.arange(4.0), index={"checkpoint": "base"})
    np.testing.assert_array_equal(kg.read_derived("delta_cossim", checkpoints=["base"])[0], np.arange(4.0))
    # projections with an extra coordinate
    comps = ["pc1", "pc2", "pc3"]
    proj = np.random.default_rng(1).standard_normal((N_ITEMS, 3)).astype(np.float32)
    kg.write_derived(
        "projections",
        ("checkpoint", "layer", "item", "component"),
        proj,
        index={"checkpoint": "p2-step10", "layer": 3},
        extra_coords={"component": comps},
        attrs={"method": "pca"},
    )
    pr = kg.read_derived("projections", checkpoints=["p2-step10", "base"], layers=[3])
    assert pr.shape == (2, 1, N_ITEMS, 3)
    np.testing.assert_array_equal(pr[0, 0], proj)
    assert np.isnan(pr[1]).all()
    assert kg.coord("component").tolist() == comps
    assert kg.dims("projections") == ("checkpoint", "layer", "item", "component")
    with pytest.raises(StoreMismatchError, match="component"):
        kg.write_derived("projections", ("checkpoint", "layer", "item", "component"), proj,
                         index={"checkpoint": "base", "layer": 0}, extra_coords={"component": ["a", "b", "c"]})
    # a whole array without cell dims, written and committed at once; new dim without coords
    kg.write_derived("centroid_dist", ("relation_a", "relation_b"), np.eye(2), extra_coords={"relation_a": ["capital", "language"], "relation_b": ["capital", "language"]})
    np.testing.assert_array_equal(kg.read_derived("centroid_dist"), np.eye(2))
    assert bool(kg.committed("centroid_dist"))
    kg.write_derived("drift", ("checkpoint", "step"), np.ones(5), index={"checkpoint": "base"})
    assert kg.coord("step").tolist() == [0, 1, 2, 3, 4]
    # patching results with their own cell dim
    kg.write_derived("patch", ("checkpoint", "source_layer", "item"), np.ones(N_ITEMS),
                     index={"checkpoint": "base", "source_layer": 1}, extra_coords={"source_layer": [0, 1, 2]},
                     cell_dims=("checkpoint", "source_layer"))
    assert kg.committed("patch").shape == (len(CKPTS), 3) and kg.committed("patch").sum() == 1
    assert set(kg.derived_arrays()) == {"delta_cossim", "projections", "centroid_dist", "drift", "patch"}
    with pytest.raises(StoreError, match="cell dims"):
        kg.write_derived("projections", ("checkpoint", "layer", "item", "component"), proj[0],
                         index={"checkpoint": "base", "layer": 0, "item": 100})
    ds = kg.to_xarray()
    assert ds["projections"].dims == ("checkpoint", "layer", "item", "component")
    assert ds["projections"].attrs["method"] == "pca"


# --------------------------------------------------------------------------- growth


def test_series_growth(tmp_path: Path) -> None:
    st, kg = make_store(tmp_path, checkpoints=CKPTS[:2])
    kg.write_slab("base", 1, slab(0, 1))
    kg.write_item_arrays("p1-ep1", {"object_prob": np.ones(N_ITEMS), "gen_text": np.array(["a"] * N_ITEMS)})
    kg.write_derived("delta_cossim", ("checkpoint", "layer"), np.float32(0.5), index={"checkpoint": "base", "layer": 0})
    reader = Store.open(st.path, mode="r").kind("key")  # holds the old metadata
    kg2 = st.ensure_kind("key", checkpoints=CKPTS, layers=LAYERS, items=make_items(), hidden=HIDDEN)
    assert kg2.checkpoints == CKPTS
    a = kg2.read_activations()
    assert a.shape[0] == len(CKPTS)
    np.testing.assert_array_equal(a[0, 1], slab(0, 1))
    assert np.isnan(a[2:]).all()
    assert kg2.read_item_array("object_prob").shape == (len(CKPTS), N_ITEMS)
    assert kg2.read_item_array("gen_text")[1].tolist() == ["a"] * N_ITEMS
    assert kg2.read_derived("delta_cossim").shape == (len(CKPTS), len(LAYERS))
    kg2.write_slab("p2-step10", 3, slab(3, 3))
    # the old handle keeps working on what it knows, and refreshes on an unknown id
    assert reader.checkpoints == CKPTS[:2]
    assert reader.read_activations().shape[0] == 2
    assert reader.committed("activations").shape == (2, len(LAYERS))
    np.testing.assert_array_equal(reader.read_slab("p2-step10", 3), slab(3, 3))
    assert reader.checkpoints == CKPTS
    # a stale writer handle writing a checkpoint it knows is fine too
    kg.write_slab("p1-ep1", 0, slab(1, 0))
    np.testing.assert_array_equal(kg2.read_slab("p1-ep1", 0), slab(1, 0))


# --------------------------------------------------------------------------- xarray


def test_xarray_open(tmp_path: Path) -> None:
    import xarray as xr

    st, kg = make_store(tmp_path)
    kg.write_slab("p1-ep2", 1, slab(2, 1))
    kg.write_item_arrays("p1-ep2", {"object_prob": np.full(N_ITEMS, 0.5)})
    ds = xr.open_zarr(st.path, group="key", consolidated=False)
    assert ds["activations"].dims == ("checkpoint", "layer", "item", "hidden")
    assert ds.sizes == {"checkpoint": len(CKPTS), "layer": len(LAYERS), "item": N_ITEMS, "hidden": HIDDEN}
    assert [str(c) for c in ds["checkpoint"].values] == CKPTS
    assert ds["layer"].values.tolist() == LAYERS
    assert ds["item"].values.tolist() == make_items()["item"].tolist()
    assert ds["object_prob"].dims == ("checkpoint", "item")
    assert ds["commit_activations"].dims == ("checkpoint", "layer")
    # item table columns are coordinates along item
    assert ds["relation"].dims == ("item",) and "relation" in ds.coords
    sel = ds["activations"].sel(checkpoint="p1-ep2", layer=1).values.astype(np.float32)
    np.testing.assert_array_equal(sel, slab(2, 1))
    assert np.isnan(ds["activations"].sel(checkpoint="base").values.astype(np.float32)).all()
    assert int(ds["commit_activations"].sel(checkpoint="p1-ep2", layer=1)) == 1
    assert kg.to_xarray()["activations"].shape == ds["activations"].shape


# --------------------------------------------------------------------------- tables


def test_tables_roundtrip(tmp_path: Path) -> None:
    st, _ = make_store(tmp_path)
    assert st.read_table("joint") is None
    df = pd.DataFrame(
        {
            "kind": ["key", "train", "test"],
            "layer": [3, 3, 4],
            "x": [0.5, np.nan, 1.5],
            "ok": [True, False, True],
            "note": ["a", None, "c"],
        }
    )
    st.write_table("joint", df)
    pd.testing.assert_frame_equal(st.read_table("joint"), df)
    df2 = pd.DataFrame({"a": np.arange(5, dtype=np.int32)}, index=pd.Index(list("vwxyz"), name="key"))
    st.write_table("joint", df2)
    pd.testing.assert_frame_equal(st.read_table("joint"), df2)
    # the live version and the one it replaced (a reader may still be reading it) stay; older go
    st.write_table("joint", df2.iloc[:3])
    versions = sorted(d.name for d in (st.path / "tables" / "joint").iterdir() if d.is_dir())
    assert len(versions) == 2 and st.read_table("joint").index.tolist() == list("vwx")
    st.write_table("empty", df.iloc[:0])
    got = st.read_table("empty")
    assert got is not None and len(got) == 0 and list(got.columns) == list(df.columns)
    assert st.tables() == ["empty", "joint"]
    assert Store.open(st.path, mode="r").read_table("joint") is not None


# --------------------------------------------------------------------------- processes

WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from rotelab.store import Store
    from tests_helper import slab, make_items, CKPTS, LAYERS, HIDDEN
    path, mode, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])
    st = Store.open(path)
    if mode == "grow":
        kg = st.kind("key")
        for li in LAYERS:
            for ci, c in enumerate(kg.checkpoints):
                kg.write_slab(c, li, slab(ci, li)); time.sleep(sleep)
        kg = st.ensure_kind("key", checkpoints=CKPTS, layers=LAYERS, items=make_items(), hidden=HIDDEN)
        for ci, c in enumerate(CKPTS):
            for li in LAYERS:
                # as capture does after growth: only what is not committed yet (a rewrite of a
                # committed slab un-commits it first, so a reader may see it NaN meanwhile)
                if not kg.is_committed("activations", c, li):
                    kg.write_slab(c, li, slab(ci, li)); time.sleep(sleep)
            kg.write_item_arrays(c, {"object_prob": np.full(len(kg.items), ci, dtype=np.float32)})
    elif mode == "rewrite":  # overwrite every (committed) slab, three rounds
        kg = st.kind("key")
        for scale in (2.0, 4.0, 8.0):  # powers of two: exact in float16, so each round is told apart
            for ci, c in enumerate(kg.checkpoints):
                for li in LAYERS:
                    kg.write_slab(c, li, slab(ci, li) * scale); time.sleep(sleep)
    elif mode == "all":
        kg = st.kind("key")
        for ci, c in enumerate(CKPTS):
            for li in LAYERS:
                if not kg.is_committed("activations", c, li):
                    kg.write_slab(c, li, slab(ci, li)); time.sleep(sleep)
            kg.write_item_arrays(c, {"object_prob": np.full(len(kg.items), ci, dtype=np.float32),
                                     "gen_text": np.array([c] * len(kg.items))})
            print("done", c, flush=True)
    else:  # rank: write one checkpoint
        kg = st.kind("key")
        ci = CKPTS.index(mode)
        for li in LAYERS:
            kg.write_slab(mode, li, slab(ci, li)); time.sleep(sleep)
        kg.write_item_arrays(mode, {"mc_rank": np.full(len(kg.items), ci), "gen_text": np.array([mode] * len(kg.items))},
                             attrs={"engine": "hf"})
    """
)


def _writer(tmp_path: Path, store: Path, mode: str, sleep: float) -> subprocess.Popen:
    helper = tmp_path / "helpers"
    helper.mkdir(exist_ok=True)
    src = Path(__file__).read_text()
    (helper / "tests_helper.py").write_text(src)
    (helper / "writer.py").write_text(WRITER)
    env = _env()
    env["PYTHONPATH"] = str(helper) + os.pathsep + env["PYTHONPATH"]
    return subprocess.Popen(
        [sys.executable, str(helper / "writer.py"), str(store), mode, str(sleep)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_consistent(kg: KindGroup) -> int:
    """Every slab committed before the read holds exactly its data; every slab still
    uncommitted after it reads NaN; one committed meanwhile is either. Returns #committed."""
    before = kg.committed("activations")
    a = kg.read_activations()
    after = kg.committed("activations")
    for ci in range(a.shape[0]):
        for li in range(a.shape[1]):
            committed_before = ci < before.shape[0] and before[ci, li]
            committed_after = ci < after.shape[0] and after[ci, li]
            if committed_before:
                np.testing.assert_array_equal(a[ci, li], slab(ci, li))
            elif not committed_after:
                assert np.isnan(a[ci, li]).all()
            elif not np.isnan(a[ci, li]).all():
                np.testing.assert_array_equal(a[ci, li], slab(ci, li))
    return int(after.sum())


def test_concurrent_reader_during_writes_and_growth(tmp_path: Path) -> None:
    st, kg = make_store(tmp_path, checkpoints=CKPTS[:2])
    proc = _writer(tmp_path, st.path, "grow", 0.01)
    reader = Store.open(st.path, mode="r").kind("key")
    seen, loops = 0, 0
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        loops += 1
        if loops % 3 == 0:
            reader.refresh()
        seen = max(seen, _check_consistent(reader))
        if "object_prob" in reader.item_arrays():
            committed = reader.committed("object_prob")
            p = reader.read_item_array("object_prob")
            for ci in range(p.shape[0]):
                assert (p[ci] == ci).all() if committed[ci] else (np.isnan(p[ci]).all() or (p[ci] == ci).all())
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert loops > 3
    reader.refresh()
    assert reader.checkpoints == CKPTS
    assert _check_consistent(reader) == len(CKPTS) * len(LAYERS)


def test_reader_during_rewrites_of_committed_slabs(tmp_path: Path) -> None:
    """A slab being rewritten is un-committed first: a reader sees one round's data exactly or all
    NaN, never a mix of rounds or a torn chunk, and the last round's data once the writer is done."""
    st, kg = make_store(tmp_path, checkpoints=CKPTS[:2])
    for ci, c in enumerate(CKPTS[:2]):
        for li in LAYERS:
            kg.write_slab(c, li, slab(ci, li))
    proc = _writer(tmp_path, st.path, "rewrite", 0.005)
    reader = Store.open(st.path, mode="r").kind("key")
    loops = 0
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        loops += 1
        a = reader.read_activations()
        for ci in range(a.shape[0]):
            for li in range(a.shape[1]):
                if np.isnan(a[ci, li]).all():  # being rewritten: un-committed meanwhile
                    continue
                ref = slab(ci, li).astype(np.float32)
                assert any(np.array_equal(a[ci, li], ref * k) for k in (1.0, 2.0, 4.0, 8.0)), (ci, li)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert loops > 3
    assert reader.committed("activations").all()
    final = reader.read_activations()
    for ci in range(2):
        for li in range(len(LAYERS)):
            np.testing.assert_array_equal(final[ci, li], slab(ci, li).astype(np.float32) * 8.0)


def test_two_rank_writers(tmp_path: Path) -> None:
    st, kg = make_store(tmp_path)
    procs = [_writer(tmp_path, st.path, c, 0.0) for c in CKPTS]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    kg.refresh()
    assert _check_consistent(kg) == len(CKPTS) * len(LAYERS)
    ranks = kg.read_item_array("mc_rank")
    np.testing.assert_array_equal(ranks, np.repeat(np.arange(len(CKPTS), dtype=np.float32)[:, None], N_ITEMS, 1))
    assert kg.read_item_array("gen_text")[:, 0].tolist() == CKPTS
    assert kg.to_xarray()["mc_rank"].attrs["engine"] == "hf"


def test_kill9_resume_equals_uninterrupted(tmp_path: Path) -> None:
    st, kg = make_store(tmp_path / "a")
    proc = _writer(tmp_path, st.path, "all", 0.02)
    deadline = time.time() + 60
    while kg.committed("activations").sum() < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    n = _check_consistent(kg)
    assert 5 <= n < len(CKPTS) * len(LAYERS)
    # resume: rerun writes for what is not committed
    proc = _writer(tmp_path, st.path, "all", 0.0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    # uninterrupted reference
    ref_st, ref = make_store(tmp_path / "b")
    proc = _writer(tmp_path, ref_st.path, "all", 0.0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    kg.refresh()
    ref.refresh()
    np.testing.assert_array_equal(kg.read_activations(), ref.read_activations())
    np.testing.assert_array_equal(kg.committed("activations"), ref.committed("activations"))
    assert kg.committed("activations").all()
    for name in ("object_prob", "gen_text"):
        np.testing.assert_array_equal(kg.read_item_array(name), ref.read_item_array(name))
    assert kg.item_arrays() == ref.item_arrays()


def test_a_format_1_store_is_adopted_only_when_its_recorded_fingerprint_agrees(tmp_path: Path) -> None:
    """Stores written before the fingerprint covered the config recorded fewer keys: such a store
    is accepted when all it recorded agrees, then records the full fingerprint and is checked
    strictly from then on."""
    import json

    p = tmp_path / "old.zarr"
    Store.open(p, fingerprint={"model": "m", "dataset": "d"})
    meta = json.loads((p / "zarr.json").read_text())
    meta["attributes"]["rotelab_store"] = 1  # as the older version wrote it
    (p / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreMismatchError, match="dataset"):
        Store.open(p, fingerprint={"model": "m", "dataset": "other", "config": "c1"})
    assert Store.open(p, fingerprint={"model": "m", "dataset": "d", "config": "c1"}).fingerprint["config"] == "c1"
    with pytest.raises(StoreMismatchError, match="config"):
        Store.open(p, fingerprint={"model": "m", "dataset": "d", "config": "c2"})
