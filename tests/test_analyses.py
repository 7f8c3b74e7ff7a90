"""Tests of rotelab.analyses: ΔCosSim, alignment drift, statistics and projections against
brute-force references written here from the paper's formulas (Appendix D, F.2–F.4), on random
data, on a store filled through the Store API, and on a tiny captured run; figures render headless."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from rotelab.errors import RotelabError
from rotelab.analyses import (
    alignment_by_relation,
    delta_cossim,
    fit_projection,
    project,
    project_kinds,
    relation_similarities,
    seed_statistics,
)
from rotelab.analyses.analyze import alignment_run, analyze_run, delta_cossim_kind
from rotelab.store import Store

matplotlib.use("Agg")


# --------------------------------------------------------------------------- brute-force references

def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (math.sqrt(float(np.dot(a, a))) * math.sqrt(float(np.dot(b, b)))))


def brute_delta_cossim(X: np.ndarray, rels: list[str]) -> float:
    """Appendix F.3 with Python loops over pairs."""
    X = np.asarray(X, dtype=np.float64)
    names = sorted(set(rels))
    sim_in, sim_out = [], []
    for r in names:
        inside = [i for i, x in enumerate(rels) if x == r]
        outside = [i for i, x in enumerate(rels) if x != r]
        pairs = [cos(X[i], X[j]) for i in inside for j in inside if i != j]
        sim_in.append(sum(pairs) / len(pairs))
        cross = [cos(X[i], X[j]) for i in inside for j in outside]
        sim_out.append(sum(cross) / len(cross))
    return sum(sim_in) / len(names) - sum(sim_out) / len(names)


def brute_alignment(key_X, key_items: pd.DataFrame, X, items: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(relation, split) → mean over facts of (mean over the fact's templates of cos(key, prompt));
    splits: ``all``, each label, and ``heldout`` = the validation and test facts together."""
    key_row = {f: i for i, f in enumerate(key_items["fact_id"])}
    per_fact: dict[str, list[float]] = {}
    meta: dict[str, tuple[str, str]] = {}
    for i in range(len(items)):
        f = items["fact_id"].iloc[i]
        per_fact.setdefault(f, []).append(cos(key_X[key_row[f]], X[i]))
        meta[f] = (items["relation"].iloc[i], items["split"].iloc[i])
    out: dict[tuple[str, str], list[float]] = {}
    for f, vals in per_fact.items():
        r, s = meta[f]
        for split in ("all", s, *(("heldout",) if s in ("validation", "test") else ())):
            out.setdefault((r, split), []).append(sum(vals) / len(vals))
    return {k: sum(v) / len(v) for k, v in out.items()}


def random_slab(n_per_rel=(5, 7, 4), hidden=16, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    rels = [f"r{i}" for i, n in enumerate(n_per_rel) for _ in range(n)]
    centers = rng.normal(size=(len(n_per_rel), hidden))
    idx = np.array([int(r[1:]) for r in rels])
    X = centers[idx] + spread * rng.normal(size=(len(rels), hidden))
    perm = rng.permutation(len(rels))
    return X[perm], [rels[i] for i in perm]


# --------------------------------------------------------------------------- ΔCosSim

@pytest.mark.parametrize("seed,spread", [(0, 0.3), (1, 1.0), (2, 5.0)])
def test_delta_cossim_matches_brute_force(seed, spread):
    X, rels = random_slab(seed=seed, spread=spread)
    assert delta_cossim(X, rels) == pytest.approx(brute_delta_cossim(X, rels), abs=1e-10)


def test_relation_similarities_per_relation_terms():
    X, rels = random_slab((3, 4), hidden=6, seed=3)
    t = relation_similarities(X, rels).set_index("relation")
    inside = [i for i, r in enumerate(rels) if r == "r0"]
    outside = [i for i, r in enumerate(rels) if r != "r0"]
    want_in = np.mean([cos(X[i], X[j]) for i, j in itertools.permutations(inside, 2)])
    want_out = np.mean([cos(X[i], X[j]) for i in inside for j in outside])
    assert t.loc["r0", "sim_in"] == pytest.approx(want_in, abs=1e-12)
    assert t.loc["r0", "sim_out"] == pytest.approx(want_out, abs=1e-12)
    assert t.loc["r1", "n"] == 4


def test_delta_cossim_known_values():
    # two relations, perfectly separated orthogonal clusters: Sim_in = 1, Sim_out = 0
    X = np.array([[1, 0], [2, 0], [0, 1], [0, 3.0]])
    assert delta_cossim(X, ["a", "a", "b", "b"]) == pytest.approx(1.0)
    # scale invariance per row
    Y, rels = random_slab(seed=5)
    assert delta_cossim(Y * np.arange(1, len(Y) + 1)[:, None], rels) == pytest.approx(delta_cossim(Y, rels), abs=1e-12)


def test_delta_cossim_bad_input():
    X, rels = random_slab()
    with pytest.raises(RotelabError, match="two relations"):
        delta_cossim(X, ["r0"] * len(X))
    bad = X.copy()
    bad[2, 3] = np.nan
    with pytest.raises(RotelabError, match="NaN"):
        delta_cossim(bad, rels)
    with pytest.raises(RotelabError, match="fewer than two items"):
        delta_cossim(X[:6], ["a"] * 5 + ["b"])
    with pytest.raises(RotelabError, match="labels"):
        delta_cossim(X, rels[:-1])
    z = X.copy()
    z[0] = 0
    with pytest.raises(RotelabError, match="zeros"):
        delta_cossim(z, rels)


def test_delta_cossim_thousands_of_items_is_fast():
    import time

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 576)).astype(np.float32)
    rels = [f"r{i % 5}" for i in range(3000)]
    t0 = time.perf_counter()
    delta_cossim(X, rels)
    assert time.perf_counter() - t0 < 1.0


