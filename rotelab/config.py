"""The typed config schema of a rotelab run, loaded from YAML.

One config describes one run (or, with ``sweep``, a family of sibling runs). Every stage reads its
own section; unknown keys, wrong types and impossible combinations are errors that name the file
and the key.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from rotelab.errors import RotelabError

LossMask = Literal["full", "object", "subject+object"]
LANGUAGES = ("de", "es", "zh", "ja")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_NOT_RESULT = {"rotelab_result": False}


def setting(default: Any = PydanticUndefined, **kw: Any) -> Any:
    """A field that changes how a stage runs but not its results: a reused run may differ in it,
    and it is left out of the store's config fingerprint (:func:`non_result_keys`). Every other
    field changes results. On a section field, it marks every key of the section."""
    return Field(default, json_schema_extra=_NOT_RESULT, **kw)


Epochs = Annotated[int, Field(ge=1)]
LearningRate = Annotated[float, Field(gt=0)]
BatchSize = Annotated[int, Field(ge=1)]


class TrainingStageConfig(_Section):
    """The schedule every training stage has (phase 1, phase 2, the injection stage). The stages
    differ in their defaults of ``epochs``, ``lr``, ``batch_size`` and ``loss_mask``, which each
    declares; the constraints are the annotated types above."""

    epochs: Epochs
    lr: LearningRate
    batch_size: BatchSize
    grad_accum: int = Field(1, ge=1)
    loss_mask: LossMask
    weight_decay: float = Field(0.0, ge=0)
    save_every: int | Literal["epoch"] = "epoch"
    """``epoch`` or a number of optimizer steps between checkpoints."""


class ModelConfig(_Section):
    """Which model to start from and how to add the key tokens."""

    name: str = "tiny-llama"
    """``smollm2-135m`` (embedded), ``tiny-llama`` / ``tiny-llama-sp`` / ``tiny-gpt2`` /
    ``tiny-qwen2`` (random, for tests; see :mod:`rotelab.models`), a local HF folder, or a hub name."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    key_token_init: str = "normal"
    """``normal`` (default; paper B.4/C: each relation's key token gets its own seeded random row,
    normal with the embeddings' per-dimension mean and std), ``mean`` (every key token starts as the
    mean of the existing rows, i.e. all identical), or ``copy:<token>`` (a copy of an existing
    token's row)."""


class DataConfig(_Section):
    """Which facts the run uses."""

    relations: list[str] = Field(default_factory=lambda: ["author", "capital", "educated_at", "genre", "mother"])
    facts_per_relation: int = Field(100, ge=1)
    seed: int | None = None
    """Seed of the fact generator; defaults to the run's seed."""
    facts_file: str | None = None
    """Your own facts (JSONL or CSV) instead of generated ones."""
    relations_file: str | None = None
    """Your own relations/templates (YAML, same format as the shipped catalogue)."""
    distractors: int = Field(99, ge=1)
    languages: list[Literal["de", "es", "zh", "ja"]] = Field(default_factory=lambda: list(LANGUAGES))
    templates_per_kind: int | None = Field(None, ge=1)
    """Use only the first N templates of each prompt kind in evaluation and capture (None: all).
    Not applied to ``train`` (always exactly the P templates phase 2 trains) nor to ``meaningful``."""
    validation_fraction: float = Field(0.5, ge=0, lt=1)
    """Fraction of each relation's held-out facts (those phase 2 does not train) that form the
    ``validation`` split; the rest is ``test`` (seeded by the data seed; see
    :func:`rotelab.facts.split_facts`). A sweep picks hyper-parameters on validation and
    ``rotelab report`` reports test. 0: every held-out fact is test (nothing to pick on)."""
    distractors_from: Literal["pool", "memorized"] = "pool"
    """Where the multiple-choice distractors come from: ``pool`` (same-type entities of the
    relation's object pool, as in the paper; most were never seen in training) or ``memorized``
    (familiarity control, beyond the paper: the objects of *other* facts of the same relation, all
    seen in phase 1; where a relation has too few, the rest is filled from the pool and the number
    recorded in ``data/distractors.json``)."""


