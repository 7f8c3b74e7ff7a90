"""Per-item accuracy metrics from token log-probabilities and generations (engine independent).

Tokenization: every prompt/answer pair goes through :func:`rotelab.tokenization.encode`, exactly as
in training: the text is ``prompt + " " + answer`` and the answer's tokens are those starting at or
after the end of the prompt, so the space before the answer belongs to the answer's first token
(``" Paris"``), never to the prompt. The prompt is therefore fed *without* a trailing space, both
for scoring and for generation (a generated answer normally starts with a space, stripped below).

Metrics of one item (prompt ``p``, answer ``a`` = ``items.object``, options ``o_0 = a, o_1, …``
from :func:`rotelab.prompts.answer_options`):

* ``object_logprob`` = Σ log P(answer tokens | p) ; ``object_prob`` = exp of it.
* ``mc_correct`` = 1 iff the answer's joint log-probability is the *unique* maximum over the
  options (a tie with any distractor counts as incorrect); ``mc_rank`` = 1 + the number of
  distractors scoring ≥ the answer (so ties rank pessimistically and ``mc_correct == (mc_rank ==
  1)``); ``mc_mass`` = the answer's share of the probability mass of the options,
  exp(s_0) / Σ_k exp(s_k). Options are scored as plain continuations (no end-of-text token), so an
  option that is a prefix of another has at least its probability whenever both tokenize to a
  common prefix. ``mc_correct_norm`` is the same rule on the mean log-probability per token.
* ``gen_correct`` = 1 iff the normalized answer occurs in the normalized greedy output at a word
  boundary; ``gen_prefix`` = 1 iff the normalized output starts with it. Normalization: Unicode
  NFKC, lower case, punctuation → space, white space collapsed. A boundary is the string's end or
  any character that is not an ASCII letter/digit (so ``Rome`` does not match ``Romeo``, but does
  match ``是Rome。``). Generation stops at EOS or at the first token containing a newline; the
  stored text is the output up to the first newline, stripped.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from rotelab.errors import RotelabError
from rotelab.tokenization import encode

#: Names of the per-item arrays written to each kind's store group, all [checkpoint, item].
METRIC_ARRAYS: tuple[str, ...] = (
    "object_prob",
    "object_logprob",
    "mc_correct",
    "mc_rank",
    "mc_mass",
    "mc_correct_norm",
    "gen_correct",
    "gen_prefix",
    "gen_text",
)


@dataclass(frozen=True)
class ScoreRequest:
    """One shared prefix and the continuations to score behind it (token ids)."""

    prefix: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class KindPlan:
    """Everything an engine needs to evaluate one prompt kind, tokenized once.

    ``requests``: the scoring requests; ``option_ref[i]`` lists, for item ``i``, ``(request index,
    continuation index)`` of each option in option order (option 0 = the answer).
    ``gen_prompts[i]``: the prompt ids of item ``i`` (the training prompt/answer boundary).
    """

    kind: str
    requests: tuple[ScoreRequest, ...]
    option_ref: tuple[tuple[tuple[int, int], ...], ...]
    gen_prompts: tuple[tuple[int, ...], ...]
    answers: tuple[str, ...]

    @property
    def n_items(self) -> int:
        return len(self.answers)

    def token_counts(self) -> tuple[int, int]:
        """(naive, shared) tokens a forward pass must process for the MC scoring of this kind:
        naive = Σ (prefix + option) per option; shared = Σ prefix + Σ (option − 1)."""
        naive = sum(len(r.prefix) * len(r.continuations) + sum(len(c) for c in r.continuations) for r in self.requests)
        shared = sum(len(r.prefix) + sum(len(c) - 1 for c in r.continuations) for r in self.requests)
        return naive, shared


def plan_kind(tokenizer, kind: str, texts: Sequence[str], answers: Sequence[str], options: Sequence[Sequence[str]]) -> KindPlan:
    """Tokenize every item's options with :func:`encode` and group them by shared prefix.

    Options whose prompt tokens differ from the answer's (a tokenizer that merges across the
    boundary differently) get their own request, so nothing is ever scored behind a wrong prefix.
    Raises RotelabError for an answer or option that tokenizes to nothing.
    """
    requests: list[ScoreRequest] = []
    refs: list[tuple[tuple[int, int], ...]] = []
    gen_prompts: list[tuple[int, ...]] = []
    for text, answer, opts in zip(texts, answers, options, strict=True):
        if not opts or opts[0] != answer:
            raise RotelabError(f"kind {kind!r}: options of prompt {text!r} do not start with its answer {answer!r}")
        groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        where: list[tuple[tuple[int, ...], int]] = []
        for opt in opts:
            enc = encode(tokenizer, text, opt)
            prefix, cont = tuple(enc.prompt_ids), tuple(enc.answer_ids)
            if not cont:
                raise RotelabError(f"kind {kind!r}: answer {opt!r} tokenizes to nothing after prompt {text!r}")
            lst = groups.setdefault(prefix, [])
            where.append((prefix, len(lst)))
            lst.append(cont)
        base = len(requests)
        index = {p: base + j for j, p in enumerate(groups)}
        requests.extend(ScoreRequest(p, tuple(c)) for p, c in groups.items())
        refs.append(tuple((index[p], j) for p, j in where))
        gen_prompts.append(where[0][0])
    return KindPlan(kind, tuple(requests), tuple(refs), tuple(gen_prompts), tuple(answers))


def mc_stats(scores: np.ndarray) -> tuple[float, float, float]:
    """(correct, rank, mass) of option 0 among ``scores`` [option] (joint log-probabilities).

    correct = 1.0 iff option 0 is the unique maximum; rank = 1 + #{k ≥ 1: s_k ≥ s_0};
    mass = softmax(scores)[0].
    """
    s = np.asarray(scores, dtype=np.float64)
    ahead = int(np.sum(s[1:] >= s[0]))
    m = float(np.max(s))
    mass = float(np.exp(s[0] - m) / np.sum(np.exp(s - m)))
    return float(ahead == 0), float(1 + ahead), mass


def item_scores(plan: KindPlan, token_logprobs: Sequence[Sequence[np.ndarray]]) -> dict[str, np.ndarray]:
    """The scoring metrics of every item from the engine's per-token log-probabilities.

    ``token_logprobs[r][c]``: float [len(continuation)] for request ``r``, continuation ``c``.
    Returns arrays [item] for object_prob, object_logprob, mc_correct, mc_rank, mc_mass,
    mc_correct_norm.
    """
    n = plan.n_items
    out = {k: np.zeros(n, dtype=np.float64) for k in METRIC_ARRAYS[:6]}
    for i, refs in enumerate(plan.option_ref):
        lps = [np.asarray(token_logprobs[r][c], dtype=np.float64) for r, c in refs]
        joint = np.array([lp.sum() for lp in lps])
        norm = np.array([lp.mean() for lp in lps])
        out["object_logprob"][i] = joint[0]
        out["object_prob"][i] = math.exp(joint[0])
        out["mc_correct"][i], out["mc_rank"][i], out["mc_mass"][i] = mc_stats(joint)
        out["mc_correct_norm"][i] = mc_stats(norm)[0]
    return out


_WS = re.compile(r"\s+")


def normalize_text(s: str) -> str:
    """NFKC, lower case, punctuation (Unicode category P*) → space, white space collapsed."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in s)
    return _WS.sub(" ", s).strip()