# --------------------------------------------------------------------------- alignment

def _items(kind_templates: int, n_facts=6, rels=("a", "b"), seed=0) -> pd.DataFrame:
    rows = []
    for f in range(n_facts):
        for t in range(kind_templates):
            rows.append({"fact_id": f"f{f}", "relation": rels[f % len(rels)], "template_id": t,
                         "split": "train" if f < 2 else "heldout"})
    df = pd.DataFrame(rows)
    df.insert(0, "item", range(len(df)))
    return df


def test_alignment_matches_brute_force():
    rng = np.random.default_rng(1)
    key_items = _items(1).sample(frac=1.0, random_state=0).reset_index(drop=True)  # order must not matter
    items = _items(3)
    key_X = rng.normal(size=(len(key_items), 8))
    X = rng.normal(size=(len(items), 8))
    got = alignment_by_relation(key_X, key_items, X, items).set_index(["relation", "split"])
    want = brute_alignment(key_X, key_items, X, items)
    assert set(got.index) == set(want)
    for k, v in want.items():
        assert got.loc[k, "cosine"] == pytest.approx(v, abs=1e-12)
    assert got.loc[("a", "all"), "n"] == 3


def test_alignment_bad_input():
    key_items = _items(1, n_facts=3)
    items = _items(2, n_facts=4)
    with pytest.raises(RotelabError, match="no key-token item"):
        alignment_by_relation(np.ones((3, 4)), key_items, np.ones((8, 4)), items)


# --------------------------------------------------------------------------- statistics (Appendix D)

