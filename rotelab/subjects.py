"""Fictional subjects, generated offline and deterministically from a seed.

Names are built from syllables (``resources/names.yaml``) into patterns per subject type (book,
country, person, work). The generator never returns a name twice and never one in ``exclude``
(the object pools, so a subject is never a real entity the study uses as an answer).
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from rotelab.errors import RotelabError
from rotelab.relations import load_names


def _invented_name(rng: random.Random, syllables: list[str]) -> str:
    n = rng.choice((2, 2, 3, 3, 3, 4))
    word = "".join(rng.choice(syllables) for _ in range(n))
    return word[:1].upper() + word[1:]


def _one_subject(kind: str, rng: random.Random, names: dict) -> str:
    syl = names["syllables"]
    name = _invented_name(rng, syl)
    noun = rng.choice(names["nouns"])
    given = rng.choice(names["given_names"])
    patterns = {
        "book": names["book_patterns"],
        "work": names["work_patterns"],
        "country": names["country_patterns"],
        "person": names["person_patterns"],
    }.get(kind)
    if patterns is None:
        raise RotelabError(f"unknown subject type {kind!r} (known: book, country, person, work)")
    return rng.choice(patterns).format(name=name, noun=noun, given=given)


def generate_subjects(kind: str, n: int, rng: random.Random, exclude: Iterable[str] = ()) -> list[str]:
    """``n`` unique fictional subjects of one type, none in ``exclude`` (compared case-insensitively).

    The same ``rng`` state gives the same list.
    """
    names = load_names()
    taken = {e.lower() for e in exclude}
    out: list[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise RotelabError(f"could not generate {n} unique {kind} subjects")
        s = _one_subject(kind, rng, names)
        if s.lower() in taken:
            continue
        taken.add(s.lower())
        out.append(s)
    return out
