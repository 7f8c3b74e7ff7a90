"""Facts: (subject, relation, object) triples with their multiple-choice distractors.

A fact file is JSONL (one object per line) or CSV with the fields ``id``, ``relation``, ``subject``,
``object`` and ``alternatives`` (99 distractors; in CSV one column joined by ``|``). Generated facts
use fictional subjects and real objects drawn from the relation's pool; the same seed gives a
byte-identical file.

Distractor rules (the paper's data broke the last one: "usa" vs "usa network"): same type (drawn
from the object's pool), unique, never equal to the object, never a substring of the object (or the
object of them), never a substring of one another — all compared case-insensitively.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from rotelab.errors import RotelabError
from rotelab.relations import Relation, load_pool
from rotelab.subjects import generate_subjects

FACT_FIELDS = ("id", "relation", "subject", "object", "alternatives")


@dataclass(frozen=True)
class Fact:
    id: str
    relation: str
    subject: str
    object: str
    alternatives: tuple[str, ...]

    def to_json(self) -> str:
        d = asdict(self)
        d["alternatives"] = list(self.alternatives)
        return json.dumps(d, ensure_ascii=False)


def _overlaps(a: str, b: str) -> bool:
    a, b = a.lower().strip(), b.lower().strip()
    return a in b or b in a


def clean_alternatives(obj: str, pool: list[str] | tuple[str, ...]) -> list[str]:
    """The pool entries that may serve as distractors for ``obj`` (rules in the module docstring)."""
    return [p for p in pool if not _overlaps(p, obj)]


def _pick_distractors(obj: str, pool: tuple[str, ...], n: int, rng: random.Random, relation: str) -> tuple[str, ...]:
    candidates = clean_alternatives(obj, pool)
    rng.shuffle(candidates)
    chosen: list[str] = []
    for c in candidates:
        if any(_overlaps(c, x) for x in chosen):
            continue
        chosen.append(c)
        if len(chosen) == n:
            return tuple(chosen)
    raise RotelabError(
        f"object pool of relation {relation!r} has only {len(chosen)} valid distractors for {obj!r}, need {n}"
    )


def generate_facts(
    relations: dict[str, Relation], facts_per_relation: int, seed: int, n_distractors: int = 99
) -> list[Fact]:
    """Deterministic facts for the given relations: fictional subjects, real objects, distractors.

    Objects are drawn without replacement while the pool lasts. Subjects are unique across all
    relations and never equal to any pool entry.
    """
    rng = random.Random(seed)
    exclude: set[str] = set()
    for rel in relations.values():
        exclude.update(load_pool(rel.object_pool))
    facts: list[Fact] = []
    for name, rel in relations.items():
        pool = load_pool(rel.object_pool)
        subjects = generate_subjects(rel.subject_type, facts_per_relation, rng, exclude)
        exclude.update(subjects)
        order = list(pool)
        rng.shuffle(order)
        for i, subject in enumerate(subjects):
            obj = order[i % len(order)]
            alts = _pick_distractors(obj, pool, n_distractors, rng, name)
            facts.append(Fact(f"{name}-{i:04d}", name, subject, obj, alts))
    return facts


def validate_facts(facts: list[Fact], relations: dict[str, Relation], n_distractors: int, src: str) -> None:
    """Check every rule; the first violation raises a one-line :class:`RotelabError` naming ``src``."""
    ids: set[str] = set()
    subjects: set[tuple[str, str]] = set()
    for f in facts:
        where = f"{src}: fact {f.id!r}"
        if f.relation not in relations:
            raise RotelabError(f"{where}: unknown relation {f.relation!r} (known: {', '.join(sorted(relations))})")
        if f.id in ids:
            raise RotelabError(f"{where}: duplicate id")
        ids.add(f.id)
        key = (f.relation, f.subject.strip().lower())
        if key in subjects:
            raise RotelabError(f"{where}: duplicate subject {f.subject!r} for relation {f.relation!r}")
        subjects.add(key)
        for field_name in ("subject", "object"):
            if not getattr(f, field_name).strip():
                raise RotelabError(f"{where}: empty {field_name}")
        if len(f.alternatives) < n_distractors:
            raise RotelabError(f"{where}: {len(f.alternatives)} distractors, need {n_distractors}")
        seen: list[str] = []
        for a in f.alternatives:
            if not a.strip():
                raise RotelabError(f"{where}: empty distractor")
            if a.strip().lower() == f.object.strip().lower():
                raise RotelabError(f"{where}: distractor {a!r} equals the object")
            if _overlaps(a, f.object):
                raise RotelabError(f"{where}: distractor {a!r} and object {f.object!r} contain one another")
            for b in seen:
                if _overlaps(a, b):
                    raise RotelabError(f"{where}: distractors {b!r} and {a!r} are equal or contain one another")
            seen.append(a)


def _fact_from_record(rec: dict, where: str) -> Fact:
    missing = [k for k in FACT_FIELDS if k not in rec or rec[k] is None]
    if missing:
        raise RotelabError(f"{where}: missing field {missing[0]!r}")
    alts = rec["alternatives"]
    if isinstance(alts, str):
        alts = [a for a in alts.split("|")] if alts else []
    if not isinstance(alts, list) or not all(isinstance(a, str) for a in alts):
        raise RotelabError(f"{where}: alternatives must be a list of strings")
    for k in ("id", "relation", "subject", "object"):
        if not isinstance(rec[k], (str, int)):
            raise RotelabError(f"{where}: field {k!r} must be a string")
    return Fact(str(rec["id"]), str(rec["relation"]), str(rec["subject"]), str(rec["object"]), tuple(alts))


def read_facts(path: str | Path) -> list[Fact]:
    """Read facts from JSONL or CSV (by suffix). Errors name the file and the line."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RotelabError(f"{p}: facts file not found") from None
    except UnicodeDecodeError as err:
        raise RotelabError(f"{p}: not UTF-8 (byte {err.start}); save the file as UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    facts: list[Fact] = []
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for i, row in enumerate(reader, start=2):
            facts.append(_fact_from_record(row, f"{p}:{i}"))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise RotelabError(f"{p}:{i}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise RotelabError(f"{p}:{i}: each line must be a JSON object")
            facts.append(_fact_from_record(rec, f"{p}:{i}"))
    if not facts:
        raise RotelabError(f"{p}: no facts")
    return facts


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def relations_to_yaml(relations: dict[str, Relation]) -> str:
    """The catalogue format (``relations:`` mapping) for exactly these relations."""
    out = {}
    for name, r in relations.items():
        d = {
            "key_token": r.key_token,
            "subject_type": r.subject_type,
            "object_pool": r.object_pool,
            "train": list(r.train),
            "test": list(r.test),
            "unrelated": list(r.unrelated),
            "translated": {k: list(v) for k, v in r.translated.items()},
        }
        if r.reverse:
            d["reverse"] = list(r.reverse)
        out[name] = d
    return yaml.safe_dump({"version": 1, "relations": out}, allow_unicode=True, sort_keys=False, width=1000)


def write_dataset(out_dir: str | Path, facts: list[Fact], relations: dict[str, Relation]) -> None:
    """Write ``facts.jsonl`` and ``relations.yaml`` (the prompt sets used) into ``out_dir``.

    Both files are rendered in memory first and each replaced atomically.
    """
    out = Path(out_dir)
    facts_text = "".join(f.to_json() + "\n" for f in facts)
    rel_text = relations_to_yaml(relations)
    atomic_write_text(out / "relations.yaml", rel_text)
    atomic_write_text(out / "facts.jsonl", facts_text)


#: The split values of a fact (``Run.split``, the item tables' ``split`` column).
SPLITS = ("train", "validation", "test", "injected")
#: The two halves of the held-out facts (never trained in phase 2): ``validation`` is where a sweep
#: picks its hyper-parameters, ``test`` is what ``rotelab report`` reports.
HELDOUT_SPLITS = ("validation", "test")
#: The split value of every held-out fact in runs written before the validation/test split.
LEGACY_HELDOUT = "heldout"


def split_facts(
    facts: list[Fact], k: int, injected: int = 0, validation_fraction: float | None = 0.5, seed: int = 0
) -> dict[str, str]:
    """Phase-2 split: the first ``k`` facts of each relation (file order) are ``train``, the last
    ``injected`` of each relation are ``injected`` (ablation C1: memorized only after phase 2), and
    the rest — the held-out facts, never trained in phase 2 — are divided per relation into
    ``validation`` and ``test``: a seeded shuffle (``random.Random(f"{seed}/{relation}")``) of the
    relation's held-out facts, the first ``⌊validation_fraction × n + ½⌋`` of it validation.

    The paper (§4) reports on all held-out facts and picks no hyper-parameters on them; choosing
    phase-2 settings on the facts one then reports is leakage, so a sweep picks on ``validation``
    and reports ``test``. Default 50/50: both halves keep the same size (with k = 1 of 40 facts,
    19 and 20 facts per relation), so the test mean's variance is only twice the paper's.
    ``validation_fraction=None`` gives the legacy split (every held-out fact ``heldout``), which
    runs written before the split keep (see ``Run.split``).

    Returns ``{fact id: "train" | "validation" | "test" | "injected"}`` (or ``"heldout"``, legacy).
    """
    total: dict[str, int] = {}
    for f in facts:
        total[f.relation] = total.get(f.relation, 0) + 1
    seen: dict[str, int] = {}
    out: dict[str, str] = {}
    heldout: dict[str, list[str]] = {}
    for f in facts:
        n = seen.get(f.relation, 0)
        if n >= total[f.relation] - injected:
            out[f.id] = "injected"
        elif n < k:
            out[f.id] = "train"
        else:
            out[f.id] = LEGACY_HELDOUT
            heldout.setdefault(f.relation, []).append(f.id)
        seen[f.relation] = n + 1
    if validation_fraction is None:
        return out
    for rel, ids in heldout.items():
        order = list(ids)
        random.Random(f"{seed}/{rel}").shuffle(order)
        n_val = int(validation_fraction * len(order) + 0.5)  # rounded half up
        for i, fid in enumerate(order):
            out[fid] = "validation" if i < n_val else "test"
    return out


def split_mask(values, split: str):
    """bool array: which of ``values`` (split labels, e.g. an item table's ``split`` column) belong
    to ``split``. ``all`` is every item; ``heldout`` is the union of ``validation`` and ``test``
    (and the legacy ``heldout`` label of runs written before the validation/test split); any other
    name matches itself."""
    import numpy as np

    v = np.asarray(values).astype(str)
    if split == "all":
        return np.ones(v.shape, dtype=bool)
    if split == LEGACY_HELDOUT:
        return np.isin(v, [*HELDOUT_SPLITS, LEGACY_HELDOUT])
    return v == split


def split_names(values) -> list[str]:
    """The split names a per-split table of ``values`` has: ``all``, every label present (sorted)
    and ``heldout`` (validation ∪ test) where the labels are the new ones, so that readers of
    ``heldout`` see the same aggregate in new and legacy runs."""
    present = sorted({str(x) for x in values})
    extra = [LEGACY_HELDOUT] if any(s in HELDOUT_SPLITS for s in present) and LEGACY_HELDOUT not in present else []
    return ["all", *present, *extra]


def memorized_distractors(facts: list[Fact], n: int, seed: int) -> tuple[list[Fact], dict[str, int]]:
    """Facts whose distractors are the objects of *other* facts of the same relation
    (``data.distractors_from: memorized``), in a seeded random order per fact, keeping the
    module's rules (never the object, never overlapping it or one another). Where a relation has
    fewer than ``n`` usable objects, the rest is filled from the fact's own pool distractors (its
    current ``alternatives``, in order). A relation with a single fact is an error.

    Returns the new facts and ``{fact id: number of pool fillers}`` (only facts that needed any).
    """
    by_rel: dict[str, list[str]] = {}
    count: dict[str, int] = {}
    for f in facts:
        count[f.relation] = count.get(f.relation, 0) + 1
        objs = by_rel.setdefault(f.relation, [])
        if all(o.lower().strip() != f.object.lower().strip() for o in objs):
            objs.append(f.object)
    for rel, c in count.items():
        if c < 2:
            raise RotelabError(f"data.distractors_from: memorized needs at least two facts per relation; relation {rel!r} has {c}")
    out, filled = [], {}
    for f in facts:
        chosen: list[str] = []
        others = list(by_rel[f.relation])
        random.Random(f"{seed}/{f.id}").shuffle(others)
        for o in others:
            if not _overlaps(o, f.object) and not any(_overlaps(o, c) for c in chosen):
                chosen.append(o)
            if len(chosen) == n:
                break
        k = len(chosen)
        for a in f.alternatives:
            if len(chosen) == n:
                break
            if not _overlaps(a, f.object) and not any(_overlaps(a, c) for c in chosen):
                chosen.append(a)
        if len(chosen) < n:
            raise RotelabError(f"data.distractors_from: memorized: fact {f.id!r} has only {len(chosen)} distractors, need {n}")
        if len(chosen) > k:
            filled[f.id] = len(chosen) - k
        out.append(Fact(f.id, f.relation, f.subject, f.object, tuple(chosen)))
    return out, filled