class Phase1Config(TrainingStageConfig):
    """Rote memorization: ``{subject} <R_rel> {object}`` with the ordinary next-token loss."""

    mode: Literal["key", "no_key", "meaningful"] = "key"
    """``key``: a new key token per relation; ``no_key`` (ablation C2): ``{subject} {object}``;
    ``meaningful`` (ablation C3): memorize with the relation's first train template (train-1)
    instead of the key token; phase 2 then trains the *next* P train templates (train-2, …), and
    train-1 is evaluated as its own prompt kind ``meaningful``."""
    epochs: Annotated[int, Field(ge=0)] = 20
    lr: LearningRate = 2e-4
    batch_size: BatchSize = 16
    loss_mask: LossMask = "full"


class Phase2Config(TrainingStageConfig):
    """Generalization: k facts per relation × P meaningful train prompts, loss on the object."""

    enabled: bool = True
    start: str = "last"
    """Phase-1 checkpoint id to start from, or ``last``."""
    k: int = Field(20, ge=1)
    """Facts per relation used for phase-2 training (the rest are held out)."""
    prompts: int = Field(1, ge=1, le=10)
    """P: the first P train templates of each relation (with ``phase1.mode: meaningful`` the P
    templates after train-1). The ``train`` prompt kind holds exactly these P templates."""
    epochs: Epochs = 5
    lr: LearningRate = 2e-5
    batch_size: BatchSize = 4
    loss_mask: LossMask = "object"
    repurpose: dict[str, str] = Field(default_factory=dict)
    """Repurposing experiment (paper §7): ``{key relation: template relation}`` teaches the key
    token of the first relation the train templates of the second."""
    kind: Literal["train", "reverse"] = "train"
    """Which templates phase 2 trains on: the relations' ``train`` templates, or (reversal
    experiment, paper Appendix G.1) their ``reverse`` templates, which ask for the subject."""


class InjectConfig(TrainingStageConfig):
    """Ablation C1 (paper Appendix C, Fig. 9): after phase 2, memorize *new* facts with the key
    token only (``{subject} <R_rel> {object}``, phase 1's loss) as a third stage of the ``main``
    series (checkpoints ``inj-e01``…), starting from the last phase-2 checkpoint. The new facts
    (split ``injected``) are in every prompt kind from the start, so their train/test accuracy is
    visible before and after the injection."""

    facts_per_relation: int = Field(0, ge=0)
    """New facts per relation (0: no injection stage): generated in addition to
    ``data.facts_per_relation``; with ``data.facts_file``, the last N facts of each relation."""
    epochs: Epochs = 20
    lr: LearningRate = 2e-4
    batch_size: BatchSize = 16
    loss_mask: LossMask = "full"


class BaselinesConfig(_Section):
    sft: bool = False
    """The paper's SFT baseline (§5, Appendix B.5): the *base* model trained directly on
    ``"{train template} {object}"`` for **all** facts of the relations, with the same P train
    templates, loss mask and schedule as phase 2 (series ``sft``, checkpoints ``sft-e01``…). It
    is compared on the test and translated prompts of those facts (every fact is an SFT training
    fact), with its own training tokens against phase 1 + phase 2's (Fig. 5)."""
    sft_k: bool = False
    """Not the paper's SFT: phase 2 alone from the base model (the same k facts per relation, P
    templates and schedule, no phase 1; series ``sft-k``, checkpoints ``sftk-e01``…). Its held-out
    facts were never trained in any form, so it measures what phase 1 contributes."""