def _metric_table(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for c, phase in (("base", "base"), ("p1-e01", "phase1"), ("p1-e02", "phase1"), ("p2-e01", "phase2")):
        for kind in ("key", "test"):
            for rel in ("a", "b"):  # two rows per group: averaged within the run first
                rows.append((c, phase, kind, "heldout", "mc_correct", float(rng.uniform(0, 1))))
    return pd.DataFrame(rows, columns=["checkpoint", "phase", "kind", "split", "metric", "value"])


def test_seed_statistics_against_scipy():
    tables = [_metric_table(s) for s in range(5)]
    out = seed_statistics(tables, chance={"mc_correct": 0.25})
    assert set(out["stage"]) == {"base", "rote", "generalization"}
    row = out[(out["stage"] == "rote") & (out["kind"] == "test")].iloc[0]
    vals = [t[(t["checkpoint"] == "p1-e02") & (t["kind"] == "test")]["value"].mean() for t in tables]
    res = sps.ttest_1samp(vals, 0.25, alternative="greater")
    assert row["mean"] == pytest.approx(np.mean(vals))
    assert row["std"] == pytest.approx(np.std(vals, ddof=1))
    assert row["t"] == pytest.approx(res.statistic)
    assert row["p"] == pytest.approx(res.pvalue)
    half = sps.t.ppf(0.975, 4) * np.std(vals, ddof=1) / np.sqrt(5)
    assert row["ci95"] == pytest.approx(half)
    assert row["lower"] == pytest.approx(np.mean(vals) - half)
    assert row["significant"] == (res.pvalue < 0.05)
    assert row["n"] == 5 and row["chance"] == 0.25


def test_seed_statistics_zero_variance_and_errors():
    t = _metric_table(0)
    out = seed_statistics([t, t.copy()], chance=0.01)
    assert np.isinf(out["t"]).all() or (out["std"] > 0).any()
    assert (out.loc[np.isinf(out["t"]) & (out["t"] > 0), "p"] == 0).all()
    from rotelab.analyses.stats import one_sided_t

    same = one_sided_t(np.array([0.4, 0.4, 0.4]), 0.1)  # mean 0.4 + 6e-17 in float64
    assert same["std"] == 0 and same["ci95"] == 0 and same["t"] == np.inf and same["p"] == 0
    assert np.isnan(one_sided_t(np.array([0.1, 0.1]), 0.1)["p"])
    with pytest.raises(RotelabError, match="at least two runs"):
        seed_statistics([t])
    with pytest.raises(RotelabError, match="missing columns"):
        seed_statistics([t, t.drop(columns="phase")])


# --------------------------------------------------------------------------- projections (F.2)

def test_pca_projection_is_standardscaler_plus_pca():
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    X, _ = random_slab(seed=4)
    got = project(X, "pca")
    Z = StandardScaler().fit_transform(X)
    want = PCA(n_components=2).fit_transform(Z)
    # components are defined up to sign
    for j in range(2):
        assert np.allclose(got[:, j], want[:, j], atol=1e-5) or np.allclose(got[:, j], -want[:, j], atol=1e-5)
    with pytest.raises(RotelabError, match="NaN"):
        project(np.full((5, 3), np.nan))


# --------------------------------------------------------------------------- store-level on random activations

def _items_table(n_facts=6, rels=("capital", "author", "mother"), templates=1) -> pd.DataFrame:
    rows = []
    for f in range(n_facts):
        for t in range(templates):
            rows.append({"fact_id": f"f{f}", "relation": rels[f % len(rels)], "template_id": t, "text": f"S{f} t{t}",
                         "object": f"O{f}", "split": "train" if f < 3 else "heldout"})
    df = pd.DataFrame(rows)
    df.insert(0, "item", range(len(df)))
    return df


def test_delta_cossim_kind_on_random_store(tmp_path: Path):
    st = Store.open(tmp_path / "s.zarr", fingerprint={"model": "x"})
    items = _items_table(9)
    g = st.ensure_kind("key", checkpoints=["base", "p1-e01", "p1-e02"], layers=[0, 1, 2, 3], items=items, hidden=12)
    rng = np.random.default_rng(0)
    slabs = {}
    for c in ["base", "p1-e01"]:
        for v in [0, 1, 3]:  # layer 2 never captured
            slabs[c, v] = rng.normal(size=(len(items), 12)).astype(np.float16)
            g.write_slab(c, v, slabs[c, v])
    notes: list[str] = []
    assert delta_cossim_kind(g, progress=False, note=notes.append) == 2
    got = g.read_derived("delta_cossim")
    rels = items["relation"].tolist()
    for (c, v), s in slabs.items():
        ci, li = g.checkpoints.index(c), g.layers.index(v)
        assert got[ci, li] == pytest.approx(brute_delta_cossim(s.astype(np.float32), rels), abs=1e-5)
    assert np.isnan(got[:, 2]).all() and np.isnan(got[2]).all()  # uncaptured: a gap, never a number
    assert g.committed("delta_cossim").tolist() == [True, True, False]
    # resume: nothing to do; a newly captured layer recomputes that checkpoint's row only
    assert delta_cossim_kind(g, progress=False) == 0
    g.write_slab("base", 2, rng.normal(size=(len(items), 12)))
    assert delta_cossim_kind(g, progress=False) == 1
    assert np.isfinite(g.read_derived("delta_cossim", checkpoints=["base"])[0]).all()
    # a slab with NaN rows (e.g. overflow) is a marked gap with a note, not a number over a subset
    bad = rng.normal(size=(len(items), 12))
    bad[0, 0] = np.inf
    g.write_slab("p1-e02", 0, bad)
    delta_cossim_kind(g, progress=False, note=notes.append)
    assert np.isnan(g.read_derived("delta_cossim", checkpoints=["p1-e02"], layers=[0])).all()
    assert any("p1-e02" in n and "NaN" in n for n in notes)


def test_projections_on_random_store_fit_on_reference(tmp_path: Path):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    st = Store.open(tmp_path / "s.zarr", fingerprint={"model": "x"})
    items = _items_table(8)
    cps = ["base", "p1-e01"]
    rng = np.random.default_rng(1)
    data = {}
    for k in ("key", "test"):
        g = st.ensure_kind(k, checkpoints=cps, layers=[0, 1], items=items, hidden=10)
        for c in cps:
            for v in (0, 1):
                data[k, c, v] = rng.normal(size=(len(items), 10)).astype(np.float16).astype(np.float32)
                g.write_slab(c, v, data[k, c, v])
    n = project_kinds(st, ["key"], "pca", fit_on="base", progress=False)
    assert n == 4
    ref = data["key", "base", 1]
    sc = StandardScaler().fit(ref)
    pca = PCA(2).fit(sc.transform(ref))
    want = pca.transform(sc.transform(data["key", "p1-e01", 1]))
    got = st.kind("key").read_derived("proj_pca", checkpoints=["p1-e01"], layers=[1])[0, 0]
    assert np.allclose(got, want, atol=1e-4)
    assert project_kinds(st, ["key"], "pca", fit_on="base", progress=False) == 0  # resumable
    assert project_kinds(st, ["key"], "pca", fit_on="per-slab", progress=False) == 4  # other setting: recomputed
    # joint space: one fit over key + test, stored in both groups
    assert project_kinds(st, ["key", "test"], "pca", progress=False) == 4
    joint = np.concatenate([data["key", "base", 0], data["test", "base", 0]])
    want = PCA(2).fit_transform(StandardScaler().fit_transform(joint))
    got = np.concatenate([st.kind(k).read_derived("proj_pca_joint", checkpoints=["base"], layers=[0])[0, 0] for k in ("key", "test")])
    for j in range(2):
        assert np.allclose(got[:, j], want[:, j], atol=1e-4) or np.allclose(got[:, j], -want[:, j], atol=1e-4)
    with pytest.raises(RotelabError, match="not 'per-slab'"):
        project_kinds(st, ["key"], "pca", fit_on="nope", progress=False)
    with pytest.raises(RotelabError, match="out of range"):
        project_kinds(st, ["key"], "pca", layers=[7], progress=False)


@pytest.mark.slow
def test_umap_projection_is_seeded():
    X, _ = random_slab((10, 10, 10), seed=2)
    a = project(X, "umap", seed=3)
    b = project(X, "umap", seed=3)
    assert a.shape == (30, 2) and np.allclose(a, b)
    p = fit_projection(X, "umap", seed=3)
    assert p.transform(X[:5]).shape == (5, 2)


# --------------------------------------------------------------------------- a tiny captured run

@pytest.fixture(scope="module")
def captured_run(tmp_path_factory):
    import torch

    from fixtures_runs import make_tiny_run
    from rotelab.probe import capture_run

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("captured")
    run = make_tiny_run(tmp, n_checkpoints=3, config={
        "data": {"relations": ["capital", "author", "mother"], "facts_per_relation": 4, "templates_per_kind": 2}})
    capture_run(run, kinds=["key", "train", "test", "unrelated", "translated-de"], progress=False)
    return run


def test_analyze_tiny_captured_run_against_brute_force(captured_run):
    run = captured_run
    summary = analyze_run(run, progress=False, note=lambda m: None)
    assert summary["delta_cossim"]["key"] == 3
    st = Store.open(run.store_path, mode="r")
    for kind in ("key", "test"):
        g = st.kind(kind)
        got = g.read_derived("delta_cossim")
        rels = g.items["relation"].tolist()
        for ci, c in enumerate(g.checkpoints):
            for li, v in enumerate(g.layers):
                want = brute_delta_cossim(g.read_slab(c, v), rels)
                assert got[ci, li] == pytest.approx(want, abs=1e-5)
    # alignment: brute force from the slabs, delta against the last phase-1 checkpoint (p1-e02)
    table = st.read_table("alignment")
    assert set(table["kind"]) == {"train", "test", "unrelated", "translated-de"}
    assert (table["reference"] == "p1-e02").all()
    key = st.kind("key")
    for kind in ("test", "translated-de"):
        g = st.kind(kind)
        for c in ("base", "p1-e02"):
            for v in (0, 2):
                want = brute_alignment(key.read_slab(c, v), key.items, g.read_slab(c, v), g.items)
                sel = table[(table["checkpoint"] == c) & (table["layer"] == v) & (table["kind"] == kind)]
                got = {(r, s): x for r, s, x in zip(sel["relation"], sel["split"], sel["cosine"])}
                assert got.keys() == want.keys()
                for k2, x in want.items():
                    assert got[k2] == pytest.approx(x, abs=1e-5)
    # the final-norm state: its own ΔCosSim array and alignment rows at layer -1, brute force from final_norm
    for kind in ("key", "test"):
        g = st.kind(kind)
        got = g.read_derived("delta_cossim_final_norm")
        for ci, c in enumerate(g.checkpoints):
            fn = g.read_final_norm([c])[0]
            assert not np.allclose(fn, g.read_slab(c, g.layers[-1]), atol=1e-3)  # a different representation
            assert got[ci] == pytest.approx(brute_delta_cossim(fn, g.items["relation"].tolist()), abs=1e-5)
    g = st.kind("test")
    for c in ("base", "p1-e02"):
        want = brute_alignment(key.read_final_norm([c])[0], key.items, g.read_final_norm([c])[0], g.items)
        sel = table[(table["checkpoint"] == c) & (table["layer"] == -1) & (table["kind"] == "test")]
        assert {(r, s2): x for r, s2, x in zip(sel["relation"], sel["split"], sel["cosine"])} == pytest.approx(want, abs=1e-5)
    t = table.set_index(["checkpoint", "layer", "relation", "kind", "split"])
    k = ("capital", "test", "all")
    assert t.loc[("base", 2, *k), "delta"] == pytest.approx(t.loc[("base", 2, *k), "cosine"] - t.loc[("p1-e02", 2, *k), "cosine"])
    assert t.loc[("p1-e02", 2, *k), "delta"] == pytest.approx(0.0)
    # projections for every captured kind, joint key+train+test
    assert "proj_pca" in st.kind("unrelated").derived_arrays()
    assert st.kind("train").read_derived("proj_pca_joint").shape == (3, 3, len(st.kind("train").items), 2)
    # resumable: a second pass writes nothing new
    again = analyze_run(run, progress=False, note=lambda m: None)
    assert sum(again["delta_cossim"].values()) == 0 and sum(again["projections"].values()) == 0


def test_analyze_bad_kinds(captured_run):
    with pytest.raises(RotelabError, match="no captures for kind 'nope'"):
        analyze_run(captured_run, kinds=["nope"], progress=False)


def test_alignment_run_on_random_store_uses_reference(captured_run, tmp_path):
    run = captured_run
    st = Store.open(tmp_path / "r.zarr", fingerprint={"model": "x"})
    cps = [e.id for e in run.checkpoints()]
    rng = np.random.default_rng(0)
    for k in ("key", "test"):
        g = st.ensure_kind(k, checkpoints=cps, layers=[0, 1], items=run.items(k), hidden=8)
        for c in cps:
            g.write_slab(c, 1, rng.normal(size=(len(g.items), 8)))
    t = alignment_run(run, st, progress=False, note=lambda m: None)
    assert set(t["layer"]) == {1} and set(t["kind"]) == {"test"}
    assert (t["reference"] == "p1-e02").all()


# --------------------------------------------------------------------------- figures

def test_figures_render_and_contain_what_they_claim(captured_run, tmp_path):
    import matplotlib.pyplot as plt

    from rotelab.analyses import figures as F

    run = captured_run
    analyze_run(run, progress=False, note=lambda m: None)
    out = tmp_path / "figs"
    fig = F.plot_projection_panels(run, "key", out_dir=out)
    assert len([a for a in fig.axes if a.get_visible()]) == 2  # the stages: base and last phase 1 (no phase 2 here)
    assert all("ΔCosSim=" in a.get_title() for a in fig.axes)
    assert fig.axes[0].get_xlabel() == "PC 1"
    for ext in ("png", "pdf", "svg", "csv"):
        assert (out / f"proj_pca_key_layer2.{ext}").is_file()
    csv = pd.read_csv(out / "proj_pca_key_layer2.csv")
    assert len(csv) == 2 * len(run.items("key")) and set(csv["checkpoint"]) == {"base", "p1-e02"}
    fig = F.plot_delta_cossim_layers(run, ["key", "test"], out_dir=out)
    vis = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in vis] == ["key", "test"] and vis[0].get_ylabel() == "ΔCosSim"
    fig = F.plot_alignment(run, out_dir=out)
    assert fig.axes[0].get_ylabel() == "cosine similarity to key token"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["train", "test", "unrelated"]
    fig = F.plot_alignment_delta(run, out_dir=out)
    assert fig.axes[0].get_ylabel() == "ΔSimilarity"
    # metric curves from a given table
    table = pd.DataFrame([(c, p, k, "heldout", "object_prob", v)
                          for (c, p), v0 in zip([("base", "base"), ("p1-e01", "phase1"), ("p1-e02", "phase1")], (0.1, 0.2, 0.3))
                          for k, v in (("key", v0), ("test", v0 / 2), ("translated-de", v0 / 3), ("unrelated", 0.0))],
                         columns=["checkpoint", "phase", "kind", "split", "metric", "value"])
    fig = F.plot_metric_curves(run, "object_prob", table=table, out_dir=out)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "object probability" and ax.get_xlabel() == "checkpoint"
    assert len(ax.get_lines()) >= 4
    fig = F.plot_crosslingual(run, "object_prob", table=table, out_dir=out)
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} == {"test", "translated-de", "unrelated"}
    plt.close("all")
    # figures_run renders what exists and notes the rest
    notes: list[str] = []
    res = F.figures_run(run, note=notes.append)
    assert Path(res["delta_cossim_layers"]).is_file()
    assert res["patching"].startswith("skipped:")
    assert any("patching" in n for n in notes)


