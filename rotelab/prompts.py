"""Prompt kinds → item tables: the one list of prompts that training, evaluation and capture share.

An item is one (fact, template) prompt of one kind. Its ``text`` ends where the answer follows; the
answer (``object``; for ``reverse`` the subject) is appended as ``" " + answer``.

Item table columns: ``item`` (0..n-1 within the kind), ``fact_id``, ``relation``, ``template_id``,
``text``, ``object`` (the expected answer), ``split`` (``train`` = a phase-2 training fact,
``validation`` / ``test`` = the held-out facts, ``injected`` = memorized only after phase 2,
ablation C1; runs written before the validation/test split: ``heldout``; see
:func:`rotelab.facts.split_facts`). ICL kinds add
``context_template_id`` (the train template that states the fact in the context).

Kinds and their templates (``template_id`` is always the index in the relation's list named):

* ``zero`` ``{s}``; ``key`` ``{s} <R_r>``;
* ``train``: exactly the P train templates phase 2 trains (:func:`phase2_template_ids`);
* ``meaningful`` (``phase1.mode: meaningful``, ablation C3): train-1, the memorization template;
* ``test``, ``unrelated``, ``translated-<lang>``: the relation's lists;
* ``icl`` / ``icl-translated-<lang>`` (paper §5, B.5): the fact stated through one train template
  drawn at random per item (seeded; :func:`icl_context_id`), then the question as each test
  (translated) template. Test templates never repeat a train template (checked when relations are
  parsed), so no item contains its own question as its context;
* ``repurposed`` (``phase2.repurpose``, paper §7 / G.2): the repurposed relation's facts asked with
  the *target* relation's test templates;
* ``reverse`` (paper G.1): asks for ``s`` given ``o``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import pandas as pd

from rotelab.errors import RotelabError
from rotelab.facts import Fact
from rotelab.relations import Relation

BASE_KINDS = ("zero", "key", "train", "test", "unrelated")
ITEM_COLUMNS = ("item", "fact_id", "relation", "template_id", "text", "object", "split")
ICL_PREFIX = "icl-"


def is_icl_kind(kind: str) -> bool:
    """Whether ``kind`` is an in-context-learning kind (``icl``, ``icl-translated-<lang>``)."""
    return kind == "icl" or kind.startswith(ICL_PREFIX)

MEANINGFUL_TEMPLATE_ID = 0
"""``phase1.mode: meaningful`` memorizes with train template 0 (train-1)."""


def phase2_template_ids(prompts: int, phase1_mode: str = "key") -> list[int]:
    """The train-template ids phase 2 trains on (and the ``train`` kind holds): the first P, or —
    with ``phase1.mode: meaningful`` — the P after train-1, so the memorization template is never a
    phase-2 template (ablation C3)."""
    start = MEANINGFUL_TEMPLATE_ID + 1 if phase1_mode == "meaningful" else 0
    return list(range(start, start + prompts))


def all_kinds(
    relations: dict[str, Relation],
    languages: Iterable[str] = ("de", "es", "zh", "ja"),
    key_tokens: bool = True,
    *,
    meaningful: bool = False,
    repurposed: bool = False,
) -> list[str]:
    """The prompt kinds a run over these relations has, in display order."""
    kinds = [k for k in BASE_KINDS if key_tokens or k != "key"]
    if meaningful:
        kinds.insert(kinds.index("train"), "meaningful")
    langs = [lang for lang in languages if any(lang in r.translated for r in relations.values())]
    kinds += [f"translated-{lang}" for lang in langs]
    kinds.append("icl")
    kinds += [f"icl-translated-{lang}" for lang in langs]
    if repurposed:
        kinds.append("repurposed")
    if any(r.reverse for r in relations.values()):
        kinds.append("reverse")
    return kinds


def _templates(rel: Relation, kind: str) -> tuple[str, ...]:
    if kind == "train":
        return rel.train
    if kind == "meaningful":
        return rel.train[MEANINGFUL_TEMPLATE_ID : MEANINGFUL_TEMPLATE_ID + 1]
    if kind in ("test", "icl", "repurposed"):
        return rel.test
    if kind == "unrelated":
        return rel.unrelated
    if kind == "reverse":
        return rel.reverse
    if kind.startswith(ICL_PREFIX + "translated-"):
        return rel.translated.get(kind.removeprefix(ICL_PREFIX + "translated-"), ())
    if kind.startswith("translated-"):
        return rel.translated.get(kind.removeprefix("translated-"), ())
    raise RotelabError(f"unknown prompt kind {kind!r}")


def icl_context_id(seed: int, fact_id: str, kind: str, template_id: int, n_train: int) -> int:
    """The train template that states the fact in the context of one ICL item: uniform over the
    relation's ``n_train`` train templates (the paper's "knowledge base" of B.5 is all 10),
    a pure function of (seed, fact, kind, question template)."""
    h = hashlib.sha256(f"{seed}/icl/{fact_id}/{kind}/{template_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") % n_train


def icl_context(rel: Relation, context_id: int, subject: str, obj: str) -> str:
    """The in-context statement of a fact: ``"{train template} {object}."`` (no period added when
    the object already ends a sentence)."""
    text = f"{rel.train[context_id].format(subject=subject)} {obj}"
    return text if text[-1] in ".!?。" else text + "."


def prompt_texts(fact: Fact, rel: Relation, kind: str, template_rel: Relation | None = None) -> list[tuple[int, str, str]]:
    """``[(template_id, prompt text, expected answer)]`` for one fact and a non-ICL kind.

    ``template_rel`` (repurposing experiment) takes the templates from another relation while the
    key token stays the fact's own.
    """
    s, o = fact.subject, fact.object
    if kind == "zero":
        return [(0, s, o)]
    if kind == "key":
        return [(0, f"{s} {rel.key_token}", o)]
    if is_icl_kind(kind):
        raise RotelabError(f"prompt kind {kind!r} needs a seed: use build_items")
    trel = template_rel or rel
    templates = _templates(trel, kind)
    first = MEANINGFUL_TEMPLATE_ID if kind == "meaningful" else 0
    if kind == "reverse":
        return [(i, t.format(object=o), s) for i, t in enumerate(templates)]
    return [(first + i, t.format(subject=s), o) for i, t in enumerate(templates)]


def build_items(
    facts: list[Fact],
    relations: dict[str, Relation],
    kind: str,
    split: dict[str, str] | None = None,
    templates_per_kind: int | None = None,
    template_relations: dict[str, str] | None = None,
    *,
    template_ids: Sequence[int] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """The item table of one prompt kind (columns: :data:`ITEM_COLUMNS`), ordered by fact then template.

    ``split`` maps fact id → ``train``/``validation``/``test``/``injected`` (``Run.split``; without
    it every fact is labelled ``heldout``, the legacy label);
    ``template_ids`` keeps exactly these template ids (else ``templates_per_kind`` keeps the first
    N); ``template_relations`` maps a relation to the relation whose templates it is asked with
    (repurposing; the ``repurposed`` kind holds only those relations' facts); ``seed`` draws the
    ICL contexts.
    """
    icl = is_icl_kind(kind)
    rows = []
    for f in facts:
        rel = relations.get(f.relation)
        if rel is None:
            raise RotelabError(f"fact {f.id!r}: unknown relation {f.relation!r}")
        trel = relations[template_relations[f.relation]] if template_relations and f.relation in template_relations else None
        if kind == "repurposed" and trel is None:
            continue
        if icl:
            texts = [(i, t.format(subject=f.subject), f.object) for i, t in enumerate(_templates(rel, kind))]
        else:
            texts = prompt_texts(f, rel, kind, trel)
        texts = [t for t in texts if t[0] in template_ids] if template_ids is not None else texts[: templates_per_kind or None]
        for tid, text, answer in texts:
            row = [f.id, f.relation, tid, text, answer, (split or {}).get(f.id, "heldout")]
            if icl:
                c = icl_context_id(seed, f.id, kind, tid, len(rel.train))
                row[3] = f"{icl_context(rel, c, f.subject, f.object)} {text}"
                row.append(c)
            rows.append(row)
    cols = list(ITEM_COLUMNS[1:]) + (["context_template_id"] if icl else [])
    df = pd.DataFrame(rows, columns=cols)
    df.insert(0, "item", range(len(df)))
    df["template_id"] = df["template_id"].astype("int64")
    if icl:
        df["context_template_id"] = df["context_template_id"].astype("int64")
    return df


def answer_options(items: pd.DataFrame, facts: list[Fact], kind: str, n_options: int = 100) -> list[list[str]]:
    """Multiple-choice options per item: the expected answer first, then its distractors (the
    fact's ``alternatives``: pool entities, or other facts' objects with
    ``data.distractors_from: memorized`` — see :func:`rotelab.facts.memorized_distractors`).

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
