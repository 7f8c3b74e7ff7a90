"""Training examples, loss masks, the collator and the deterministic data order.

Every training sequence is a prompt and its answer tokenized the one shared way
(:func:`rotelab.tokenization.encode`: ``prompt + " " + answer``). The loss mask decides which
positions carry a label; every other position (and all padding) gets ``-100``:

* ``full`` — every token of the sequence (the tokenizer's BOS, if any, is never predicted anyway);
* ``object`` — the answer's tokens only (positions ``answer_start`` …);
* ``subject+object`` — the subject's tokens (from the tokenizer's offsets) and the answer's.

The labels built here are exactly what the loss sees: :func:`collate` pads them with ``-100`` and
:func:`rotelab.train.engine.step_loss` uses them unchanged (no later step rebuilds labels).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from rotelab.batching import pad_values
from rotelab.config import LossMask
from rotelab.errors import RotelabError
from rotelab.facts import Fact
from rotelab.prompts import MEANINGFUL_TEMPLATE_ID, build_items, phase2_template_ids, prompt_texts
from rotelab.relations import Relation
from rotelab.tokenization import encode

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One training sequence: the text parts and the token ids with their labels (same length)."""

    fact_id: str
    prompt: str
    answer: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_targets(self) -> int:
        """Number of predicted tokens (labels ≠ -100, excluding position 0 which nothing predicts)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def phase1_texts(
    facts: list[Fact], relations: dict[str, Relation], mode: str, split: dict[str, str] | None = None
) -> list[tuple[str, str, str, str]]:
    """``[(fact_id, prompt, answer, subject)]`` of phase 1: every fact except the ``injected`` ones
    of ``split`` (ablation C1 memorizes those after phase 2, :func:`inject_texts`).

    ``key``: ``"{subject} <R_rel>"`` (the ``key`` prompt kind's text); ``no_key`` (ablation C2):
    ``"{subject}"``; ``meaningful`` (ablation C3): train-1, the relation's first train template
    (the ``meaningful`` prompt kind's text), which phase 2 never trains.
    """
    out = []
    for f in facts:
        if split is not None and split.get(f.id) == "injected":
            continue
        rel = relations.get(f.relation)
        if rel is None:
            raise RotelabError(f"fact {f.id!r}: unknown relation {f.relation!r} (known: {', '.join(sorted(relations))})")
        if mode == "key":
            prompt = prompt_texts(f, rel, "key")[0][1]
        elif mode == "no_key":
            prompt = f.subject
        elif mode == "meaningful":
            prompt = rel.train[MEANINGFUL_TEMPLATE_ID].format(subject=f.subject)
        else:
            raise RotelabError(f"unknown phase1.mode {mode!r} (key, no_key, meaningful)")
        out.append((f.id, prompt, f.object, f.subject))
    return out


def inject_texts(facts: list[Fact], relations: dict[str, Relation], split: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """``[(fact_id, prompt, answer, subject)]`` of the injection stage (ablation C1): the
    ``injected`` facts as ``"{subject} <R_rel>"``, exactly phase 1's key-token form."""
    out = phase1_texts([f for f in facts if split.get(f.id) == "injected"], relations, "key")
    if not out:
        raise RotelabError("inject stage has no facts (inject.facts_per_relation selects none)")
    return out


def phase2_texts(
    facts: list[Fact],
    relations: dict[str, Relation],
    split: dict[str, str],
    prompts: int,
    kind: str = "train",
    repurpose: dict[str, str] | None = None,
    *,
    phase1_mode: str = "key",
    splits: tuple[str, ...] = ("train",),
) -> list[tuple[str, str, str, str]]:
    """``[(fact_id, prompt, answer, entity in the prompt)]`` of phase 2 (and the SFT baselines).

    The facts whose split is in ``splits`` (phase 2: the ``train`` facts; the paper's SFT:
    ``train``, ``validation`` and ``test``, i.e. every fact phase 1 memorizes) × the P templates of ``kind``
    that phase 2 trains (:func:`rotelab.prompts.phase2_template_ids`; ``train`` or ``reverse``);
    ``repurpose`` maps a relation to the relation whose templates teach it (paper §7).
    """
    train_facts = [f for f in facts if split.get(f.id) in splits]
    if not train_facts:
        raise RotelabError("phase 2 has no training facts (phase2.k selects none)")
    ids = phase2_template_ids(prompts, phase1_mode if kind == "train" else "key")
    items = build_items(train_facts, relations, kind, split, template_relations=repurpose or None, template_ids=ids)
    if items.empty:
        raise RotelabError(f"phase 2 with phase2.kind={kind!r}: none of the relations has {kind} templates")
    by_id = {f.id: f for f in train_facts}
    out = []
    for fid, text, answer in zip(items["fact_id"], items["text"], items["object"]):
        f = by_id[fid]
        entity = f.object if kind == "reverse" else f.subject
        out.append((fid, text, answer, entity))
    return out


def make_example(tokenizer, fact_id: str, prompt: str, answer: str, entity: str, mask: LossMask, max_length: int) -> Example:
    """Tokenize one sequence and build its labels from ``mask`` (see the module docstring)."""
    enc = encode(tokenizer, prompt, answer, subject=entity if mask == "subject+object" else None)
    ids = enc.input_ids
    if len(ids) > max_length:
        raise RotelabError(
            f"training sequence {prompt + ' ' + answer!r} has {len(ids)} tokens, more than train.max_length={max_length}"
        )
    if mask == "full":
        keep = set(range(len(ids)))
    elif mask == "object":
        keep = set(range(enc.answer_start, len(ids)))
    elif mask == "subject+object":
        keep = set(enc.subject_tokens) | set(range(enc.answer_start, len(ids)))
    else:
        raise RotelabError(f"unknown loss mask {mask!r} (full, object, subject+object)")
    labels = tuple(t if i in keep else IGNORE for i, t in enumerate(ids))
    return Example(fact_id, prompt, answer, tuple(ids), labels)


def make_examples(tokenizer, texts: list[tuple[str, str, str, str]], mask: LossMask, max_length: int) -> list[Example]:
    return [make_example(tokenizer, fid, p, a, e, mask, max_length) for fid, p, a, e in texts]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch (:func:`rotelab.batching.pad_values`): ``input_ids`` [batch, seq]
    (pad ``pad_id``), ``attention_mask`` [batch, seq] (0 on padding), ``labels`` [batch, seq]
    (-100 on padding and unmasked tokens)."""
    if not examples:
        raise ValueError("empty micro-batch")
    ids, att = pad_values([e.input_ids for e in examples], pad_id)
    lab, _ = pad_values([e.labels for e in examples], IGNORE)
    return {"input_ids": ids, "attention_mask": att, "labels": lab}


def epoch_seed(seed: int, stage: str, epoch: int) -> int:
    """A seed for one epoch's order, derived from the run seed, the stage name and the epoch."""
    h = hashlib.sha256(f"{seed}/{stage}/{epoch}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def epoch_order(n: int, seed: int, stage: str, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of its arguments, so every rank
    and every resumed process sees the same order without carrying RNG state."""
    g = torch.Generator().manual_seed(epoch_seed(seed, stage, epoch))
    return torch.randperm(n, generator=g).tolist()


def step_plan(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` slices of an epoch's order, one per optimizer step (last one may be short)."""
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def micro_slices(n_step: int, parts: int) -> list[tuple[int, int]]:
    """Split one optimizer step's ``n_step`` examples into ``parts`` (= grad_accum × world size)
    contiguous micro-batches as evenly as possible; some may be empty when ``n_step < parts``."""
    base, extra = divmod(n_step, parts)
    out, s = [], 0
    for i in range(parts):
        k = base + (1 if i < extra else 0)
        out.append((s, s + k))
        s += k
    return out
