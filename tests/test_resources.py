"""Checks on the shipped data files: relations, prompt templates, object pools, name material."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
import yaml

RES = Path(__file__).parents[1] / "rotelab" / "resources"
POOLS = RES / "pools"

RELATIONS = {"author", "capital", "educated_at", "genre", "mother", "employer"}
SUBJECT_TYPES = {"book", "country", "person", "work"}
EXPECTED = {
    "author": ("book", "authors"),
    "capital": ("country", "cities"),
    "educated_at": ("person", "universities"),
    "genre": ("work", "genres"),
    "mother": ("person", "women"),
    "employer": ("person", "companies"),  # target of the repurposing experiment
}
LANGS = ("de", "es", "zh", "ja")
POOL_MIN = {"authors": 150, "cities": 150, "universities": 150, "genres": 120, "women": 150, "companies": 120}
# Letters (ASCII or Latin with accents), digits are not names; allow space . ' - between.
POOL_ENTRY = re.compile(r"^[A-Za-z\u00C0-\u024F][A-Za-z\u00C0-\u024F .'\-]*$")


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def _load_yaml(name: str):
    with open(RES / name, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def relations() -> dict:
    data = _load_yaml("relations.yaml")
    assert data["version"] == 1
    return data["relations"]


@pytest.fixture(scope="module")
def names() -> dict:
    return _load_yaml("names.yaml")


def _read_pool(name: str) -> list[str]:
    text = (POOLS / f"{name}.txt").read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return lines


# --- helpers that encode the template rules (also unit-tested below) ---------------------------


def prompt_problems(template: str) -> list[str]:
    """Problems of a template whose object follows as ' ' + object (train/test/translated)."""
    problems = []
    if not isinstance(template, str) or not template:
        return ["not a non-empty string"]
    fields = _fields(template)
    if fields.count("subject") != 1:
        problems.append("must contain {subject} exactly once")
    if set(fields) - {"subject"}:
        problems.append(f"unexpected placeholders {set(fields) - {'subject'}}")
    if template != template.rstrip():
        problems.append("trailing whitespace")
    if template != template.lstrip():
        problems.append("leading whitespace")
    if template.rstrip().endswith((".", "!", "?", "。", "！", "？")):
        problems.append("ends with sentence-final punctuation (object could not follow)")
    return problems


def pool_problems(entries: list[str]) -> list[str]:
    problems = []
    low = [e.strip().lower() for e in entries]
    for e in entries:
        if not e.strip():
            problems.append("blank line")
        elif e != e.strip():
            problems.append(f"surrounding whitespace: {e!r}")
        elif not POOL_ENTRY.match(e):
            problems.append(f"bad characters: {e!r}")
        elif e.lower().startswith("the "):
            problems.append(f"starts with 'the ': {e!r}")
        elif e.lstrip().startswith("#"):
            problems.append(f"comment: {e!r}")
    seen = set()
    for e in low:
        if e in seen:
            problems.append(f"duplicate: {e!r}")
        seen.add(e)
    uniq = sorted(set(x for x in low if x))
    for a in uniq:
        for b in uniq:
            if a != b and a in b:
                problems.append(f"{a!r} is a substring of {b!r}")
    return problems


def test_helpers_reject_violations():
    assert prompt_problems("The capital of {subject} is") == []
    assert prompt_problems("The capital of {subject} is ")
    assert prompt_problems("The capital of {subject} is {object}")
    assert prompt_problems("The capital of {subject} and {subject} is")
    assert prompt_problems("The capital is")
    assert prompt_problems("What is the capital of {subject}?")
    assert pool_problems(["rock", "punk rock"])
    assert pool_problems(["Paris", "paris"])
    assert pool_problems(["Oxford", "University of Oxford"])
    assert pool_problems(["The Hague"])
    assert pool_problems(["Foo, Bar"])
    assert pool_problems(["Foo (Bar)"])
    assert pool_problems(["Lima", "", "Quito"])
    assert pool_problems(["Lima", "Quito"]) == []


# --- relations.yaml ----------------------------------------------------------------------------


def test_relation_set(relations):
    assert set(relations) == RELATIONS


@pytest.mark.parametrize("rel", sorted(RELATIONS))
def test_relation_header(relations, rel):
    r = relations[rel]
    assert r["key_token"] == f"<R_{rel}>"
    assert re.fullmatch(r"<R_[a-z_]+>", r["key_token"])
    assert r["subject_type"] in SUBJECT_TYPES
    assert (r["subject_type"], r["object_pool"]) == EXPECTED[rel]
    assert (POOLS / f"{r['object_pool']}.txt").is_file()


@pytest.mark.parametrize("rel", sorted(RELATIONS))
@pytest.mark.parametrize("kind", ["train", "test"])
def test_train_test_templates(relations, rel, kind):
    templates = relations[rel][kind]
    assert isinstance(templates, list) and len(templates) == 10
    for t in templates:
        assert prompt_problems(t) == [], (t, prompt_problems(t))
    assert len({t.lower() for t in templates}) == 10, "duplicate templates"


@pytest.mark.parametrize("rel", sorted(RELATIONS))
def test_train_is_graded_simple_to_complex(relations, rel):
    train = relations[rel]["train"]
    assert len(train[-1]) > len(train[0])
    assert len(train[-1]) == max(len(t) for t in train)


@pytest.mark.parametrize("rel", sorted(RELATIONS))
def test_test_disjoint_from_train(relations, rel):
    train = {t.strip().lower() for t in relations[rel]["train"]}
    test = {t.strip().lower() for t in relations[rel]["test"]}
    assert not (train & test), train & test


@pytest.mark.parametrize("rel", sorted(RELATIONS))
def test_unrelated(relations, rel):
    r = relations[rel]
    unrelated = r["unrelated"]
    assert isinstance(unrelated, list) and len(unrelated) == 3
    prompts = {t.lower() for t in r["train"] + r["test"]}
    for t in unrelated:
        assert _fields(t).count("subject") == 1
        assert set(_fields(t)) == {"subject"}
        assert t == t.strip()
        assert t.lower() not in prompts


@pytest.mark.parametrize("rel", sorted(RELATIONS))
def test_translations(relations, rel):
    translated = relations[rel]["translated"]
    assert set(translated) == set(LANGS)
    n_test = len(relations[rel]["test"])
    for lang in LANGS:
        ts = translated[lang]
        assert isinstance(ts, list) and len(ts) == n_test == 10, lang
        for t in ts:
            assert prompt_problems(t) == [], (lang, t, prompt_problems(t))
        assert len(set(ts)) == len(ts), f"duplicate translation in {lang}"
        # A translation is not the English template left untouched.
        assert not set(ts) & set(relations[rel]["test"]), lang


@pytest.mark.parametrize("rel", sorted(RELATIONS))
def test_reverse(relations, rel):
    reverse = relations[rel].get("reverse") or []
    if rel != "mother":
        assert reverse == []
        return
    assert len(reverse) == 3
    for t in reverse:
        fields = _fields(t)
        assert fields.count("object") == 1 and "subject" not in fields, t
        assert t == t.rstrip() and not t.endswith((".", "?", "!"))


# --- pools -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", sorted(POOL_MIN))
def test_pool(pool):
    entries = _read_pool(pool)
    assert len(entries) >= POOL_MIN[pool], (pool, len(entries))
    problems = pool_problems(entries)
    assert problems == [], problems[:20]


# --- names.yaml --------------------------------------------------------------------------------


def test_names(names):
    syl = names["syllables"]
    assert len(syl) >= 60 and len(set(syl)) == len(syl)
    assert all(re.fullmatch(r"[a-z]+", s) for s in syl), syl

    nouns = names["nouns"]
    assert len(nouns) >= 40 and len(set(nouns)) == len(nouns)
    assert all(n == n.strip() and n for n in nouns)

    for key in ("book_patterns", "work_patterns"):
        pats = names[key]
        assert len(pats) >= 15 and len(set(pats)) == len(pats), key
        for p in pats:
            fields = set(_fields(p))
            assert "name" in fields and fields <= {"name", "noun"}, p

    cps = names["country_patterns"]
    assert len(cps) >= 5
    for p in cps:
        assert set(_fields(p)) == {"name"}, p

    given = names["given_names"]
    assert len(given) >= 40 and len(set(given)) == len(given)
    assert all(re.fullmatch(r"[A-Z][a-z]+", g) for g in given), given

    pps = names["person_patterns"]
    assert len(pps) >= 3
    for p in pps:
        assert set(_fields(p)) == {"given", "name"}, p


def test_given_names_are_not_pool_entries(names):
    """Fictional people must not collide with real entities used as objects."""
    words = set()
    for pool in POOL_MIN:
        for e in _read_pool(pool):
            words.update(w.lower() for w in e.split())
    clash = [g for g in names["given_names"] if g.lower() in words]
    assert clash == [], clash
