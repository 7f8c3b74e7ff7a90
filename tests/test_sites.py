"""The model-sites layer: ``resid[v]`` read by capture and written back by patching gives the
identical forward (checked against a plain forward pass), on every tiny architecture; site names;
the one collator (sort, batch, restore order; left and right padding against rows run alone)."""

from __future__ import annotations

import pytest
import torch

from rotelab.analyses.interventions import patched_forward
from rotelab.batching import Collator, pad
from rotelab.errors import RotelabError
from rotelab.models import load_model
from rotelab.probe import capture_hidden
from rotelab.probe.sites import ModelSites, Site, parse_site, resid
from rotelab.tokenization import encode_prompt

TEXTS = ["Kalindor <R_capital>", "The capital of Merivale is", "Who wrote the book"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_resid_read_by_capture_and_written_by_patching_gives_the_identical_forward(name: str) -> None:
    model, tok = load_model(name)
    sites = ModelSites(model)
    hidden, _ = capture_hidden(sites, tok, TEXTS, batch_size=1)  # [layer, item, hidden]
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([encode_prompt(tok, text)])
        mask = torch.ones_like(ids)
        last = torch.tensor([ids.shape[1] - 1])
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask).logits
        for v in range(sites.n_layers + 1):
            state = torch.from_numpy(hidden[v, i : i + 1])
            out = patched_forward(sites, ids, mask, v, last, state)
            assert torch.equal(out, plain), f"{name}: writing back resid[{v}] changed the forward"
        # the check can fail: writing another layer's state changes the logits
        wrong = patched_forward(sites, ids, mask, 1, last, torch.from_numpy(hidden[sites.n_layers, i : i + 1]))
        assert not torch.allclose(wrong, plain, atol=1e-4)


def test_site_names_and_model_parts() -> None:
    model, _ = load_model("tiny-gpt2")
    sites = ModelSites(model)
    assert (sites.n_layers, sites.hidden) == (2, 128)
    assert sites.blocks is model.transformer.h and sites.norm is model.transformer.ln_f
    assert [str(s) for s in sites.sites()] == ["resid[0]", "resid[1]", "resid[2]", "final_norm"]
    assert parse_site("resid[2]") == resid(2) and parse_site("final_norm") == Site("final_norm")
    with pytest.raises(RotelabError, match="not available yet"):
        parse_site("attn[1]")
    with pytest.raises(RotelabError, match="unknown activation site"):
        parse_site("resid")
    with pytest.raises(RotelabError, match="out of range"):
        sites.check("resid[3]")


def test_collator_sorts_batches_and_restores_order() -> None:
    lengths = [3, 1, 4, 1, 5, 9, 2, 6]
    c: Collator[int] = Collator(len(lengths), 3, key=lambda i: (-lengths[i], i))
    batches = list(c.batches())
    assert len(c) == len(batches) == 3
    assert [lengths[i] for b in batches for i in b] == sorted(lengths, reverse=True)
    assert c.restore([[lengths[i] * 10 for i in b] for b in batches]) == [x * 10 for x in lengths]
    assert list(Collator(5, 2).batches()) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_rows_run_alone(side: str) -> None:
    model, tok = load_model("tiny-llama")
    seqs = [encode_prompt(tok, t) for t in TEXTS]
    p = pad(seqs, 0, side)
    assert p.lengths.tolist() == [len(s) for s in seqs]
    with torch.no_grad():
        batched = model(input_ids=p.input_ids, attention_mask=p.attention_mask, position_ids=p.position_ids).logits
        for b, s in enumerate(seqs):
            alone = model(input_ids=torch.tensor([s])).logits[0]
            real = p.attention_mask[b].bool()
            assert torch.allclose(batched[b][real], alone, atol=1e-5)
