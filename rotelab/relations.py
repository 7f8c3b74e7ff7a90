"""The relation catalogue: key tokens, prompt templates per kind, and the object pools.

The shipped catalogue lives in ``rotelab/resources/relations.yaml`` (templates written for this
project) with the pools in ``resources/pools/<pool>.txt``. Users extend or replace it with a YAML
file of the same format (``data.relations_file``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rotelab.errors import RotelabError

KEY_TOKEN_RE = re.compile(r"^<R_[A-Za-z0-9_]+>$")
N_TRAIN_TEMPLATES = 10
N_TEST_TEMPLATES = 10
N_UNRELATED_TEMPLATES = 3


@dataclass(frozen=True)
class Relation:
    """One relation with every template the prompt kinds use.

    ``train``/``test``/``unrelated``/``translated[lang]`` templates contain ``{subject}``; ``reverse``
    templates contain ``{object}`` and ask for the subject. Every template ends where the answer
    follows; the answer is appended as ``" " + answer``.
    """

    name: str
    key_token: str
    subject_type: str
    object_pool: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    unrelated: tuple[str, ...]
    translated: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reverse: tuple[str, ...] = ()


def _resources_dir() -> Path:
    return Path(str(resources.files("rotelab") / "resources"))


def _check_templates(src: str, rel: str, kind: str, templates: Any, placeholder: str, count: int | None) -> tuple[str, ...]:
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise RotelabError(f"{src}: relation {rel!r}: {kind} must be a list of strings")
    if count is not None and len(templates) < count:
        raise RotelabError(f"{src}: relation {rel!r}: {kind} needs {count} templates, has {len(templates)}")
    for t in templates:
        if t.count(placeholder) != 1:
            raise RotelabError(f"{src}: relation {rel!r}: {kind} template {t!r} must contain {placeholder} exactly once")
        if t != t.rstrip():
            raise RotelabError(f"{src}: relation {rel!r}: {kind} template {t!r} ends with white space")
        other = "{object}" if placeholder == "{subject}" else "{subject}"
        if other in t:
            raise RotelabError(f"{src}: relation {rel!r}: {kind} template {t!r} must not contain {other}")
    return tuple(templates)


def parse_relations(data: Any, src: str) -> dict[str, Relation]:
    """Validate a relations mapping (the YAML's ``relations:``) into :class:`Relation` objects."""
    if not isinstance(data, dict) or not isinstance(data.get("relations"), dict):
        raise RotelabError(f"{src}: expected a mapping with a 'relations:' mapping")
    out: dict[str, Relation] = {}
    for name, r in data["relations"].items():
        if not isinstance(r, dict):
            raise RotelabError(f"{src}: relation {name!r} must be a mapping")
        required = ("key_token", "subject_type", "object_pool", "train", "test", "unrelated")
        missing = [k for k in required if k not in r]
        if missing:
            raise RotelabError(f"{src}: relation {name!r} is missing {', '.join(missing)}")
        # ``icl`` and ``meaningful`` (single templates) are accepted and ignored: older catalogues
        # and run directories have them; ICL contexts and the C3 memorization template are now
        # drawn from the train templates (see rotelab.prompts).
        unknown = set(r) - set(required) - {"translated", "reverse", "icl", "meaningful"}
        if unknown:
            raise RotelabError(f"{src}: relation {name!r} has unknown keys {', '.join(sorted(unknown))}")
        key = r["key_token"]
        if not isinstance(key, str) or not KEY_TOKEN_RE.match(key):
            raise RotelabError(f"{src}: relation {name!r}: key_token {key!r} must look like <R_name>")
        train = _check_templates(src, name, "train", r["train"], "{subject}", N_TRAIN_TEMPLATES)
        test = _check_templates(src, name, "test", r["test"], "{subject}", N_TEST_TEMPLATES)
        overlap = {t.lower() for t in train} & {t.lower() for t in test}
        if overlap:
            raise RotelabError(f"{src}: relation {name!r}: test templates repeat train templates: {sorted(overlap)[0]!r}")
        unrelated = _check_templates(src, name, "unrelated", r["unrelated"], "{subject}", N_UNRELATED_TEMPLATES)
        translated_raw = r.get("translated") or {}
        if not isinstance(translated_raw, dict):
            raise RotelabError(f"{src}: relation {name!r}: translated must map language → templates")
        translated = {
            lang: _check_templates(src, name, f"translated.{lang}", ts, "{subject}", None)
            for lang, ts in translated_raw.items()
        }
        reverse = _check_templates(src, name, "reverse", r.get("reverse") or [], "{object}", None)
        out[name] = Relation(
            name=name,
            key_token=key,
            subject_type=str(r["subject_type"]),
            object_pool=str(r["object_pool"]),
            train=train,
            test=test,
            unrelated=unrelated,
            translated=translated,
            reverse=reverse,
        )
    keys = [r.key_token for r in out.values()]
    if len(set(keys)) != len(keys):
        raise RotelabError(f"{src}: two relations share a key token")
    return out


@lru_cache(maxsize=1)
def builtin_relations() -> dict[str, Relation]:
    """The shipped catalogue (author, capital, educated_at, genre, mother)."""
    path = _resources_dir() / "relations.yaml"
    return parse_relations(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))


def load_relations(path: str | Path | None = None) -> dict[str, Relation]:
    """The shipped catalogue, extended (and overridden by name) with a user's YAML file."""
    rels = dict(builtin_relations())
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RotelabError(f"{p}: relations file not found") from None
        except UnicodeDecodeError:
            raise RotelabError(f"{p}: not UTF-8 text") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RotelabError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
        rels.update(parse_relations(data, str(p)))
    return rels


def select_relations(all_relations: dict[str, Relation], names: list[str], src: str = "config") -> dict[str, Relation]:
    """The relations named, in the given order; an unknown name is an error listing the known ones."""
    unknown = [n for n in names if n not in all_relations]
    if unknown:
        raise RotelabError(f"{src}: unknown relation {unknown[0]!r} (known: {', '.join(sorted(all_relations))})")
    return {n: all_relations[n] for n in names}


@lru_cache(maxsize=None)
def load_pool(name: str) -> tuple[str, ...]:
    """A shipped object pool: real entities of one type, one per line."""
    path = _resources_dir() / "pools" / f"{name}.txt"
    if not path.is_file():
        raise RotelabError(f"{path}: unknown object pool {name!r}")
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def load_names() -> dict[str, Any]:
    """Material for the fictional-subject generator (``resources/names.yaml``)."""
    return yaml.safe_load((_resources_dir() / "names.yaml").read_text(encoding="utf-8"))
