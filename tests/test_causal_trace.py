"""Causal tracing (analyses/causal_trace.py) against independent references: zero noise restores
everything (effect 1), restoring every position at layer 0 is the clean forward exactly, and one
cell equals a hand-written computation with plain torch hooks (no nnsight, no project code but the
tokenization), on untied Llama, tied GPT-2 and tied Qwen2 tiny models; the stage step writes the
table once and computes nothing the second time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fixtures_runs import make_tiny_run
from rotelab.analyses.causal_trace import (
    CAUSAL_TRACE_COLUMNS,
    TraceItem,
    causal_trace_run,
    effect,
    item_noise,
    item_positions,
    subject_noise_std,
    trace_item,
    trace_items,
)
from rotelab.errors import RotelabError
from rotelab.models import load_model
from rotelab.probe.sites import ModelSites
from rotelab.tokenization import encode

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ["tiny-llama", "tiny-gpt2", "tiny-qwen2"]


@pytest.fixture(scope="module", params=MODELS)
def traced(request, tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp(request.param), n_checkpoints=2, model=request.param)
    model, tok = load_model(str(run.checkpoint_dir("p1-e01")), "float32")
    return run, model, tok


def _item(run, tok, kind="key", item=0) -> tuple[TraceItem, dict]:
    row = run.items(kind).set_index("item", drop=False).loc[item]
    subj = {f.id: f for f in run.facts}[row["fact_id"]].subject
    enc = encode(tok, row["text"], row["object"], subj)
    key = tok.convert_tokens_to_ids(run.key_tokens()[row["relation"]])
    return TraceItem(enc, tuple(enc.subject_tokens), item_positions(enc, key, ["subject_last", "key", "last", "all"], "t")), row


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def hook_object_prob(model, enc, subject, noise, layer=None, tokens=()):
    """Object probability of one forward with plain hooks: ``noise`` [n_subject, hidden] added to the
    input of block 0 at ``subject`` (None: clean), then the clean state of ``resid[layer]`` restored
    at ``tokens`` (from a separate clean forward captured by the same hooks)."""
    blocks = _blocks(model)
    ids = torch.tensor([enc.input_ids])
    clean: dict[int, torch.Tensor] = {}

    def grab_in(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        clean[0] = h[0].detach().clone()

    def grab_out(v):
        def f(mod, args, out):
            clean[v] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
        return f

    hs = [blocks[0].register_forward_pre_hook(grab_in, with_kwargs=True)]
    hs += [blocks[v - 1].register_forward_hook(grab_out(v)) for v in range(1, len(blocks) + 1)]
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()

    def corrupt(mod, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).clone()
        if noise is not None:
            h[0, list(subject)] += noise
        if layer == 0:
            h[0, list(tokens)] = clean[0][list(tokens)]
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def restore(mod, args, out):
        t = out[0] if isinstance(out, tuple) else out
        t = t.clone()
        t[0, list(tokens)] = clean[layer][list(tokens)]
        return (t, *out[1:]) if isinstance(out, tuple) else t

    hs = [blocks[0].register_forward_pre_hook(corrupt, with_kwargs=True)]
    if layer is not None and layer > 0:
        hs.append(blocks[layer - 1].register_forward_hook(restore))
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
    for h in hs:
        h.remove()
    a = enc.answer_start
    return math.exp(sum(float(lp[a - 1 + j, t]) for j, t in enumerate(enc.input_ids[a:])))


def test_effect_rule():
    np.testing.assert_allclose(effect(0.8, 0.2, np.array([0.2, 0.5, 0.8])), [0.0, 0.5, 1.0])
    assert effect(0.5, 0.5, 0.5) == 1.0  # nothing lost, nothing missing
    assert np.isnan(effect(0.5, 0.5, 0.4))


def test_zero_noise_restores_everything(traced):
    run, model, tok = traced
    item, _ = _item(run, tok)
    sites = ModelSites(model)
    layers = list(range(sites.n_layers + 1))
    zero = torch.zeros((1, len(item.subject), sites.hidden))
    res = trace_item(sites, item, layers, zero, rows_per_forward=7)  # several forwards per item
    assert res.corrupted == res.clean
    np.testing.assert_array_equal(res.restored, res.clean)
    assert (effect(res.clean, res.corrupted, res.restored) == 1.0).all()


def test_restoring_all_positions_at_layer_0_is_the_clean_run(traced):
    run, model, tok = traced
    item, row = _item(run, tok)
    sites = ModelSites(model)
    z = item_noise(0, row["fact_id"], int(row["template_id"]), len(item.subject), sites.hidden, 1)
    nu = 3.0 * subject_noise_std(model, [item])
    res = trace_item(sites, item, [0, 1], nu * z)
    labels = list(item.positions)
    assert abs(res.corrupted - res.clean) > 1e-6 * res.clean  # the noise really corrupts
    assert res.restored[0, labels.index("all")] == res.clean  # exactly


@pytest.mark.parametrize("position", ["subject_last", "last"])
def test_one_cell_equals_hand_written_hooks(traced, position):
    run, model, tok = traced
    item, row = _item(run, tok)
    sites = ModelSites(model)
    z = item_noise(0, row["fact_id"], int(row["template_id"]), len(item.subject), sites.hidden, 1)
    noise = 3.0 * subject_noise_std(model, [item]) * z
    layers = [0, 1, sites.n_layers]
    res = trace_item(sites, item, layers, noise)
    labels = list(item.positions)
    toks = item.positions[position]
    assert res.clean == pytest.approx(hook_object_prob(model, item.enc, item.subject, None), rel=1e-5)
    assert res.corrupted == pytest.approx(hook_object_prob(model, item.enc, item.subject, noise[0]), rel=1e-5)
    for li, v in enumerate(layers):
        ref = hook_object_prob(model, item.enc, item.subject, noise[0], v, toks)
        assert res.restored[li, labels.index(position)] == pytest.approx(ref, rel=1e-5), f"layer {v}"


def test_key_position_only_where_the_key_token_is(traced):
    run, model, tok = traced
    key_item, _ = _item(run, tok, "key")
    test_item, _ = _item(run, tok, "test")
    assert key_item.positions["key"] == key_item.positions["last"]  # key prompts end with the key token
    assert "key" not in test_item.positions


def test_stage_step_writes_once_and_resumes(tmp_path, monkeypatch):
    run = make_tiny_run(tmp_path, n_checkpoints=2, model="tiny-llama",
                        config={"analyses": {"causal_trace": {"facts_per_relation": 1, "layers": [0, 2]}}})
    from rotelab.analyses import causal_trace as ct

    t = causal_trace_run(run, progress=False, note=lambda m: None)
    assert list(t.columns) == list(CAUSAL_TRACE_COLUMNS)
    ckpts = sorted(set(t["checkpoint"]))
    assert ckpts == sorted({"base", "p1-e01"})  # the stage checkpoints of this run (base, last phase 1)
    assert set(t["kind"]) == {"key", "test"}
    n_items = t.groupby(["checkpoint", "kind"])["item"].nunique()
    n_rel_split = run.items("test").groupby(["relation", "split"]).ngroups
    assert (n_items == n_rel_split).all()  # one fact per relation and split
    per_item = t.groupby(["checkpoint", "kind", "item"]).size()
    assert set(per_item.loc[(slice(None), "key", slice(None))]) == {2 * 3}  # 2 layers x (subject_last, key, last)
    assert set(per_item.loc[(slice(None), "test", slice(None))]) == {2 * 2}  # no key token in test prompts
    assert np.isfinite(t["clean"]).all() and ((t["clean"] > 0) & (t["clean"] <= 1)).all()
    from rotelab.analyses.figures_where import plot_causal_trace

    fig = plot_causal_trace(run, split="all", out_dir=tmp_path / "fig")
    csv = __import__("pandas").read_csv(tmp_path / "fig" / "causal_trace.csv")
    ref = t.groupby(["checkpoint", "kind", "layer", "position"])["effect"].mean()
    got = csv.set_index(["checkpoint", "kind", "layer", "position"])["effect"]
    np.testing.assert_allclose(got.sort_index().to_numpy(), ref.sort_index().to_numpy(), rtol=1e-9, equal_nan=True)
    assert (tmp_path / "fig" / "causal_trace.png").exists() and fig is not None
    calls = []
    monkeypatch.setattr(ct, "trace_items", lambda *a, **k: calls.append(1))
    again = causal_trace_run(run, progress=False, note=lambda m: None)
    assert not calls and len(again) == len(t)


def test_icl_kind_refused(tmp_path):
    run = make_tiny_run(tmp_path, n_checkpoints=1, model="tiny-llama")
    model, tok = load_model(str(run.checkpoint_dir("base")), "float32")
    with pytest.raises(RotelabError, match="occurs 2 times"):
        trace_items(run, "base", "icl", [0], model=model, tokenizer=tok, layers=[0])
