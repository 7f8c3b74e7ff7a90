"""The train stage of a run: base checkpoint (with key tokens) → phase 1 → phase 2 → inject → baselines.

Every step does only what is missing, so ``train_run`` resumes a killed run. Series:

* ``main``: ``base``, ``p1-e01``…, ``p2-e01``… (phase 2 starts from ``phase2.start``), then with
  ``inject.facts_per_relation`` the injection stage ``inj-e01``… (ablation C1) from the last
  phase-2 point;
* ``sft`` (``baselines.sft``, the paper's SFT, §5/B.5): ``sft-e01``… — the base model trained on
  every memorized fact × the P phase-2 templates with phase 2's loss mask and schedule;
* ``sft-k`` (``baselines.sft_k``, *not* the paper's SFT): ``sftk-e01``… — phase 2's own data
  (k facts) from the base model, without phase 1.

Every point records ``total_tokens`` (:class:`rotelab.checkpoints.CheckpointEntry`), so accuracy
can be plotted against total training tokens (Fig. 5).

The index's extra fields record ``model`` (the config's model name), ``key_token_ids``
(``{token: id}``), ``phase1_key`` (see :func:`phase1_key`) and ``phase2_start``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import replace
from pathlib import Path

from rotelab.checkpoints import CheckpointEntry, read_index
from rotelab.config import Config
from rotelab.errors import RotelabError
from rotelab.facts import HELDOUT_SPLITS, LEGACY_HELDOUT
from rotelab.run import Run
from rotelab.train import engine as eng
from rotelab.train import series
from rotelab.train.data import inject_texts, make_examples, phase1_texts, phase2_texts
from rotelab.train.loop import Stage, plan_points, run_stage


def phase1_key(config: Config) -> str:
    """A hash of everything that determines the base checkpoint and phase 1: model, data, seed,
    phase1 and train settings (``train.keep_weights`` and ``train.deepspeed`` excluded, as for
    :data:`rotelab.config.NON_RESULT_KEYS`). Sibling runs with equal keys can share phase 1
    (:func:`import_phase1`)."""
    d = config.model_dump(mode="json")
    train = {k: v for k, v in d["train"].items() if k not in ("keep_weights", "deepspeed")}
    # the injected facts change the generated facts; the MC distractor source and the
    # validation/test division of the held-out facts change no training
    data = {k: v for k, v in d["data"].items() if k not in ("distractors_from", "validation_fraction")}
    payload = {"model": d["model"], "data": data, "seed": d["seed"], "phase1": d["phase1"], "train": train}
    if d["inject"]["facts_per_relation"]:
        payload["inject_facts"] = d["inject"]["facts_per_relation"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _rank() -> int:
    return eng.rank() if _dist_ready() else int(os.environ.get("RANK", "0"))


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _check_model(run: Run) -> None:
    """The run's existing checkpoints must come from the configured model."""
    extra = series.read_extra(run)
    have = extra.get("model")
    if run.index_path.is_file() and read_index(run.index_path) and have is not None and have != run.config.model.name:
        raise RotelabError(
            f"{run.index_path}: the run's checkpoints were trained from model {have!r}, the config asks for {run.config.model.name!r}; use another --run directory"
        )


def ensure_base_checkpoint(run: Run) -> CheckpointEntry:
    """Checkpoint 0 (``base``): the configured model with the key tokens added (phase1 mode ``key``),
    saved in ``model.dtype``. Written once; later calls check it and return its entry."""
    from rotelab.models import add_key_tokens, load_model

    run.ensure_data()
    _check_model(run)
    existing = {e.id: e for e in read_index(run.index_path)}
    if "base" in existing:
        return existing["base"]
    cfg = run.config
    if _rank() == 0:
        model, tok = load_model(cfg.model.name, "float32")
        tokens = list(run.key_tokens().values()) if cfg.phase1.mode == "key" else []
        ids = add_key_tokens(model, tok, tokens, cfg.model.key_token_init, cfg.seed) if tokens else {}
        path, sha = series.write_checkpoint_folder(run, "base", lambda d: series.save_weights(model, tok, d, cfg.model.dtype))
        entry = CheckpointEntry(id="base", phase="base", epoch=0.0, step=0, tokens_seen=0, loss=None, path=path, series="main", sha256=sha, total_tokens=0)
        series.update_index(run, [entry], model=cfg.model.name, key_token_ids=ids, phase1_key=phase1_key(cfg))
    if _dist_ready():
        eng.barrier()
    return run.checkpoint("base")


