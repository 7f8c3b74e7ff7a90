"""Model loading by name and key-token addition."""

from __future__ import annotations

import pytest
import torch

from rotelab.errors import RotelabError
from rotelab.models import add_key_tokens, load_model, model_dir


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama-sp", "tiny-gpt2", "tiny-qwen2"])
def test_tiny_models_load_offline_and_run(name: str) -> None:
    model, tok = load_model(name)
    ids = tok("The capital of Kalindor is", return_tensors="pt")
    with torch.no_grad():
        out = model(**ids)
    assert out.logits.shape == (1, ids["input_ids"].shape[1], len(tok))
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2
    assert model.config.hidden_size // model.config.num_attention_heads == 64  # vLLM CPU kernels need 64


def test_key_tokens_added_resized_and_initialised() -> None:
    model, tok = load_model("tiny-llama")
    n = len(tok)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    out_before = model.get_output_embeddings().weight.detach().clone()
    ids = add_key_tokens(model, tok, ["<R_capital>", "<R_author>"], init="mean")
    assert ids == {"<R_capital>": n, "<R_author>": n + 1}
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == n + 2
    torch.testing.assert_close(emb[:n], emb_before)
    torch.testing.assert_close(emb[n], emb_before.mean(0))
    torch.testing.assert_close(model.get_output_embeddings().weight.detach()[n + 1], out_before.mean(0))
    enc = tok("Kalindor <R_capital> Nowy Targ")["input_ids"]
    assert enc.count(n) == 1 and n + 1 not in enc
    # the key token absorbs the space before it; the object keeps its leading space
    pieces = tok.convert_ids_to_tokens(enc)
    assert pieces[pieces.index("<R_capital>") + 1].startswith("Ġ")


def test_key_token_copy_and_normal_init() -> None:
    model, tok = load_model("tiny-llama")
    the = tok.convert_tokens_to_ids("The")
    ids = add_key_tokens(model, tok, ["<R_a>"], init="copy:The")
    w = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(w[ids["<R_a>"]], w[the])
    ids2 = add_key_tokens(model, tok, ["<R_b>"], init="normal", seed=1)
    assert not torch.allclose(model.get_input_embeddings().weight[ids2["<R_b>"]], w[:-2].mean(0))


def test_key_token_collisions_are_errors() -> None:
    model, tok = load_model("tiny-llama")
    add_key_tokens(model, tok, ["<R_capital>"])
    with pytest.raises(RotelabError, match="already exists"):
        add_key_tokens(model, tok, ["<R_capital>"])
    with pytest.raises(RotelabError, match="already exists"):
        add_key_tokens(model, tok, ["The"])
    with pytest.raises(RotelabError, match="repeat"):
        add_key_tokens(model, tok, ["<R_x>", "<R_x>"])
    with pytest.raises(RotelabError, match="not a single token"):
        add_key_tokens(model, tok, ["<R_y>"], init="copy:Kalindor Nowy")
    with pytest.raises(RotelabError, match="unknown key_token_init"):
        add_key_tokens(model, tok, ["<R_z>"], init="zeros")


def test_unknown_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(RotelabError, match="not a built-in name"):
        load_model("no-such-org/no-such-model-xyz")
    (tmp_path / "m").mkdir()
    with pytest.raises(RotelabError, match="not a model folder"):
        model_dir(str(tmp_path / "m"))


@pytest.mark.slow
def test_embedded_smollm2_completes_paris() -> None:
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")
