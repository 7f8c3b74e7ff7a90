"""Tokenizing a prompt and its answer the one way training, evaluation and capture all share.

The sequence is ``prompt + " " + answer`` tokenized as one string (with the tokenizer's own special
tokens, e.g. a BOS). The answer's tokens are found from the tokenizer's character offsets: every
token that starts at or after the end of the prompt belongs to the answer, so the space before the
answer travels with the answer's first token (``" Paris"``), as in ordinary text. The prompt's
tokens are therefore exactly the tokens of the prompt alone in the vast majority of tokenizers; a
token that straddles the prompt/answer boundary is an error, never a silent guess. Positions are
never found by searching the answer's tokens in the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from rotelab.errors import RotelabError


@dataclass(frozen=True)
class Encoded:
    """One tokenized example.

    ``input_ids`` [seq]; ``answer_start``: index of the first answer token (== number of prompt
    tokens); ``subject_tokens``: indices of tokens overlapping the subject's characters.
    """

    input_ids: list[int]
    answer_start: int
    subject_tokens: tuple[int, ...] = ()

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.answer_start]

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.answer_start :]


def encode(tokenizer, prompt: str, answer: str, subject: str | None = None) -> Encoded:
    """Tokenize ``prompt + " " + answer``; see the module docstring for the boundary rule.

    ``subject`` (optional) marks the tokens of the first occurrence of the subject in the prompt,
    for the ``subject+object`` loss mask.
    """
    if not answer.strip():
        raise RotelabError(f"empty answer for prompt {prompt!r}")
    text = f"{prompt} {answer}"
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids: list[int] = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    boundary = len(prompt)
    answer_idx = []
    for i, (a, b) in enumerate(offsets):
        if b <= a:  # special tokens (BOS/EOS) carry empty offsets
            continue
        if a < boundary < b and text[a:boundary].strip():
            raise RotelabError(f"a token spans the end of the prompt and the answer in {text!r}")
        if b > boundary:
            answer_idx.append(i)
    if not answer_idx:
        raise RotelabError(f"answer {answer!r} tokenizes to nothing after prompt {prompt!r}")
    answer_start, answer_end = answer_idx[0], answer_idx[-1] + 1
    ids = ids[:answer_end]  # a tokenizer that appends EOS: the EOS is not part of the answer
    subject_tokens: tuple[int, ...] = ()
    if subject is not None:
        s0 = prompt.find(subject)
        if s0 < 0:
            raise RotelabError(f"subject {subject!r} not in prompt {prompt!r}")
        s1 = s0 + len(subject)
        subject_tokens = tuple(i for i, (a, b) in enumerate(offsets) if b > a and a < s1 and b > s0 and i < answer_start)
    return Encoded(ids, answer_start, subject_tokens)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt alone, with the tokenizer's special tokens: what capture and generation feed."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