def _tokenizer(run: Run):
    from rotelab.models import load_tokenizer

    return load_tokenizer(run.checkpoint_dir("base"))


def phase1_stage(run: Run) -> Stage:
    cfg, p1 = run.config, run.config.phase1
    tok = _tokenizer(run)
    texts = phase1_texts(run.facts, run.relations, p1.mode, run.split)
    examples = make_examples(tok, texts, p1.loss_mask, cfg.train.max_length)
    return Stage.of("phase1", "p1", "main", examples, p1, run.checkpoint_dir("base"))


def phase2_start_id(run: Run) -> str:
    """The checkpoint phase 2 starts from: ``phase2.start`` (``last`` = the last phase-1 point, or
    ``base`` without phase 1); an id that phase 1 will not produce is an error."""
    cfg = run.config
    planned = ["base"] + [pid for pid, _ in plan_points(_phase1_shape(run))]
    start = cfg.phase2.start
    if start == "last":
        return planned[-1]
    if start not in planned:
        shown = ", ".join(planned if len(planned) <= 6 else planned[:3] + ["…"] + planned[-2:])
        raise RotelabError(f"{run.config_path}: phase2.start {start!r} is not a checkpoint of phase 1 ({shown})")
    return start


def _phase1_shape(run: Run) -> Stage:
    """A phase-1 stage without tokenized examples, only to plan its checkpoint ids."""
    p1 = run.config.phase1
    n = sum(1 for f in run.facts if run.split[f.id] != "injected")
    dummy = [None] * n  # type: ignore[list-item]
    return Stage.of("phase1", "p1", "main", dummy, p1, Path("."))


#: The splits the paper's SFT baseline trains: every fact phase 1 memorizes (legacy runs' ``heldout`` too).
SFT_SPLITS = ("train", *HELDOUT_SPLITS, LEGACY_HELDOUT)


def _phase2_examples(run: Run, splits: tuple[str, ...] = ("train",)):
    """Phase 2's examples (``splits=("train",)``), or the paper's SFT data (``SFT_SPLITS``:
    every fact phase 1 memorizes, through the same P templates)."""
    cfg, p2 = run.config, run.config.phase2
    tok = _tokenizer(run)
    texts = phase2_texts(run.facts, run.relations, run.split, p2.prompts, p2.kind, p2.repurpose,
                         phase1_mode=cfg.phase1.mode, splits=splits)
    return make_examples(tok, texts, p2.loss_mask, cfg.train.max_length)


def total_tokens(run: Run, ckpt_id: str) -> int:
    """``total_tokens`` of a listed point (older indexes: the sum of ``tokens_seen`` of the main
    series up to it, which is the same number)."""
    entries = run.checkpoints()
    e = run.checkpoint(ckpt_id)
    if e.total_tokens is not None:
        return e.total_tokens
    main = [x for x in entries if x.series == e.series]
    upto = main[: main.index(e) + 1]
    last: dict[str, int] = {}
    for x in upto:
        last[x.phase] = x.tokens_seen
    return sum(last.values())


def train_phase1(run: Run, *, progress: bool = True) -> list[CheckpointEntry]:
    """Phase 1 (rote memorization) from ``base``; returns its entries (resumes if interrupted)."""
    ensure_base_checkpoint(run)
    if run.config.phase1.epochs == 0:
        return []
    return run_stage(run, phase1_stage(run), progress=progress)