def _boundary(ch: str) -> bool:
    return not (ch.isascii() and ch.isalnum())


def answer_in_output(answer: str, output: str) -> tuple[bool, bool]:
    """(contained at a word boundary, output starts with it), both after :func:`normalize_text`."""
    a, o = normalize_text(answer), normalize_text(output)
    if not a:
        return False, False
    found = False
    start = o.find(a)
    while start >= 0 and not found:
        end = start + len(a)
        if (start == 0 or _boundary(o[start - 1])) and (end == len(o) or _boundary(o[end])):
            found = True
        start = o.find(a, start + 1)
    prefix = o.startswith(a) and (len(o) == len(a) or _boundary(o[len(a)]))
    return found, prefix


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus every vocabulary token whose text contains a newline (generation stops there)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab_size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(vocab_size)], skip_special_tokens=False)
    ids.update(i for i, t in enumerate(texts) if "\n" in t)
    return sorted(ids)


def cut_at_stop(token_ids: Sequence[int], stop_ids: Collection[int]) -> list[int]:
    """The tokens up to and including the first stop token (all of them when none stops)."""
    stops = stop_ids if isinstance(stop_ids, (set, frozenset)) else set(int(s) for s in stop_ids)
    out: list[int] = []
    for t in token_ids:
        out.append(int(t))
        if t in stops:
            break
    return out


def finish_generation(tokenizer, token_ids: Sequence[int], stop_ids: set[int]) -> str:
    """The generated text: :func:`cut_at_stop`, decoded without special tokens, cut at the first
    newline, stripped."""
    text = tokenizer.decode(cut_at_stop(token_ids, stop_ids), skip_special_tokens=True)
    return text.split("\n", 1)[0].strip()


def generation_metrics(answers: Sequence[str], texts: Sequence[str]) -> dict[str, np.ndarray]:
    """gen_correct, gen_prefix (float [item]) and gen_text (str [item])."""
    pairs = [answer_in_output(a, t) for a, t in zip(answers, texts, strict=True)]
    return {
        "gen_correct": np.array([float(c) for c, _ in pairs]),
        "gen_prefix": np.array([float(p) for _, p in pairs]),
        "gen_text": np.array(list(texts), dtype=object),
    }