class TrainConfig(_Section):
    deepspeed: str | None = setting(None)
    """A DeepSpeed JSON config; default: the shipped ZeRO-0 config on CPU, ZeRO-2 bf16 on GPU."""
    keep_weights: Literal["all", "latest", "final"] | int = setting("all")
    """Which weights ``rotelab run`` keeps once eval, capture and the analyses have read them
    (:func:`rotelab.train.pipeline.prune_consumed_weights`): all points, every n-th (an int) or
    ``latest`` (each plus base, the phase-2 start and the last point of every stage), or ``final``
    (base and the last point of every series only). Weights a sweep sibling links to are kept."""
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_length: int = Field(64, ge=8)
    """Longest training sequence in tokens; a longer one is an error (never silently cut)."""


class EvalConfig(_Section):
    engine: Literal["auto", "vllm", "hf"] = setting("auto")
    kinds: list[str] | None = setting(None)
    """Prompt kinds to evaluate; default: all kinds the run has."""
    icl_checkpoints: list[str] | None = setting(default_factory=lambda: ["base"])
    """Checkpoints at which ``rotelab eval`` evaluates the in-context-learning kinds (``icl``,
    ``icl-translated-*``) when no ``--checkpoints`` are given. The paper's ICL baseline is the base
    model with the fact in its context (§5 / B.5, Fig. 6), so the default is ``[base]``; ``null``
    evaluates them at every checkpoint like the other kinds (ICL on a trained checkpoint is no paper
    baseline, and it was 36 % of the demo's evaluation). An explicit ``--checkpoints`` list is
    evaluated as asked."""
    batch_size: int = setting(32, ge=1)
    """vLLM's batch, and the HF engine's ``score()`` batch for a request behind a prefix that is not
    its item's prompt. HF scoring and generation behind the prompts run in the prompt pass, whose
    batch is ``capture.batch_size``."""
    max_new_tokens: int = Field(16, ge=1)
    gpu_memory_utilization: float = setting(0.2, gt=0, le=1)
    """vLLM: fraction of GPU memory the engine reserves; on CPU, of the host memory node, less the
    weights, is the KV cache (:func:`rotelab.probe.engines.vllm_engine.cpu_kv_cache_bytes`)."""
    tensor_parallel_size: int = setting(1, ge=1)
    """vLLM: GPUs one engine spans (for models that need several)."""
    prefix_caching: bool = setting(True)
    """vLLM: automatic prefix caching for MC scoring (the options of a prompt share its cached blocks)."""


class CaptureConfig(_Section):
    """Hidden-state capture (``rotelab capture``): the last prompt token at every layer."""

    kinds: list[str] | None = setting(None)
    """Prompt kinds to capture; default: all kinds the run has."""
    layers: list[int] | None = setting(None)
    """Layers to capture (0 = embedding output, i = output of block i); default: all."""
    icl_checkpoints: list[str] | None = setting(None)
    """Checkpoints at which capture covers the in-context-learning kinds (``icl``,
    ``icl-translated-*``) when no ``--checkpoints`` are given. Default ``null``: every checkpoint
    (their representations over the whole series, for the analyses and the TUI); ``[base]``
    captures them where ``eval.icl_checkpoints`` evaluates them by default (the paper's ICL
    baseline, §5 / B.5), which the fused probe pass does at no extra cost; their slabs elsewhere
    stay empty (NaN in the analyses)."""
    batch_size: int = setting(32, ge=1)
    """Prompts per forward of the prompt pass (:mod:`rotelab.probe.prompt_pass`), the one forward
    capture, HF evaluation (scoring and generation) and the fused probe pass share: one batching,
    so each stage alone stores the same numbers as the fused pass. It changes float rounding only."""
    device: str = setting("auto")
    """``auto`` (``cuda:$LOCAL_RANK`` when CUDA is available, else ``cpu``), ``cpu``, ``cuda:1``, …"""
    device_map: str | None = setting(None)
    """Load each checkpoint sharded over the visible GPUs (a HF ``device_map`` such as ``auto`` or
    ``balanced``), for models larger than one GPU; overrides ``device``."""