def train_phase2(run: Run, start: str | None = None, *, progress: bool = True) -> list[CheckpointEntry]:
    """Phase 2 (generalization) from checkpoint ``start`` (default: :func:`phase2_start_id`).

    The start checkpoint must be listed with its weights; a run whose phase 2 already started from
    another checkpoint is an error.
    """
    p2 = run.config.phase2
    start = start or phase2_start_id(run)
    listed = {e.id: e for e in read_index(run.index_path)}
    if start not in listed or listed[start].series != "main" or listed[start].phase not in ("base", "phase1"):
        known = ", ".join(e.id for e in listed.values() if e.series == "main" and e.phase in ("base", "phase1")) or "none yet"
        raise RotelabError(f"{run.index_path}: phase-2 start checkpoint {start!r} does not exist (base and phase-1 points: {known})")
    prev = series.read_extra(run).get("phase2_start")
    if prev is not None and prev != start and any(e.phase == "phase2" for e in listed.values()):
        raise RotelabError(f"{run.index_path}: phase 2 of this run already started from {prev!r}, not {start!r}; use another --run directory")
    start_dir = run.checkpoint_dir(start)
    if _rank() == 0 and prev != start:
        series.update_index(run, phase2_start=start)
    stage = Stage.of("phase2", "p2", "main", _phase2_examples(run), p2, start_dir,
                     tokens_before=total_tokens(run, start))
    return run_stage(run, stage, progress=progress)


def train_inject(run: Run, *, progress: bool = True) -> list[CheckpointEntry]:
    """Ablation C1 (Appendix C, Fig. 9): memorize the ``injected`` facts with the key token only,
    starting from the last phase-2 point (a third stage of the ``main`` series, ``inj-e01``…)."""
    cfg, inj = run.config, run.config.inject
    p2_points = [e for e in run.checkpoints(series="main") if e.phase == "phase2"]
    if not p2_points:
        raise RotelabError(f"{run.index_path}: the inject stage starts from the last phase-2 checkpoint, and there is none yet")
    start = p2_points[-1]
    tok = _tokenizer(run)
    examples = make_examples(tok, inject_texts(run.facts, run.relations, run.split), inj.loss_mask, cfg.train.max_length)
    stage = Stage.of("inject", "inj", "main", examples, inj, run.checkpoint_dir(start),
                     tokens_before=total_tokens(run, start.id))
    return run_stage(run, stage, progress=progress)


def train_sft_baseline(run: Run, *, progress: bool = True) -> list[CheckpointEntry]:
    """The paper's SFT baseline (§5, Appendix B.5; series ``sft``): from ``base``, every fact
    phase 1 memorizes (``train``, ``validation`` and ``test`` — legacy runs: ``heldout``; not the
    ``injected`` ones) × the same P train
    templates as phase 2, ``"{train template} {object}"`` with phase 2's loss mask (object only by
    default), epochs, lr and batch size. B.5: "the same parameters … just changing the dataset"."""
    p2 = run.config.phase2
    ensure_base_checkpoint(run)
    stage = Stage.of("sft", "sft", "sft", _phase2_examples(run, SFT_SPLITS), p2, run.checkpoint_dir("base"))
    return run_stage(run, stage, progress=progress)


def train_sft_k_baseline(run: Run, *, progress: bool = True) -> list[CheckpointEntry]:
    """Not the paper's SFT (series ``sft-k``): phase 2's own data and settings (k facts × P
    templates) from ``base``, without phase 1 — what phase 2 alone does."""
    p2 = run.config.phase2
    ensure_base_checkpoint(run)
    stage = Stage.of("sft-k", "sftk", "sft-k", _phase2_examples(run), p2, run.checkpoint_dir("base"))
    return run_stage(run, stage, progress=progress)


