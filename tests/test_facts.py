"""Fact datasets: every rule has a failing input; generation is deterministic and fast."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rotelab.errors import RotelabError
from rotelab.facts import Fact, generate_facts, read_facts, validate_facts, write_dataset
from rotelab.prompts import answer_options, build_items, prompt_texts
from rotelab.relations import builtin_relations, load_pool, load_relations, select_relations

RELS = builtin_relations()
ALTS = tuple(f"Alt{c}{d}" for c in "ABCDEFGHIJ" for d in "KLMNOPQRST")[:99]


def _fact(**kw) -> Fact:
    d = dict(id="capital-1", relation="capital", subject="Kalindor", object="Nowy Targ", alternatives=ALTS)
    d.update(kw)
    return Fact(**d)


def _overlap(a: str, b: str) -> bool:
    return a.lower() in b.lower() or b.lower() in a.lower()


def test_generated_facts_obey_every_rule() -> None:
    facts = generate_facts(RELS, 100, seed=1)
    validate_facts(facts, RELS, 99, "gen")
    # independent re-check of the distractor rules and subject rules
    pools = {p for r in RELS.values() for p in load_pool(r.object_pool)}
    subjects = [f.subject for f in facts]
    assert len(set(s.lower() for s in subjects)) == len(subjects)
    assert not {s.lower() for s in subjects} & {p.lower() for p in pools}
    for f in facts:
        pool = set(load_pool(RELS[f.relation].object_pool))
        assert f.object in pool and len(f.alternatives) == 99
        assert set(f.alternatives) <= pool
        assert all(not _overlap(a, f.object) for a in f.alternatives)
        alts = list(f.alternatives)
        assert all(not _overlap(a, b) for i, a in enumerate(alts) for b in alts[i + 1 :])


@pytest.mark.parametrize(
    "fact, needle",
    [
        (_fact(relation="population"), "unknown relation 'population'"),
        (_fact(alternatives=ALTS[:50]), "50 distractors, need 99"),
        (_fact(alternatives=("Nowy Targ",) + ALTS[1:]), "equals the object"),
        (_fact(alternatives=("Nowy Targ Station",) + ALTS[1:]), "contain one another"),
        (_fact(alternatives=("Targ",) + ALTS[1:]), "contain one another"),
        (_fact(alternatives=("AltAL",) + ALTS[1:]), "distractors 'AltAL' and 'AltAL'"),
        (_fact(alternatives=("usa",) + ALTS[1:-1] + ("usa network",)), "contain one another"),
        (_fact(subject="  "), "empty subject"),
    ],
)
def test_each_rule_rejects_a_bad_fact(fact: Fact, needle: str) -> None:
    with pytest.raises(RotelabError) as exc:
        validate_facts([fact], RELS, 99, "f.jsonl")
    assert needle in str(exc.value) and "f.jsonl" in str(exc.value)


def test_duplicate_ids_and_subjects_rejected() -> None:
    with pytest.raises(RotelabError, match="duplicate id"):
        validate_facts([_fact(), _fact(subject="Other")], RELS, 99, "f")
    with pytest.raises(RotelabError, match="duplicate subject"):
        validate_facts([_fact(), _fact(id="capital-2", subject="kalindor")], RELS, 99, "f")


def test_read_facts_errors(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_text(json.dumps({"id": "a", "relation": "capital", "subject": "X"}) + "\n")
    with pytest.raises(RotelabError, match=r"f.jsonl:1: missing field 'object'"):
        read_facts(p)
    p.write_bytes("{\"id\": \"caf\xe9\"}".encode("latin-1"))
    with pytest.raises(RotelabError, match="not UTF-8"):
        read_facts(p)
    p.write_text("{not json\n")
    with pytest.raises(RotelabError, match="f.jsonl:1: not valid JSON"):
        read_facts(p)


def test_csv_and_jsonl_read_the_same(tmp_path: Path) -> None:
    facts = generate_facts(select_relations(RELS, ["capital"]), 5, seed=0)
    write_dataset(tmp_path, facts, RELS)
    csv_path = tmp_path / "f.csv"
    import csv

    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "relation", "subject", "object", "alternatives"])
        for f in facts:
            w.writerow([f.id, f.relation, f.subject, f.object, "|".join(f.alternatives)])
    assert read_facts(csv_path) == read_facts(tmp_path / "facts.jsonl") == facts


def test_user_relations_file_validation(tmp_path: Path) -> None:
    p = tmp_path / "rels.yaml"
    p.write_text("relations:\n  color:\n    key_token: '<R_color>'\n    subject_type: book\n    object_pool: cities\n"
                 "    icl: '{subject} is {object}.'\n    meaningful: 'The color of {subject} is'\n"
                 "    train: ['The color of it is']\n    test: []\n    unrelated: []\n")
    with pytest.raises(RotelabError, match=r"rels.yaml: relation 'color': train needs 10 templates"):
        load_relations(p)
    p.write_text(p.read_text().replace("train: ['The color of it is']", "train: " + str(["The color of it is"] * 10)))
    with pytest.raises(RotelabError, match=r"must contain \{subject\} exactly once"):
        load_relations(p)


def test_data_make_is_deterministic_fast_and_atomic(tmp_path: Path) -> None:
    def make(out: Path, seed: int) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rotelab.cli", "data", "make", "--out", str(out), "--facts-per-relation", "100", "--seed", str(seed)], check=True, capture_output=True)
        return time.perf_counter() - t

    elapsed = make(tmp_path / "a", 3)
    make(tmp_path / "b", 3)
    make(tmp_path / "c", 4)
    a = (tmp_path / "a" / "facts.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "facts.jsonl").read_bytes()
    assert a != (tmp_path / "c" / "facts.jsonl").read_bytes()
    assert (tmp_path / "a" / "relations.yaml").read_bytes() == (tmp_path / "b" / "relations.yaml").read_bytes()
    assert len(a.decode().splitlines()) == 500
    assert elapsed < 30
    r = subprocess.run([sys.executable, "-m", "rotelab.cli", "data", "make", "--out", str(tmp_path / "d"), "--relations", "capital,colour"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown relation 'colour'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_item_tables_per_kind() -> None:
    facts = generate_facts(select_relations(RELS, ["capital", "mother"]), 4, seed=0)
    rel = RELS["capital"]
    f = facts[0]
    assert prompt_texts(f, rel, "zero") == [(0, f.subject, f.object)]
    assert prompt_texts(f, rel, "key") == [(0, f"{f.subject} <R_capital>", f.object)]
    test = prompt_texts(f, rel, "test")
    assert [t for _, t, _ in test] == [t.format(subject=f.subject) for t in rel.test]
    for kind, questions in (("icl", "test"), ("icl-translated-de", "de")):
        icl = build_items(facts, RELS, kind, seed=3)
        assert len(icl) == len(facts) * 10
        contexts = set()
        for _, row in icl.iterrows():  # context: the item's own fact through a train template; question: a test template
            fact = next(x for x in facts if x.id == row.fact_id)
            r = RELS[fact.relation]
            qs = r.test if questions == "test" else r.translated["de"]
            question = qs[row.template_id].format(subject=fact.subject)
            context = r.train[row.context_template_id].format(subject=fact.subject) + " " + fact.object + "."
            assert row.text == context + " " + question and row.object == fact.object
            assert question not in context and all(t.format(subject=fact.subject) not in context for t in r.test)
            contexts.add(row.context_template_id)
        assert len(contexts) >= 5  # drawn over the train templates, not always the first
    assert build_items(facts, RELS, "icl", seed=3).equals(build_items(facts, RELS, "icl", seed=3))
    assert not build_items(facts, RELS, "icl", seed=3)["context_template_id"].equals(build_items(facts, RELS, "icl", seed=4)["context_template_id"])
    rev = build_items(facts, RELS, "reverse")
    assert set(rev.relation) == {"mother"}
    for _, row in rev.iterrows():
        fact = next(x for x in facts if x.id == row.fact_id)
        assert row.object == fact.subject and fact.object in row.text
    de = build_items(facts, RELS, "translated-de", split={facts[0].id: "train"}, templates_per_kind=2)
    assert len(de) == 2 * len(facts) and list(de.item) == list(range(len(de)))
    assert set(de[de.fact_id == facts[0].id].split) == {"train"} and set(de[de.fact_id != facts[0].id].split) == {"heldout"}
    opts = answer_options(build_items(facts, RELS, "test"), facts, "test")
    assert all(o[0] == f.object and len(o) == 100 and len(set(o)) == 100 for o, f in zip(opts[::10], facts))


# ----------------------------------------------------------------------------- validation / test split


def test_split_facts_divides_the_heldout_facts_into_validation_and_test() -> None:
    from collections import Counter

    from rotelab.facts import split_facts, split_mask, split_names

    rels = select_relations(builtin_relations(), ["capital", "author"], "test")
    facts = generate_facts(rels, 11, seed=0, n_distractors=5)
    s = split_facts(facts, k=2, injected=1, validation_fraction=0.5, seed=7)
    for rel in ("capital", "author"):
        ids = [f.id for f in facts if f.relation == rel]  # file order
        assert [s[i] for i in ids[:2]] == ["train", "train"] and s[ids[-1]] == "injected"
        held = Counter(s[i] for i in ids[2:-1])
        assert held == {"validation": 4, "test": 4}  # 8 held out: floor(0.5 * 8 + 0.5) = 4
    # seeded: the same seed gives the same division, another seed another one; train/injected stay
    assert split_facts(facts, 2, 1, 0.5, 7) == s
    other = split_facts(facts, 2, 1, 0.5, 8)
    assert other != s and {i for i, v in other.items() if v in ("train", "injected")} == {i for i, v in s.items() if v in ("train", "injected")}
    # fraction 0: everything held out is test; None: the legacy label
    assert set(split_facts(facts, 2, 1, 0.0, 7).values()) == {"train", "test", "injected"}
    assert set(split_facts(facts, 2, 1, None, 7).values()) == {"train", "heldout", "injected"}
    assert Counter(split_facts(facts, 2, 0, 0.3, 7).values()) == {"train": 4, "validation": 6, "test": 12}  # 9 per relation: 3 / 6
    labels = ["train", "validation", "test", "heldout", "injected"]
    assert list(split_mask(labels, "heldout")) == [False, True, True, True, False]
    assert list(split_mask(labels, "all")) == [True] * 5 and list(split_mask(labels, "test")) == [False, False, True, False, False]
    assert split_names(["train", "test", "validation"]) == ["all", "test", "train", "validation", "heldout"]
    assert split_names(["train", "heldout"]) == ["all", "heldout", "train"]


def test_run_records_its_split_and_legacy_runs_keep_heldout(tmp_path: Path) -> None:
    from rotelab.config import config_from_dict
    from rotelab.run import Run

    cfg = config_from_dict({"name": "s", "seed": 3, "model": {"name": "tiny-llama"},
                            "data": {"relations": ["capital"], "facts_per_relation": 9, "distractors": 5,
                                     "languages": ["de"], "validation_fraction": 0.25},
                            "phase2": {"k": 1}})
    run = Run.create(cfg, tmp_path / "new")
    doc = json.loads((tmp_path / "new" / "data" / "split.json").read_text())
    assert doc["validation_fraction"] == 0.25 and doc["seed"] == 3
    assert sorted(doc["split"].values()).count("validation") == 2 and sorted(doc["split"].values()).count("test") == 6
    assert Run.open(run.root).split == doc["split"] and not run.legacy_split
    assert set(run.items("test")["split"]) == {"train", "validation", "test"}
    # a run written before the split (no split.json): every held-out fact stays ``heldout``
    (run.root / "data" / "split.json").unlink()
    old = Run.open(run.root)
    assert old.legacy_split and set(old.split.values()) == {"train", "heldout"}
    assert set(old.items("test")["split"]) == {"train", "heldout"}