class PatchingConfig(_Section):
    """The configured activation-patching sweep of ``rotelab analyze``
    (:data:`rotelab.analyses.patching.layer_sweep` within each checkpoint)."""

    enabled: bool = False
    source_kind: str = "key"
    target_kind: str = "test"
    items_per_relation: int = Field(4, ge=1)
    """Held-out target items per relation in the configured patching sweep."""
    checkpoints: list[str] | None = None
    """Checkpoints of the sweep (default: every main-series checkpoint whose weights are kept)."""
    layers: list[int] | None = None
    """Layers of the sweep (default: all, 0 = embeddings)."""
    metric: Literal["object_logprob", "object_prob", "first_token_logprob"] = "object_logprob"


class CausalTraceConfig(_Section):
    """Causal tracing over the series (:mod:`rotelab.analyses.causal_trace`, ROME §2.1)."""

    enabled: bool = True
    checkpoints: list[str] | None = None
    """Checkpoints traced (default: the stage checkpoints — base, last phase 1, last phase 2)."""
    kinds: list[str] = Field(default_factory=lambda: ["key", "test"])
    """Prompt kinds traced (kinds with one subject mention: not ICL)."""
    facts_per_relation: int = Field(1, ge=1)
    """Sampled facts (one template each) per relation and split, seeded by the run's seed (one keeps
    the demo's cost at ~2 min on 2 cores: every cell is a row of a batched forward)."""
    layers: list[int] | None = None
    """Sites ``resid[v]`` restored (default: every layer, 0 = embeddings)."""
    positions: list[Literal["subject_last", "key", "last", "all"]] = Field(default_factory=lambda: ["subject_last", "key", "last"])
    noise_scale: float = Field(3.0, ge=0)
    """ν = noise_scale × σ (σ: std of the subject tokens' embedding entries; ROME uses 3)."""
    samples: int = Field(1, ge=1)
    """Noise draws averaged per cell (ROME: 10)."""


class AnalysesConfig(_Section):
    projections: list[Literal["pca", "umap"]] = setting(default_factory=lambda: ["pca"])
    reference_checkpoint: str | None = setting(None)
    """Reference for ΔSimilarity of the key-token drift (default: the last phase-1 checkpoint)."""
    patching: PatchingConfig = setting(default_factory=PatchingConfig)
    """The configured patching sweep (a section: ``analyses.patching.enabled``, …)."""
    causal_trace: CausalTraceConfig = setting(default_factory=CausalTraceConfig)
    """Causal tracing of the stage checkpoints (a section: ``analyses.causal_trace.enabled``, …)."""
    projection_fit_on: str = setting("per-slab")
    """``per-slab`` (each checkpoint × layer fitted on its own) or a checkpoint id whose slab of the
    same layer the projection is fitted on and then applied to every checkpoint."""
    @model_validator(mode="before")
    @classmethod
    def _old_patching_keys(cls, data: Any) -> Any:
        """The flat ``patching_*`` keys (and ``patching: true``) of before the section: an error
        naming the new key."""
        if isinstance(data, dict):
            old = sorted(k for k in data if isinstance(k, str) and k.startswith("patching_"))
            if old:
                raise ValueError(f"analyses.{old[0]} is now analyses.patching.{old[0][len('patching_'):]}")
            if isinstance(data.get("patching"), bool):
                raise ValueError(f"analyses.patching is a section now: write analyses.patching.enabled: {str(data['patching']).lower()}")
        return data

    joint_kinds: list[str] = setting(default_factory=lambda: ["key", "train", "test"])
    """Kinds projected into one shared space (``proj_pca_joint`` in each of their groups)."""
    umap_layers: list[int] | None = setting(None)
    """Layers UMAP is computed for (slow); default: the last layer only. PCA covers all layers."""
    # where the fact lives (rotelab.analyses.where): logit lens, relation probes, CKA drift, onset
    logit_lens: bool = True
    """Logit lens of every captured slab (one model load per checkpoint; a matmul with the vocab)."""
    probes: bool = True
    probe_kinds: list[str] = Field(default_factory=lambda: ["key", "test"])
    """Kinds whose relation probe (``probe_relation_acc``) is fitted, every checkpoint × layer."""
    probe_transfer_kinds: list[str] = Field(default_factory=lambda: ["test"])
    """Kinds a probe trained on the key prompts is tested on (``probe_transfer_acc``)."""
    probe_folds: int = Field(5, ge=2)
    probe_C: float = Field(1.0, gt=0)
    cka: bool = True
    onset: bool = True
    onset_threshold: float = Field(0.5, gt=0, le=1)
    """A fact is correct at a checkpoint when at least this fraction of its templates generate the object."""