def validate(run: Run) -> None:
    """Check the run's inputs before any training (one-line errors): relations, k, phase-2 start,
    model of existing checkpoints."""
    run.ensure_data()  # unknown relations, k > facts
    counts: dict[str, int] = {}
    for f in run.facts:
        counts[f.relation] = counts.get(f.relation, 0) + 1
    for name in run.config.data.relations:
        if name not in counts:
            raise RotelabError(f"{run.config_path}: relation {name!r} has no facts")
        if run.config.phase2.enabled and counts[name] < run.config.phase2.k:
            raise RotelabError(f"{run.config_path}: relation {name!r} has {counts[name]} facts, fewer than phase2.k={run.config.phase2.k}")
    for src, dst in run.config.phase2.repurpose.items():
        for r in (src, dst):
            if r not in run.relations:
                raise RotelabError(f"{run.config_path}: phase2.repurpose names unknown relation {r!r}")
    if run.config.phase2.enabled:
        phase2_start_id(run)
    _check_model(run)


def planned_points(run: Run) -> list[str]:
    """Every checkpoint id the train stage will have written when done: ``base``, phase 1,
    phase 2, inject and the baselines (from example counts, without tokenizing)."""
    cfg = run.config
    facts, rels, split = run.facts, run.relations, run.split

    def shape(name, prefix, n, sec) -> Stage:
        return Stage(name, prefix, "", [None] * n, sec.epochs, sec.lr, sec.weight_decay, sec.batch_size, sec.grad_accum, sec.save_every, Path("."))  # type: ignore[list-item]

    ids = ["base"]
    if cfg.phase1.epochs:
        ids += [pid for pid, _ in plan_points(_phase1_shape(run))]
    p2 = cfg.phase2

    def p2_count(splits: tuple[str, ...]) -> int:
        return len(phase2_texts(facts, rels, split, p2.prompts, p2.kind, p2.repurpose, phase1_mode=cfg.phase1.mode, splits=splits))

    if p2.enabled:
        ids += [pid for pid, _ in plan_points(shape("phase2", "p2", p2_count(("train",)), p2))]
    if cfg.inject.facts_per_relation:
        ids += [pid for pid, _ in plan_points(shape("inject", "inj", len(inject_texts(facts, rels, split)), cfg.inject))]
    if cfg.baselines.sft:
        ids += [pid for pid, _ in plan_points(shape("sft", "sft", p2_count(("train", "heldout")), p2))]
    if cfg.baselines.sft_k:
        ids += [pid for pid, _ in plan_points(shape("sft-k", "sftk", p2_count(("train",)), p2))]
    return ids


