"""Tests of "where the fact lives" (issue 16): logit lens, linear probes, CKA drift and
generalization onset — each against an independent reference written here (plain loops, a plain
transformers forward, the explicit-centering-matrix HSIC formula), on synthetic arrays and on tiny
captured runs with real checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from rotelab.errors import RotelabError
from rotelab.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- logit lens: pure function

def _rms_norm_np(h: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return g * h / np.sqrt(np.mean(h * h) + eps)


def test_logit_lens_matches_loops():
    from rotelab.analyses.logit_lens import logit_lens

    rng = np.random.default_rng(0)
    L, N, H, V = 3, 5, 8, 40
    X = rng.normal(size=(L, N, H)).astype(np.float32)
    X[1, 2] = np.nan  # a missing row
    g = rng.uniform(0.5, 1.5, size=H).astype(np.float32)
    W = rng.normal(size=(V, H)).astype(np.float32)
    W[7] = W[3]  # an exact tie: both tokens get the same logit
    t = rng.integers(0, V, size=N)
    t[0] = 3
    eps = 1e-6

    def norm(h):
        return torch.as_tensor(g) * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)

    lin = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(W))
    # the blockwise path of a Linear head (blocks smaller than the vocab) and the generic path of any callable
    for head in (lin, lambda h: h @ torch.as_tensor(W).T):
        lp, rk = logit_lens(X, t, norm, head, chunk=4)
        assert lp.shape == (L, N) and lp.dtype == np.float32 and rk.dtype == np.int32
        for li in range(L):
            for i in range(N):
                if li == 1 and i == 2:
                    assert math.isnan(lp[li, i]) and rk[li, i] == -1
                    continue
                z = [float(np.dot(W[j].astype(np.float64), _rms_norm_np(X[li, i].astype(np.float64), g, eps))) for j in range(V)]
                m = max(z)
                lse = m + math.log(sum(math.exp(x - m) for x in z))
                assert lp[li, i] == pytest.approx(z[t[i]] - lse, abs=1e-4)
                # strictly larger logits; a tie within float32 rounding (token 7 vs 3) may count either way
                lo, hi = sum(1 for x in z if x > z[t[i]] + 1e-4), sum(1 for x in z if x > z[t[i]] - 1e-4)
                assert lo <= rk[li, i] <= hi
                if hi == lo:
                    assert rk[li, i] == lo
    with pytest.raises(RotelabError, match="targets"):
        logit_lens(X, t[:3], norm, lin)


def test_linear_head_scores_blockwise_with_bias():
    from rotelab.analyses.logit_lens import linear_head_scores

    rng = np.random.default_rng(1)
    n, H, V = 6, 5, 23
    h, W, b = rng.normal(size=(n, H)), rng.normal(size=(V, H)), rng.normal(size=V)
    t = np.array([0, 6, 7, 13, 22, 22])  # targets at block edges (block = 7)
    lp, rk = linear_head_scores(*(torch.as_tensor(a, dtype=torch.float32) for a in (h, W, b)), torch.as_tensor(t), block=7)
    z = h @ W.T + b  # float64 reference
    for i in range(n):
        zt = z[i, t[i]]
        assert float(lp[i]) == pytest.approx(zt - math.log(np.exp(z[i] - z[i].max()).sum()) - z[i].max(), abs=1e-5)
        assert int(rk[i]) == int((z[i] > zt).sum())


# --------------------------------------------------------------------------- logit lens: tiny runs

@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def lens_run(request, tmp_path_factory):
    from fixtures_runs import make_tiny_run
    from rotelab.probe import capture_run

    run = make_tiny_run(tmp_path_factory.mktemp(f"lens-{request.param}"), n_checkpoints=2, model=request.param)
    capture_run(run, kinds=["key", "test"], progress=False)
    return run


def test_logit_lens_last_block_equals_plain_forward(lens_run):
    """Done when: at the last block the lens equals a plain transformers forward's log-softmax of
    the object's first token at the last prompt position, within the float16 tolerance of the
    stored state (:func:`float16_tolerance`, derived in the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rotelab.analyses.logit_lens import final_norm_and_head, float16_tolerance, logit_lens_run
    from rotelab.tokenization import encode

    run = lens_run
    st = Store.open(run.store_path, fingerprint=run.fingerprint())
    written = logit_lens_run(run, st, ["key", "test"], progress=False)
    n_layers = len(st.kind("key").layers)
    assert written == {"key": 2 * n_layers, "test": 2 * n_layers}
    assert logit_lens_run(run, st, ["key", "test"], progress=False) == {"key": 0, "test": 0}  # resumable
    worst = []
    for c in ("base", "p1-e01"):
        path = run.checkpoint_dir(c)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(path)
        norm, head = final_norm_and_head(model)
        is_gpt2 = model.config.model_type == "gpt2"
        assert norm is (model.transformer.ln_f if is_gpt2 else model.model.norm)
        for kind in ("key", "test"):
            g = st.kind(kind)
            last = g.layers[-1]
            lp = g.read_derived("logit_lens_logprob", checkpoints=[c], layers=[last])[0, 0]
            rk = g.read_derived("logit_lens_rank", checkpoints=[c], layers=[last])[0, 0]
            tol = float16_tolerance(g.read_slab(c, last), norm, head.weight.detach().numpy(), centered=is_gpt2)
            for i, (text, obj) in enumerate(zip(g.items["text"], g.items["object"])):
                t = encode(tok, text, obj).answer_ids[0]
                ids = torch.tensor([tok(text)["input_ids"]])
                with torch.no_grad():
                    z = model(input_ids=ids).logits[0, -1].double()
                want = float(torch.log_softmax(z, -1)[t])
                assert abs(lp[i] - want) <= tol[i], (c, kind, i, lp[i], want, tol[i])
                lo = int((z > z[t] + tol[i]).sum())
                hi = int((z > z[t] - tol[i]).sum())
                assert lo <= rk[i] <= hi
                worst.append((abs(lp[i] - want), tol[i]))
    err, tol = np.array(worst).T
    assert tol.max() < 0.1  # the tolerance is tight enough to mean something
    assert err.max() < tol.max()


# --------------------------------------------------------------------------- CKA

def brute_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Kornblith et al. 2019 eq. 4 with explicit centering matrices."""
    n = len(X)
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(A, B):
        return np.trace(A @ H @ B @ H) / (n - 1) ** 2

    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


@pytest.mark.parametrize("n,p,q", [(12, 30, 20), (40, 5, 7)])  # Gram branch and covariance branch
def test_linear_cka_properties_and_brute_force(n, p, q):
    from rotelab.analyses.cka import linear_cka

    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, p)) + rng.normal(size=p)
    Y = X[:, : min(p, q)] @ rng.normal(size=(min(p, q), q)) + 0.5 * rng.normal(size=(n, q))
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, Y) == pytest.approx(brute_cka(X, Y), abs=1e-10)
    Q, _ = np.linalg.qr(rng.normal(size=(q, q)))
    assert linear_cka(X, Y @ Q) == pytest.approx(linear_cka(X, Y), abs=1e-10)
    assert linear_cka(3.7 * X, Y) == pytest.approx(linear_cka(X, Y), abs=1e-10)
    assert 0 < linear_cka(X, rng.normal(size=(n, q))) < 1
    with pytest.raises(RotelabError, match="same items"):
        linear_cka(X, Y[:-1])
    with pytest.raises(RotelabError, match="constant"):
        linear_cka(np.ones((n, p)), Y)


# --------------------------------------------------------------------------- probes

def _relation_data(n_facts=60, templates=3, hidden=20, sep=4.0, seed=0, n_rel=3):
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_rel, hidden))
    rels, facts, X = [], [], []
    for f in range(n_facts):
        r = f % n_rel
        for _ in range(templates):
            rels.append(f"r{r}")
            facts.append(f"f{f}")
            X.append(sep * dirs[r] + rng.normal(size=hidden))
    return np.array(X), np.array(rels), np.array(facts)


def test_probe_separable_and_shuffled():
    from rotelab.analyses.probes import probe_accuracy

    X, y, g = _relation_data(sep=20.0)
    assert probe_accuracy(X, y, g) == 1.0
    rng = np.random.default_rng(1)
    accs = [probe_accuracy(X, rng.permutation(y), g) for _ in range(4)]
    assert abs(np.mean(accs) - 1 / 3) < 0.1


def test_probe_folds_are_grouped_by_fact(monkeypatch):
    """Labels that belong to facts (random per fact, shared by its templates) are learnable only by
    recognising the fact: ungrouped folds would score high, grouped folds are at chance."""
    from sklearn.model_selection import GroupKFold

    from rotelab.analyses import probes as P

    rng = np.random.default_rng(0)
    n_facts, templates, hidden = 60, 4, 64  # 60 fact centres in 64 dims: any labelling is linearly separable
    centers = rng.normal(size=(n_facts, hidden)) * 5
    g = np.repeat([f"f{i}" for i in range(n_facts)], templates)
    y = np.repeat(rng.choice(["a", "b", "c"], size=n_facts), templates)
    X = np.repeat(centers, templates, axis=0) + 0.1 * rng.normal(size=(n_facts * templates, hidden))
    for tr, te in P.fact_folds(g, 5):
        assert not set(g[tr]) & set(g[te])
        assert len(tr) + len(te) == len(g)
    assert abs(P.probe_accuracy(X, y, g) - 1 / 3) < 0.15
    # the same data with one fact per item (no grouping) is memorized: the grouping is what matters
    assert P.probe_accuracy(X, y, np.arange(len(g))) > 0.9

    class Leaky(GroupKFold):
        def split(self, X, y=None, groups=None):
            for tr, te in super().split(X, y, groups):
                yield np.concatenate([tr, te[:1]]), te

    monkeypatch.setattr("sklearn.model_selection.GroupKFold", Leaky)
    with pytest.raises(RotelabError, match="both the training and the test fold"):
        P.fact_folds(g, 5)


def test_probe_transfer():
    from rotelab.analyses.probes import transfer_accuracy

    Xk, y, g = _relation_data(templates=1, sep=20.0, seed=2)
    Xt, yt, gt = _relation_data(templates=3, sep=20.0, seed=2)  # the same relation directions
    assert transfer_accuracy(Xk, y, g, Xt, yt, gt) == 1.0
    Xo, _, _ = _relation_data(templates=3, sep=20.0, seed=9)  # other directions: no shared code
    rng = np.random.default_rng(3)
    acc = transfer_accuracy(Xk, y, g, Xo, rng.permutation(yt), gt)
    assert acc < 0.6


# --------------------------------------------------------------------------- onset

def test_onset_index_and_fact_accuracy():
    from rotelab.analyses.onset import fact_accuracy, onset_index

    nan = np.nan
    assert onset_index([0, 0, 1, 1]) == 2
    assert onset_index([1, 1, 1]) == 0
    assert onset_index([1, 0, 1, 1]) == 2            # fell back once: onset after the fall
    assert onset_index([0, 1, nan, 1]) == 1          # an unevaluated checkpoint does not break it
    assert onset_index([0, 1, 1, 0]) == -1           # wrong at the end: never
    assert onset_index([0, 1, 1, nan]) == 1
    assert onset_index([nan, nan]) == -1
    a = np.array([[1, 0, 1, nan], [1, 1, nan, nan]])
    facts, acc = fact_accuracy(a, ["x", "x", "y", "y"])
    assert list(facts) == ["x", "y"]
    assert acc[0].tolist() == [0.5, 1.0] and acc[1, 0] == 1.0 and math.isnan(acc[1, 1])


# --------------------------------------------------------------------------- stage steps on a store

@pytest.fixture()
def random_store_run(tmp_path):
    from fixtures_runs import make_tiny_run

    run = make_tiny_run(tmp_path, n_checkpoints=3, config={"data": {"relations": ["capital", "author", "mother"],
                                                                    "facts_per_relation": 6, "templates_per_kind": 2}})
    st = Store.open(run.store_path, fingerprint=run.fingerprint())
    cps = [e.id for e in run.checkpoints()]
    rng = np.random.default_rng(0)
    data = {}
    for k in ("key", "test"):
        items = run.items(k)
        g = st.ensure_kind(k, checkpoints=cps, layers=[0, 1, 2], items=items, hidden=16)
        rel = items["relation"].astype("category").cat.codes.to_numpy()
        dirs = rng.normal(size=(3, 16)) * 3
        for ci, c in enumerate(cps):
            for v in (0, 1, 2):
                X = (rng.normal(size=(len(items), 16)) + ci * dirs[rel] * v).astype(np.float16)
                if not (c == "p1-e02" and v == 2):  # one slab missing
                    g.write_slab(c, v, X)
                data[k, c, v] = X.astype(np.float32)
    return run, st, data


def test_cka_and_probe_steps_against_brute_force(random_store_run):
    from rotelab.analyses.cka import cka_kind
    from rotelab.analyses.probes import probe_accuracy, probes_kind, transfer_accuracy

    run, st, data = random_store_run
    g, key = st.kind("test"), st.kind("key")
    assert cka_kind(run, g, note=lambda m: None) == 8
    prev, base = g.read_derived("cka_prev"), g.read_derived("cka_base")
    cps = g.checkpoints
    for ci, c in enumerate(cps):
        for li, v in enumerate(g.layers):
            if c == "p1-e02" and v == 2:
                assert math.isnan(prev[ci, li]) and math.isnan(base[ci, li])
                continue
            assert base[ci, li] == pytest.approx(brute_cka(data["test", c, v], data["test", "base", v]), abs=1e-5)
            if ci == 0:
                assert math.isnan(prev[ci, li])
            else:
                assert prev[ci, li] == pytest.approx(brute_cka(data["test", c, v], data["test", cps[ci - 1], v]), abs=1e-5)
    assert np.allclose(base[0], 1.0)
    assert cka_kind(run, g, note=lambda m: None) == 0  # resumable
    key.write_slab("p1-e02", 2, data["key", "p1-e02", 2])
    g.write_slab("p1-e02", 2, data["test", "p1-e02", 2])
    assert cka_kind(run, g, note=lambda m: None) == 1  # only the newly captured slab
    assert g.read_derived("cka_base", checkpoints=["p1-e02"], layers=[2])[0, 0] == pytest.approx(
        brute_cka(data["test", "p1-e02", 2], data["test", "base", 2]), abs=1e-5)

    items = g.items
    y, f = items["relation"].to_numpy(), items["fact_id"].to_numpy()
    assert probes_kind(g, key, n_splits=3, note=lambda m: None) == 9
    acc, tr = g.read_derived("probe_relation_acc"), g.read_derived("probe_transfer_acc")
    ky, kf = key.items["relation"].to_numpy(), key.items["fact_id"].to_numpy()
    for ci, c in enumerate(cps):
        for li, v in enumerate(g.layers):
            assert acc[ci, li] == pytest.approx(probe_accuracy(data["test", c, v], y, f, n_splits=3), abs=1e-6)
            assert tr[ci, li] == pytest.approx(transfer_accuracy(data["key", c, v], ky, kf, data["test", c, v], y, f,
                                                                 n_splits=3), abs=1e-6)
    assert acc[2, 2] == 1.0 and abs(acc[0, 0] - 1 / 3) < 0.25  # signal at the late slabs, none at base layer 0
    assert probes_kind(g, key, n_splits=3, note=lambda m: None) == 0


def test_previous_checkpoints_follow_training():
    from types import SimpleNamespace

    from rotelab.analyses.cka import previous_checkpoints
    from rotelab.checkpoints import CheckpointEntry

    def e(i, phase, series="main"):
        return CheckpointEntry(id=i, phase=phase, epoch=0.0, step=0, tokens_seen=0, loss=None, path=None, series=series)

    entries = [e("base", "base"), e("p1-e01", "phase1"), e("p1-e02", "phase1"), e("p2-e01", "phase2"),
               e("p2-e02", "phase2"), e("sft-e01", "sft", "sft"), e("sft-e02", "sft", "sft")]
    for start, want in (("last", "p1-e02"), ("p1-e01", "p1-e01")):
        run = SimpleNamespace(checkpoints=lambda: entries, config=SimpleNamespace(phase2=SimpleNamespace(start=start)))
        got = previous_checkpoints(run, [x.id for x in entries])
        assert got == {"base": None, "p1-e01": "base", "p1-e02": "p1-e01", "p2-e01": want, "p2-e02": "p2-e01",
                       "sft-e01": "base", "sft-e02": "sft-e01"}


def test_onset_run_table(random_store_run):
    from rotelab.analyses.onset import onset_run

    run, st, _ = random_store_run
    g = st.kind("test")
    items = g.items
    facts = items["fact_id"].to_numpy()
    f0, f1, f2 = sorted(set(facts))[:3]
    vals = {c: np.zeros(len(items)) for c in g.checkpoints}
    for c in ("p1-e01", "p1-e02"):
        vals[c][facts == f0] = 1                      # f0: correct from p1-e01 on
    vals["base"][facts == f1] = 1                       # f1: correct at base only
    m = np.flatnonzero(facts == f2)
    vals["p1-e02"][m[0]] = 1                            # f2: half of its 2 templates at the end (≥ 0.5)
    for c, v in vals.items():
        g.write_item_arrays(c, {"gen_correct": v})
    t = onset_run(run, st, note=lambda m: None).set_index(["kind", "fact_id"])
    assert t.loc[("test", f0), "onset"] == "p1-e01" and t.loc[("test", f0), "onset_index"] == 1
    assert t.loc[("test", f1), "onset"] == "" and t.loc[("test", f1), "first_correct"] == "base"
    assert t.loc[("test", f2), "onset"] == "p1-e02" and t.loc[("test", f2), "final_acc"] == 0.5
    assert len(t) == len(set(facts)) and set(t["split"]) <= {"train", "validation", "test"}
    stored = st.read_table("onset")
    assert len(stored) == len(t)


# --------------------------------------------------------------------------- stage hook and figures

@pytest.mark.parametrize("lens_run", ["tiny-llama"], indirect=True)  # one model is enough for the wiring
def test_where_run_and_figures(lens_run, tmp_path):
    """``analyze_run`` fills every issue-16 array (each step resumable), ``figures_run`` renders the
    heatmaps and the onset histogram with their CSVs, and the CSV holds what the store holds."""
    import matplotlib.pyplot as plt

    from rotelab.analyses import analyze_run
    from rotelab.analyses import figures_where as FW
    from rotelab.analyses.figures import figures_run

    run = lens_run
    st = Store.open(run.store_path, fingerprint=run.fingerprint())
    g = st.kind("test")
    rng = np.random.default_rng(0)
    for c in g.checkpoints:
        g.write_item_arrays(c, {"gen_correct": rng.integers(0, 2, size=g.n_items).astype(float)})
    s1 = analyze_run(run, progress=False, note=lambda m: None)
    assert s1["probes"]["test"] > 0 and s1["cka"]["key"] > 0 and s1["onset"] > 0
    for name in ("probe_relation_acc", "probe_transfer_acc", "cka_prev", "cka_base", "logit_lens_logprob", "logit_lens_rank"):
        assert name in g.derived_arrays()
    assert "probe_transfer_acc" not in st.kind("key").derived_arrays()
    s2 = analyze_run(run, progress=False, note=lambda m: None)
    assert sum(s2["probes"].values()) == sum(s2["cka"].values()) == sum(s2["logit_lens"].values()) == 0
    out = tmp_path / "figs"
    fig = FW.plot_logit_lens(run, ["key", "test"], value="rank", out_dir=out)
    csv = pd.read_csv(out / "logit_lens_rank.csv")
    rank = g.read_derived("logit_lens_rank")
    split = g.items["split"].to_numpy()
    want = rank[1, -1][np.isin(split, ["validation", "test"])].mean()  # heldout = validation ∪ test
    got = csv[(csv["kind"] == "test") & (csv["checkpoint"] == "p1-e01") & (csv["layer"] == g.layers[-1])]["rank"].iloc[0]
    assert got == pytest.approx(want, rel=1e-6)
    assert [a.get_title() for a in fig.axes[:2]] == ["key", "test"]
    fig = FW.plot_probe(run, "probe_relation_acc", out_dir=out)
    csv = pd.read_csv(out / "probe_relation_acc.csv")
    assert np.allclose(csv[csv["kind"] == "test"].sort_values(["checkpoint", "layer"])["probe_relation_acc"],
                       g.read_derived("probe_relation_acc").ravel(), atol=1e-6)
    fig = FW.plot_onset_histogram(run, out_dir=out)
    csv = pd.read_csv(out / "onset.csv")
    assert csv["facts"].sum() == (st.read_table("onset").query("kind == 'test' and split in ['validation', 'test']").shape[0])
    plt.close("all")
    res = figures_run(run, note=lambda m: None)
    for name in ("logit_lens_prob", "probe_relation_acc", "probe_transfer_acc", "cka_base", "cka_prev", "onset"):
        assert (run.figures_dir / f"{name}.csv").is_file(), res[name]
    with pytest.raises(RotelabError, match="value must be"):
        FW.plot_logit_lens(run, value="nope", save=False)