class Config(_Section):
    """A whole run."""

    name: str = setting("run")
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    phase1: Phase1Config = Field(default_factory=Phase1Config)
    phase2: Phase2Config = Field(default_factory=Phase2Config)
    inject: InjectConfig = Field(default_factory=InjectConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    analyses: AnalysesConfig = Field(default_factory=AnalysesConfig)
    sweep: dict[str, list[Any]] = setting(default_factory=dict)
    """Dotted key → list of values, e.g. ``{seed: [0, 1, 2], phase2.k: [1, 10]}``: expands into
    sibling runs (see :func:`expand_sweep`). The key ``case`` takes a list of named settings that
    change several keys together, ``[{name: C2, phase1.mode: no_key}, …]`` (siblings ``…-case=C2``),
    for variants that are no product of single keys (e.g. the ablations)."""

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError("must be a plain folder name")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        if self.data.facts_file is None and self.phase2.enabled and self.phase2.k > self.data.facts_per_relation:
            raise ValueError(
                f"phase2.k={self.phase2.k} is larger than data.facts_per_relation={self.data.facts_per_relation}"
            )
        if self.phase1.mode != "key" and self.phase2.repurpose:
            raise ValueError("phase2.repurpose needs phase1.mode 'key'")
        if self.inject.facts_per_relation and not self.phase2.enabled:
            raise ValueError("inject.facts_per_relation: the injection stage starts after phase 2, which is disabled (phase2.enabled: false)")
        if self.inject.facts_per_relation and self.phase1.mode != "key":
            raise ValueError("inject.facts_per_relation: injecting facts with the key token needs phase1.mode 'key'")
        for key, values in self.sweep.items():
            if key == SWEEP_CASE:
                _check_cases(values, self.model_dump())
                continue
            _get_dotted(self.model_dump(), key)  # raises KeyError for an unknown key
        return self

    def without_sweep(self) -> "Config":
        return self.model_copy(update={"sweep": {}})


#: The sweep key whose values are named settings of several keys (see ``Config.sweep``).
SWEEP_CASE = "case"


def _check_cases(values: Any, dumped: dict[str, Any]) -> None:
    if not isinstance(values, list) or not values:
        raise ValueError("sweep.case must be a non-empty list of {name: …, <dotted key>: value} mappings")
    names = set()
    for case in values:
        if not isinstance(case, dict) or not isinstance(case.get("name"), str) or not case["name"]:
            raise ValueError("sweep.case: every case is a mapping with a non-empty 'name'")
        if case["name"] in names or "=" in case["name"] or "/" in case["name"]:
            raise ValueError(f"sweep.case: case name {case['name']!r} is repeated or contains '=' or '/'")
        names.add(case["name"])
        for key in case:
            if key != "name":
                _get_dotted(dumped, key)


def _get_dotted(d: dict[str, Any], key: str) -> Any:
    cur: Any = d
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(key)
        cur = cur[part]
    return cur


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for part in parts[:-1]:
        cur = cur[part]
    cur[parts[-1]] = value


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def upgrade_stored_config(data: dict[str, Any]) -> dict[str, Any]:
    """A run's stored ``config.yaml`` from before ``analyses.patching`` became a section: its flat
    ``analyses.patching`` (bool) and ``analyses.patching_*`` keys are moved into the section. A
    stored config is the resolved dump of a valid config, so this is a rename, never a guess; a
    user's config file with the old keys is an error naming the new ones."""
    section = data.get("analyses") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        return data
    old = {k: section.pop(k) for k in [k for k in section if isinstance(k, str) and k.startswith("patching_")]}
    if isinstance(section.get("patching"), bool) or old:
        nested = {"enabled": bool(section.pop("patching", False))} if not isinstance(section.get("patching"), dict) else section.pop("patching")
        nested.update({k[len("patching_"):]: v for k, v in old.items()})
        section["patching"] = nested
    return data


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a plain dict; errors name ``source`` and the offending keys in one line."""
    if not isinstance(data, dict):
        raise RotelabError(f"{source}: a config must be a YAML mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise RotelabError(f"{source}: {_format_validation_error(err)}") from None
    except KeyError as err:
        raise RotelabError(f"{source}: sweep names an unknown key {err.args[0]!r}") from None


def load_config(path: str | Path) -> Config:
    """Load and validate a YAML config file. The config's name defaults to the file's stem."""
    p = Path(path)
    if not p.is_file():
        raise RotelabError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RotelabError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
    data = data or {}
    if isinstance(data, dict):
        data.setdefault("name", p.stem)
        section = data.get("data")
        if isinstance(section, dict):  # the user's files are relative to the config, not the cwd
            for key in ("facts_file", "relations_file"):
                if isinstance(section.get(key), str) and not Path(section[key]).expanduser().is_absolute():
                    section[key] = str((p.parent / section[key]).resolve())
    return config_from_dict(data, str(p))


def expand_sweep(config: Config) -> list[Config]:
    """Expand ``config.sweep`` into one config per combination, named ``<name>-<key>=<value>-…``
    (``<key>`` = the dotted key's last part; a ``case`` sets all its keys and names itself
    ``case=<name>``).

    Without a sweep, returns ``[config]``.
    """
    if not config.sweep:
        return [config]
    keys = list(config.sweep)
    base = config.without_sweep().model_dump()
    out = []
    for values in itertools.product(*(config.sweep[k] for k in keys)):
        d = copy.deepcopy(base)
        suffix = []
        for k, v in zip(keys, values):
            if k == SWEEP_CASE:
                for ck, cv in v.items():
                    if ck != "name":
                        _set_dotted(d, ck, cv)
                suffix.append(f"{k}={v['name']}")
                continue
            _set_dotted(d, k, v)
            suffix.append(f"{k.split('.')[-1]}={v}")
        d["name"] = f"{config.name}-" + "-".join(suffix)
        out.append(config_from_dict(d, f"sweep of {config.name}"))
    return out


def non_result_keys(model: type[BaseModel] | None = None, prefix: str = "") -> frozenset[str]:
    """Dotted keys declared with :func:`setting` (they change how a stage runs, not its results);
    a section declared so covers every key below it (see :func:`is_result_key`)."""
    model = Config if model is None else model
    out: set[str] = set()
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("rotelab_result") is False:
            out.add(key)
        elif isinstance(f.annotation, type) and issubclass(f.annotation, _Section):
            out |= non_result_keys(f.annotation, key + ".")
    return frozenset(out)


def is_result_key(key: str) -> bool:
    """Whether a dotted key changes results: neither it nor a section above it is a setting."""
    parts = key.split(".")
    return not any(".".join(parts[: i + 1]) in NON_RESULT_KEYS for i in range(len(parts)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("repurpose",):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def result_differences(stored: Config, given: Config) -> list[str]:
    """Dotted keys whose values differ between two configs and change results."""
    a, b = flatten(stored.model_dump()), flatten(given.model_dump())
    return sorted(k for k in set(a) | set(b) if is_result_key(k) and a.get(k) != b.get(k))


#: Keys that change how a stage runs but not its results (declared with :func:`setting`).
NON_RESULT_KEYS = non_result_keys()
