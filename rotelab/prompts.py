"""Prompt kinds → item tables: the one list of prompts that training, evaluation and capture share.

An item is one (fact, template) prompt of one kind. Its ``text`` ends where the answer follows; the
answer (``object``; for ``reverse`` the subject) is appended as ``" " + answer``.

Item table columns: ``item`` (0..n-1 within the kind), ``fact_id``, ``relation``, ``template_id``,
``text``, ``object`` (the expected answer), ``split`` (``train`` = a phase-2 training fact,
``heldout`` otherwise).
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from rotelab.errors import RotelabError
from rotelab.facts import Fact
from rotelab.relations import Relation

BASE_KINDS = ("zero", "key", "train", "test", "unrelated")
ITEM_COLUMNS = ("item", "fact_id", "relation", "template_id", "text", "object", "split")


def all_kinds(relations: dict[str, Relation], languages: Iterable[str] = ("de", "es", "zh", "ja"), key_tokens: bool = True) -> list[str]:
    """The prompt kinds a run over these relations has, in display order."""
    kinds = [k for k in BASE_KINDS if key_tokens or k != "key"]
    kinds += [f"translated-{lang}" for lang in languages if any(lang in r.translated for r in relations.values())]
    kinds.append("icl")
    if any(r.reverse for r in relations.values()):
        kinds.append("reverse")
    return kinds


def _templates(rel: Relation, kind: str) -> tuple[str, ...]:
    if kind == "train" or kind == "icl":
        return rel.train
    if kind == "test":
        return rel.test
    if kind == "unrelated":
        return rel.unrelated
    if kind == "reverse":
        return rel.reverse
    if kind.startswith("translated-"):
        return rel.translated.get(kind.removeprefix("translated-"), ())
    raise RotelabError(f"unknown prompt kind {kind!r}")


def prompt_texts(fact: Fact, rel: Relation, kind: str, template_rel: Relation | None = None) -> list[tuple[int, str, str]]:
    """``[(template_id, prompt text, expected answer)]`` for one fact and kind.

    ``template_rel`` (repurposing experiment) takes the templates from another relation while the
    key token stays the fact's own.
    """
    s, o = fact.subject, fact.object
    if kind == "zero":
        return [(0, s, o)]
    if kind == "key":
        return [(0, f"{s} {rel.key_token}", o)]
    trel = template_rel or rel
    templates = _templates(trel, kind)
    if kind == "reverse":
        return [(i, t.format(object=o), s) for i, t in enumerate(templates)]
    if kind == "icl":
        ctx = trel.icl.format(subject=s, object=o)
        return [(i, f"{ctx} {t.format(subject=s)}", o) for i, t in enumerate(templates)]
    return [(i, t.format(subject=s), o) for i, t in enumerate(templates)]


def build_items(
    facts: list[Fact],
    relations: dict[str, Relation],
    kind: str,
    split: dict[str, str] | None = None,
    templates_per_kind: int | None = None,
    template_relations: dict[str, str] | None = None,
) -> pd.DataFrame:
    """The item table of one prompt kind (columns: :data:`ITEM_COLUMNS`), ordered by fact then template.

    ``split`` maps fact id → ``train``/``heldout`` (default: all ``heldout``); ``templates_per_kind``
    keeps the first N templates; ``template_relations`` maps a relation to the relation whose
    templates it is asked with (repurposing).
    """
    rows = []
    for f in facts:
        rel = relations.get(f.relation)
        if rel is None:
            raise RotelabError(f"fact {f.id!r}: unknown relation {f.relation!r}")
        trel = relations[template_relations[f.relation]] if template_relations and f.relation in template_relations else None
        for tid, text, answer in prompt_texts(f, rel, kind, trel)[: templates_per_kind or None]:
            rows.append((f.id, f.relation, tid, text, answer, (split or {}).get(f.id, "heldout")))
    df = pd.DataFrame(rows, columns=list(ITEM_COLUMNS[1:]))
    df.insert(0, "item", range(len(df)))
    df["template_id"] = df["template_id"].astype("int64")
    return df


def answer_options(items: pd.DataFrame, facts: list[Fact], kind: str, n_options: int = 100) -> list[list[str]]:
    """Multiple-choice options per item: the expected answer first, then its distractors.

    For ``reverse`` (the answer is a subject) the distractors are other subjects of the same
    relation (as many as exist, up to ``n_options - 1``).
    """
    by_id = {f.id: f for f in facts}
    out: list[list[str]] = []
    if kind == "reverse":
        subjects: dict[str, list[str]] = {}
        for f in facts:
            subjects.setdefault(f.relation, []).append(f.subject)
    for fid, answer in zip(items["fact_id"], items["object"]):
        f = by_id[fid]
        if kind == "reverse":
            others = [s for s in subjects[f.relation] if s != answer][: n_options - 1]
            out.append([answer, *others])
        else:
            out.append([answer, *f.alternatives[: n_options - 1]])
    return out
