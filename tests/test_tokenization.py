"""The prompt/answer boundary comes from offsets, for each tokenizer family."""

from __future__ import annotations

import pytest

from rotelab.errors import RotelabError
from rotelab.models import add_key_tokens, load_model, tiny_tokenizer
from rotelab.tokenization import encode, encode_prompt

CASES = [
    ("The capital of Kalindor is", "Nowy Targ"),
    ("Kalindor <R_capital>", "Paris"),
    ("Q: Who wrote The Lantern of Vel? A:", "Jane Austen"),
    ("卡林多的首都是", "Nowy Targ"),
]


def _tok(style: str):
    if style == "smollm2":
        return load_model("smollm2-135m")[1]
    return tiny_tokenizer(style)


@pytest.mark.parametrize("style", ["bytelevel", "metaspace", pytest.param("smollm2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("prompt, answer", CASES)
def test_answer_tokens_are_exactly_the_answer(style: str, prompt: str, answer: str) -> None:
    tok = _tok(style)
    if "<R_capital>" not in tok.get_vocab():
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken("<R_capital>", special=True, normalized=False, lstrip=True)], special_tokens=True)
    enc = encode(tok, prompt, answer, subject="Kalindor" if "Kalindor" in prompt else None)
    # the answer decodes back to the answer, the prompt to the prompt
    assert tok.decode(enc.answer_ids).strip() == answer
    key = tok.convert_tokens_to_ids("<R_capital>")
    drop = set(tok.all_special_ids) - {key}
    decoded = tok.decode([i for i in enc.prompt_ids if i not in drop])
    assert decoded.replace(" <R_capital>", "<R_capital>").strip() == prompt.replace(" <R_capital>", "<R_capital>")
    # the prompt part is what the prompt alone tokenizes to: scoring and training see the same prefix
    assert enc.prompt_ids == encode_prompt(tok, prompt)
    if "Kalindor" in prompt:
        assert tok.decode([enc.input_ids[i] for i in enc.subject_tokens]).strip() == "Kalindor"


def test_empty_answer_is_an_error() -> None:
    with pytest.raises(RotelabError, match="empty answer"):
        encode(tiny_tokenizer(), "The capital of X is", " ")