def test_generalization_grid(captured_run, tmp_path, monkeypatch):
    from rotelab.analyses import figures as F

    runs = []
    for k, p, v in ((1, 1, 0.1), (1, 2, 0.3), (2, 1, 0.5), (2, 2, 0.9)):
        r = type(captured_run)(captured_run.root, captured_run.config.model_copy(
            update={"phase2": captured_run.config.phase2.model_copy(update={"k": k, "prompts": p})}))
        r._test_value = v  # type: ignore[attr-defined]
        runs.append(r)

    def fake_table(r):
        return pd.DataFrame([("p1-e02", "phase1", "test", "heldout", "gen_correct", r._test_value)],
                            columns=["checkpoint", "phase", "kind", "split", "metric", "value"])

    monkeypatch.setattr(F, "metric_table", fake_table)
    fig = F.plot_generalization_grid(runs, out_dir=tmp_path)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "number of training prompts P" and ax.get_ylabel() == "facts per relation k"
    img = ax.get_images()[0].get_array()
    assert img.shape == (2, 2) and img[0, 1] == pytest.approx(0.9) and img[1, 0] == pytest.approx(0.1)
    assert (tmp_path / "generalization_grid.csv").is_file()


def test_summary_and_cli(captured_run):
    from typer.testing import CliRunner

    from rotelab.analyses.summary import write_summary
    from rotelab.cli import app

    run = captured_run
    res = CliRunner().invoke(app, ["analyze", str(run.root), "--no-progress", "--kinds", "key,test"])
    assert res.exit_code == 0, res.output
    assert "written now" in res.output
    res = CliRunner().invoke(app, ["analyze", str(run.root), "--kinds", "nope"])
    assert isinstance(res.exception, RotelabError) and "no captures for kind 'nope'" in str(res.exception)
    res = CliRunner().invoke(app, ["figures", str(run.root)])
    assert res.exit_code == 0, res.output
    assert "delta_cossim_layers" in res.output and (run.figures_dir / "delta_cossim_layers.svg").is_file()
    text = write_summary(run)
    g = Store.open(run.store_path, mode="r").kind("key")
    v = g.read_derived("delta_cossim", checkpoints=["p1-e02"], layers=[g.layers[-1]])[0, 0]
    assert "## ΔCosSim at the last layer" in text and f"{v:.3f}" in text
    assert run.summary_path.read_text(encoding="utf-8") == text