def disk_estimate(run: Run) -> str:
    """One line before training: planned checkpoints × parameters × bytes per parameter
    (``model.dtype``), counted from the ``base`` checkpoint's safetensors header (embedding rows
    of the added key tokens included), plus how many are already written or linked."""
    from safetensors import safe_open

    from rotelab.checkpoints import read_index

    n_params = 0
    for f in sorted(run.checkpoint_dir("base").glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                n_params += math.prod(fh.get_slice(k).get_shape())
    nbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[run.config.model.dtype]
    points = planned_points(run)
    listed = {e.id: e for e in read_index(run.index_path)}
    linked = sum(1 for pid in points if pid in listed and listed[pid].path and (run.root / listed[pid].path).is_symlink())
    per = n_params * nbytes
    keep = run.config.train.keep_weights
    return (f"disk: {len(points)} checkpoints × {n_params / 1e6:.1f}M parameters × {nbytes} bytes ({run.config.model.dtype}) "
            f"= {len(points) * per / 1e9:.2f} GB ({per / 1e6:.0f} MB each; {linked} shared with a sibling; "
            f"train.keep_weights: {keep})")


def train_run(run: Run, *, progress: bool = True, note=print) -> list[CheckpointEntry]:
    """Everything the train stage still misses: data, base, phase 1, phase 2, baselines.
    Returns the whole series (all series, index order). ``note`` gets the disk estimate
    (:func:`disk_estimate`, rank 0) before any stage trains."""
    validate(run)
    series.verify_last_points(run)
    eng.init_distributed()
    ensure_base_checkpoint(run)
    if _rank() == 0:
        note(disk_estimate(run))
    train_phase1(run, progress=progress)
    if run.config.phase2.enabled:
        train_phase2(run, progress=progress)
    if run.config.inject.facts_per_relation:
        train_inject(run, progress=progress)
    if run.config.baselines.sft:
        train_sft_baseline(run, progress=progress)
    if run.config.baselines.sft_k:
        train_sft_k_baseline(run, progress=progress)
    return run.checkpoints()


def prune_consumed_weights(run: Run) -> list[str]:
    """The pipeline rule of ``train.keep_weights``: once eval, capture and the analyses (logit
    lens, patching) have read every checkpoint, drop the weights the setting does not keep; returns
    the ids dropped. ``rotelab run`` calls it after its ``analyze`` stage when the same invocation
    also ran ``eval`` and ``capture`` — never before, and never from ``rotelab train``.

    Always kept (what later stages and a new analysis may load): ``base`` (the patching target
    and the untrained reference), the configured ``analyses.patching.checkpoints`` and ``analyses.causal_trace.checkpoints``, every folder a
    sweep sibling links to, and with ``latest``/an int the phase-2 start and the last point of
    every stage (the inject stage starts from the last phase-2 point), with ``final`` the last
    point of every series only (the smallest set: a finished run needs no phase-2 start). A result a later
    command asks for on a dropped checkpoint is an error naming ``train.keep_weights``.
    """
    keep = run.config.train.keep_weights
    if keep == "all":
        return []
    protected = set()
    start = series.read_extra(run).get("phase2_start")
    if start and keep != "final":
        protected.add(str(start))
    if run.config.analyses.patching.enabled and run.config.analyses.patching.checkpoints:
        protected |= {run.checkpoint(c).id for c in run.config.analyses.patching.checkpoints}
    if run.config.analyses.causal_trace.enabled and run.config.analyses.causal_trace.checkpoints:
        protected |= {run.checkpoint(c).id for c in run.config.analyses.causal_trace.checkpoints}
    return series.prune_weights(run, keep, protected)


def import_phase1(run: Run, source: Run) -> list[CheckpointEntry]:
    """Make ``run`` reuse ``source``'s base and phase-1 checkpoints (relative symlinks to its
    folders, copied index entries) instead of training them; the :func:`phase1_key` of both configs must match and
    ``source``'s phase 1 must be complete. Returns the imported entries."""
    key = phase1_key(run.config)
    if phase1_key(source.config) != key:
        raise RotelabError(f"{source.root}: cannot import phase 1, its model/data/seed/phase1/train settings differ from {run.root}'s")
    src_entries = [e for e in source.checkpoints(series="main") if e.phase in ("base", "phase1")]
    planned = ["base"] + [pid for pid, _ in plan_points(_phase1_shape(run))]
    have = [e.id for e in src_entries]
    if have != planned:
        raise RotelabError(f"{source.index_path}: phase 1 of {source.root} is not complete ({len(have)} of {len(planned)} points)")
    own = {e.id: e for e in run.checkpoints()}
    if any(e.phase not in ("base", "phase1") for e in own.values()):
        raise RotelabError(f"{run.index_path}: run already has later checkpoints; import phase 1 into a fresh run")
    run.ensure_data()
    run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for e in src_entries:
        path = None
        if e.path is not None:
            target = (source.root / e.path).resolve()
            link = run.checkpoints_dir / e.id
            if link.is_symlink() or link.exists():
                if not (link.is_symlink() and link.resolve() == target):
                    raise RotelabError(f"{link}: run already has its own checkpoint {e.id!r}")
            else:
                # relative: the link survives moving or copying the runs folder as a whole
                link.symlink_to(os.path.relpath(target, link.parent.resolve()), target_is_directory=True)
            path = str(link.relative_to(run.root))
        out.append(replace(e, path=path))
    extra = series.read_extra(source)
    series.update_index(run, out, model=extra.get("model", run.config.model.name), key_token_ids=extra.get("key_token_ids", {}), phase1_key=key)
    return out
