"""Activation patching sanity checks on a tiny model: an identity patch changes nothing, patching
the final layer's last position reproduces the source's next-token logits (checked against a plain
forward pass), and cross-checkpoint patching agrees with an independent implementation written
here with plain PyTorch forward hooks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rotelab.analyses.patching import (
    PATCHING_COLUMNS,
    ModelCache,
    hidden_states_at,
    match_source_items,
    patch,
    patched_forward,
)
from rotelab.errors import RotelabError
from rotelab.models import load_model
from rotelab.store import Store
from rotelab.tokenization import encode


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fixtures_runs import make_tiny_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add overhead on a busy machine
    run = make_tiny_run(tmp_path_factory.mktemp("patch"), n_checkpoints=2, noise=0.2)
    yield run
    torch.set_num_threads(threads)


def _items(run, kind, n=4):
    return [int(i) for i in run.items(kind)["item"][:n]]


def test_identity_patch_changes_nothing(tiny_run):
    df = patch(tiny_run, ("base", "test"), ("base", "test"), items=_items(tiny_run, "test"), store=False, progress=False)
    assert list(df.columns) == list(PATCHING_COLUMNS)
    assert sorted(set(df["layer"])) == [0, 1, 2]
    assert np.allclose(df["patched"], df["corrupted"], atol=1e-5)
    assert np.allclose(df["clean"], df["corrupted"], atol=1e-5)
    assert np.allclose(df["effect"], 0, atol=1e-5)


def test_final_layer_last_position_reproduces_source_logits(tiny_run):
    model, tok = load_model(str(tiny_run.checkpoint_dir("p1-e01")))
    s_row = tiny_run.items("key").iloc[0]
    t_row = tiny_run.items("test").iloc[0]
    assert s_row["fact_id"] == t_row["fact_id"]
    se = encode(tok, s_row["text"], s_row["object"])
    te = encode(tok, t_row["text"], t_row["object"])
    with torch.no_grad():
        src_logits = model(input_ids=torch.tensor([se.input_ids])).logits[0, se.answer_start - 1]
        tgt_plain = model(input_ids=torch.tensor([te.input_ids])).logits[0]
    ids, mask = torch.tensor([se.input_ids]), torch.ones(1, len(se.input_ids), dtype=torch.long)
    states, logits = hidden_states_at(model, ids, mask, [0, 2], torch.tensor([[se.answer_start - 1]]))
    assert torch.allclose(logits[0, se.answer_start - 1], src_logits, atol=1e-5)
    t_ids, t_mask = torch.tensor([te.input_ids]), torch.ones(1, len(te.input_ids), dtype=torch.long)
    out = patched_forward(model, t_ids, t_mask, 2, torch.tensor([te.answer_start - 1]), states[2][:, 0])
    assert torch.allclose(out[0, te.answer_start - 1], src_logits, atol=1e-4)
    # positions before the patch are untouched
    assert torch.allclose(out[0, : te.answer_start - 1], tgt_plain[: te.answer_start - 1], atol=1e-5)
    # through the API: the first object token's log-probability equals the source's (same answer tokens)
    assert se.answer_ids == te.answer_ids
    df = patch(tiny_run, ("p1-e01", "key"), ("p1-e01", "test"), layers=[2], metric="first_token_logprob",
               items=[int(t_row["item"])], store=False, progress=False)
    assert df["patched"].iloc[0] == pytest.approx(df["clean"].iloc[0], abs=1e-4)
    assert df["patched"].iloc[0] == pytest.approx(float(torch.log_softmax(src_logits, -1)[te.answer_ids[0]]), abs=1e-4)


def _hook_reference(run, s_ckpt, s_kind, t_ckpt, t_kind, item, layer, position=-1):
    """Object log-probability of a target item with the source state patched in, by forward hooks."""
    s_model, tok = load_model(str(run.checkpoint_dir(s_ckpt)))
    t_model, _ = load_model(str(run.checkpoint_dir(t_ckpt)))
    t_row = run.items(t_kind).set_index("item").loc[item]
    src = run.items(s_kind)
    s_row = src[src["fact_id"] == t_row["fact_id"]].iloc[0]
    se = encode(tok, s_row["text"], s_row["object"])
    te = encode(tok, t_row["text"], t_row["object"])
    sp, tp = se.answer_start + position, te.answer_start + position
    with torch.no_grad():
        hs = s_model(input_ids=torch.tensor([se.input_ids]), output_hidden_states=True).hidden_states
    state = hs[layer][0, sp].clone()
    blocks = t_model.model.layers
    if layer == 0:
        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            h = h.clone()
            h[0, tp] = state
            if args:
                return (h, *args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs
        handle = blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[0, tp] = state
            return (h, *out[1:]) if isinstance(out, tuple) else h
        handle = blocks[layer - 1].register_forward_hook(post)
    try:
        with torch.no_grad():
            logits = t_model(input_ids=torch.tensor([te.input_ids])).logits[0]
    finally:
        handle.remove()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[t - 1, te.input_ids[t]] for t in range(te.answer_start, len(te.input_ids))))


@pytest.mark.parametrize("layer", [0, 1])
def test_cross_checkpoint_patch_matches_hook_reference(tiny_run, layer):
    items = _items(tiny_run, "test", 3)
    df = patch(tiny_run, ("p1-e01", "key"), ("base", "test"), layers=[layer], items=items, store=False, progress=False)
    assert len(df) == 3
    for _, row in df.iterrows():
        want = _hook_reference(tiny_run, "p1-e01", "key", "base", "test", int(row["item"]), layer)
        assert row["patched"] == pytest.approx(want, abs=1e-4)
    assert np.allclose(df["effect"], df["patched"] - df["corrupted"])
    assert not np.allclose(df["patched"], df["corrupted"], atol=1e-3)  # the patch does something


def test_position_sweep_and_store_merge(tiny_run):
    items = _items(tiny_run, "test", 2)
    cache = ModelCache(tiny_run)
    df = patch(tiny_run, ("base", "key"), ("p1-e01", "test"), layers=[1], position=["last", -1, 0], items=items,
               models=cache, progress=False)
    last = df[df["position"] == "last"].set_index("item")["patched"]
    minus1 = df[df["position"] == "-1"].set_index("item")["patched"]
    assert np.allclose(last, minus1)
    # position 0 is the BOS token: within one checkpoint its state is the same in every prompt (causal
    # attention sees only itself), so patching it from the key prompt into the test prompt is a no-op
    same = patch(tiny_run, ("p1-e01", "key"), ("p1-e01", "test"), layers=[1, 2], position=0, items=items,
                 models=cache, store=False, progress=False)
    assert np.allclose(same["effect"], 0, atol=1e-5)
    st = Store.open(tiny_run.store_path, mode="r")
    t = st.read_table("patching")
    assert len(t) == 6
    patch(tiny_run, ("base", "key"), ("p1-e01", "test"), layers=[1], items=items, models=cache, progress=False)
    t2 = Store.open(tiny_run.store_path, mode="r").read_table("patching")
    assert len(t2) == 6  # same keys replaced, not duplicated


def test_patch_bad_input(tiny_run):
    items = _items(tiny_run, "test", 1)
    with pytest.raises(RotelabError, match="layer 3 out of range"):
        patch(tiny_run, ("base", "key"), ("base", "test"), layers=[3], items=items, store=False, progress=False)
    with pytest.raises(RotelabError, match="outside the"):
        patch(tiny_run, ("base", "key"), ("base", "test"), layers=[1], position=50, items=items, store=False, progress=False)
    with pytest.raises(RotelabError, match="no item 9999"):
        patch(tiny_run, ("base", "key"), ("base", "test"), items=[9999], store=False, progress=False)
    with pytest.raises(RotelabError, match="unknown patching metric"):
        patch(tiny_run, ("base", "key"), ("base", "test"), metric="nope", store=False, progress=False)
    with pytest.raises(RotelabError, match="no checkpoint"):
        patch(tiny_run, ("nope", "key"), ("base", "test"), items=items, store=False, progress=False)


def test_match_source_items():
    src = pd.DataFrame({"item": [10, 11, 12], "fact_id": ["a", "a", "b"], "template_id": [0, 1, 0]})
    tgt = pd.DataFrame({"item": [0, 1, 2], "fact_id": ["a", "a", "b"], "template_id": [1, 5, 3]})
    assert match_source_items(src, tgt).tolist() == [11, 10, 12]
    with pytest.raises(RotelabError, match="no item in the source"):
        match_source_items(src, pd.DataFrame({"item": [0], "fact_id": ["z"], "template_id": [0]}))


def test_configured_sweep_and_heatmap(tiny_run, tmp_path):
    from rotelab.analyses.analyze import patching_run
    from rotelab.analyses.figures import plot_patching_heatmap

    cfg = tiny_run.config.analyses.patching
    cfg.enabled, cfg.items_per_relation, cfg.layers = True, 1, [0, 2]
    st = Store.open(tiny_run.store_path, fingerprint=tiny_run.fingerprint())
    notes: list[str] = []
    assert patching_run(tiny_run, st, progress=False, note=notes.append) == 2  # base and p1-e01
    t = st.read_table("patching")
    within = t[(t["source_kind"] == "key") & (t["target_kind"] == "test") & (t["source_checkpoint"] == t["target_checkpoint"])]
    assert set(within["target_checkpoint"]) == {"base", "p1-e01"} and set(within["layer"]) == {0, 2}
    assert within["split"].isin(["validation", "test"]).all() and within["relation"].nunique() == 2  # held-out items
    assert patching_run(tiny_run, st, progress=False) == 0  # resumable
    fig = plot_patching_heatmap(tiny_run, out_dir=tmp_path)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "checkpoint" and ax.get_ylabel() == "layer"
    assert ax.get_images()[0].get_array().shape == (2, 2)
    csv = pd.read_csv(tmp_path / "patching_key_to_test.csv")
    want = within.groupby(["target_checkpoint", "layer"])["effect"].mean()
    assert np.allclose(csv.set_index(["target_checkpoint", "layer"])["effect"].sort_index(), want.sort_index())


def test_sample_items_spread_over_facts_seeded() -> None:
    """One item per fact before any fact gets a second; seeded; only the requested split."""
    import pandas as pd

    from rotelab.analyses.patching import sample_items

    rows = [(f"{r}-{f}", r, t, "heldout" if f >= 2 else "train") for r in ("a", "b") for f in range(6) for t in range(4)]
    items = pd.DataFrame(rows, columns=["fact_id", "relation", "template_id", "split"])
    items.insert(0, "item", range(len(items)))
    got = sample_items(items, 3, seed=1)
    picked = items.set_index("item").loc[got]
    assert len(got) == 6 and (picked["split"] == "heldout").all()
    assert picked.groupby("relation")["fact_id"].nunique().tolist() == [3, 3]  # three different facts each
    assert got == sample_items(items, 3, seed=1)
    assert any(sample_items(items, 3, seed=s) != got for s in range(2, 8))
    many = items.set_index("item").loc[sample_items(items, 6)]  # 4 held-out facts per relation: 2 rounds
    assert many.groupby("relation")["fact_id"].value_counts().max() == 2 and many.groupby("relation").size().tolist() == [6, 6]