def test_metric_table_and_run_statistics(captured_run, monkeypatch):
    from rotelab.analyses import metrics as M
    from rotelab.analyses import stats as S

    run = captured_run
    st = Store.open(run.store_path, fingerprint=run.fingerprint())
    g = st.kind("test")
    split = g.items["split"].to_numpy()
    rng = np.random.default_rng(0)
    from rotelab.probe.accuracy_metrics import METRIC_ARRAYS

    vals = {}
    for c in ("base", "p1-e02"):
        vals[c] = rng.uniform(size=len(split))
        arrays = {m: rng.uniform(size=len(split)) for m in METRIC_ARRAYS if m != "gen_text"}
        g.write_item_arrays(c, {**arrays, "object_prob": vals[c], "gen_text": np.array(["x"] * len(split))})
    t = M.metric_table(run)
    assert {"base", "p1-e02"} <= set(t["checkpoint"])  # (another test of this module may have evaluated more)
    assert "gen_text" not in set(t["metric"]) and "object_prob" in set(t["metric"])  # strings left out
    t = t[t["kind"] == "test"]
    row = t[(t["checkpoint"] == "p1-e02") & (t["split"] == "heldout") & (t["metric"] == "object_prob")].iloc[0]
    assert row["phase"] == "phase1" and row["kind"] == "test"
    assert row["value"] == pytest.approx(vals["p1-e02"][np.isin(split, ["validation", "test"])].mean(), rel=1e-6)  # heldout = validation ∪ test
    for s in ("validation", "test"):
        row = t[(t["checkpoint"] == "p1-e02") & (t["split"] == s) & (t["metric"] == "object_prob")].iloc[0]
        assert row["value"] == pytest.approx(vals["p1-e02"][split == s].mean(), rel=1e-6)
    # statistics over two "seeds" with the default chance 1 / (distractors + 1)
    tables = iter([t, t.assign(value=t["value"] * 0.5)])
    monkeypatch.setattr(M, "metric_table", lambda r: next(tables))
    out = S.run_statistics([run, run])
    assert np.allclose(out["chance"], 1 / (run.config.data.distractors + 1))
    r = out[(out["stage"] == "rote") & (out["split"] == "all") & (out["metric"] == "object_prob")].iloc[0]
    assert r["mean"] == pytest.approx(0.75 * vals["p1-e02"].mean(), rel=1e-5)


def test_sft_series_is_its_own_line_and_fig5_uses_total_tokens(tmp_path):
    """The SFT series is never chained after phase 2: its curve runs base → sft-e…; Fig. 5 puts
    every series on the total-training-tokens axis, each starting at base (0 tokens)."""
    import matplotlib.pyplot as plt

    from rotelab.analyses import figures as F
    from rotelab.checkpoints import CheckpointEntry, write_index
    from rotelab.config import config_from_dict
    from rotelab.run import Run

    run = Run(tmp_path / "r", config_from_dict({"name": "r"}))
    E = CheckpointEntry
    write_index(run.index_path, [
        E("base", "base", 0, 0, 0, None, None, "main", 0), E("p1-e01", "phase1", 1, 5, 100, 1.0, None, "main", 100),
        E("p2-e01", "phase2", 1, 2, 40, 1.0, None, "main", 140), E("sft-e01", "sft", 1, 9, 300, 1.0, None, "sft", 300),
        E("sft-e02", "sft", 2, 18, 600, 1.0, None, "sft", 600)])
    vals = {"base": 0.0, "p1-e01": 0.2, "p2-e01": 0.6, "sft-e01": 0.1, "sft-e02": 0.3}
    table = pd.DataFrame([(c, "", k, s, "gen_correct", v) for c, v in vals.items() for k in ("test", "train") for s in ("all", "heldout")],
                         columns=["checkpoint", "phase", "kind", "split", "metric", "value"])
    fig = F.plot_metric_curves(run, "gen_correct", table=table, save=False)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["base", "p1-e01", "p2-e01"]
    fig = F.plot_metric_curves(run, "gen_correct", table=table, save=False, series="sft")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["base", "sft-e01", "sft-e02"]
    fig = F.plot_token_curves(run, "gen_correct", table=table, save=False)
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in fig.axes[0].get_lines()}
    assert lines == {"memorize-then-generalize": ([0, 100, 140], [0.0, 0.2, 0.6]), "sft": ([0, 300, 600], [0.0, 0.1, 0.3])}
    plt.close("all")
