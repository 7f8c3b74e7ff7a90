"""Accuracy over the checkpoint series: object probability, multiple choice, generation.

:func:`evaluate_run` evaluates every (checkpoint × prompt kind) *unit* that is not yet in the store
and writes the per-item arrays of :data:`~rotelab.probe.accuracy_metrics.METRIC_ARRAYS` into the
kind's group (``[checkpoint, item]``), all of a unit in one ``write_item_arrays`` call (data first,
then one commit marker per array). A unit counts as done only when every array of it is committed,
so a killed run loses at most the unit it was writing. Results record the engine, its version, the
dtype, batch size, prefix-caching setting, :data:`~rotelab.probe.eval_units.EVAL_CODE_VERSION` and, for vLLM, how the weights
were loaded and how closely the swap check matched transformers (array attrs
``provenance/<checkpoint>`` and the latest at the top level).

**Stale units are recomputed.** Up to eval code version 1 (stores written before 2026-12-01, which
record no ``eval_code_version``), vLLM's in-place weight swap kept the first checkpoint's output
head on tied-embedding models (SmolLM2, Qwen2.5, GPT-2), so every vLLM result after the first
checkpoint of an eval invocation was computed with the wrong head. Old provenance does not say
which checkpoint an engine started on, so *every* unit whose provenance names vLLM (for scoring or
generation) and whose version is below :data:`~rotelab.probe.eval_units.VERIFIED_SWAP_VERSION`, and every committed unit
without provenance (a kill between the commit and the attrs), is recomputed, with a one-line
notice. ``redo=True`` (``rotelab eval --redo``) recomputes every selected unit.

Before anything is loaded or written, the whole request is validated: checkpoints and their
folders, the tokenizer's key tokens, and the tokenization of every answer and option (all kinds are
tokenized up front; the plans are reused for every checkpoint).

**Fused probe pass** (``capture=True``, what ``rotelab run`` does when it also captures): with HF
scoring, each unit's prompt pass (:mod:`rotelab.probe.prompt_pass`) also yields the capture states
capture still needs for that (checkpoint, kind); they are written first (slabs, final norm, attrs
``probe_pass/<checkpoint>``), then the unit's arrays (``provenance/<checkpoint>`` has
``probe_pass: fused``; ``separate`` otherwise). A kill between the two leaves the capture
committed and the unit to recompute.

**Sweep siblings:** a unit on a checkpoint linked from a sibling that already evaluated it with the
same questions and settings is copied from the sibling's store (:mod:`rotelab.probe.sibling_units`;
provenance ``copied_from``), not computed again.

See :mod:`rotelab.probe.accuracy_metrics` for the metric definitions and the tokenization rule.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rotelab.checkpoints import CheckpointEntry
from rotelab.errors import RotelabError
from rotelab.models import model_shape
from rotelab.prompts import answer_options
from rotelab.run import Run

from .accuracy_metrics import (
    KindPlan,
    finish_generation,
    generation_metrics,
    item_scores,
    plan_kind,
    stop_token_ids,
)
from .engines import resolve_engines
from .eval_units import EVAL_CODE_VERSION, VERIFIED_SWAP_VERSION, unit_done, unit_stale
from .icl_checkpoints import covers, icl_checkpoint_ids
from .prompt_pass import Generation, PassOutput
from .shard import Shard

def _check_checkpoint_dir(run: Run, e: CheckpointEntry) -> Path:
    d = run.checkpoint_dir(e)
    if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
        raise RotelabError(f"{d}: checkpoint folder of {e.id!r} has no weights (*.safetensors)")
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer_config.json").is_file():
        raise RotelabError(f"{d}: checkpoint folder of {e.id!r} has no tokenizer")
    try:
        for f in d.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    fh.read(1)
    except OSError as err:
        raise RotelabError(f"{d}: checkpoint folder of {e.id!r} is unreadable ({err.strerror})") from None
    return d


def select_checkpoints(run: Run, checkpoints: Sequence[str] | None, shard: Shard) -> list[CheckpointEntry]:
    """The checkpoints to evaluate, in series order (``checkpoints`` ids, then the shard)."""
    series = run.checkpoints()
    if not series:
        raise RotelabError(f"{run.index_path}: no checkpoints (train first)")
    pos = {e.id: i for i, e in enumerate(series)}
    if checkpoints:
        for c in checkpoints:
            if c not in pos:
                run.checkpoint(c)  # raises with the known ids
        wanted = set(checkpoints)
        series_sel = [e for e in series if e.id in wanted]
    else:
        series_sel = list(series)
    return [e for e in series_sel if pos[e.id] % shard.count == shard.index]


def select_kinds(run: Run, kinds: Sequence[str] | None) -> list[str]:
    have = run.kinds()
    chosen = list(kinds) if kinds else list(run.config.eval.kinds or have)
    for k in chosen:
        if k not in have:
            raise RotelabError(f"{run.root}: unknown prompt kind {k!r} (this run has: {', '.join(have)})")
    return chosen


def load_checked_tokenizer(run: Run, checkpoint_dir: Path):
    """The checkpoint's tokenizer; an error if it lacks the run's key tokens (phase1.mode key)."""
    from rotelab.models import load_tokenizer

    tok = load_tokenizer(str(checkpoint_dir))
    if run.config.phase1.mode == "key":
        vocab = tok.get_vocab()
        for rel, key in run.key_tokens().items():
            if key not in vocab or tok(key, add_special_tokens=False)["input_ids"] != [vocab[key]]:
                raise RotelabError(f"{checkpoint_dir}: tokenizer lacks the key token {key!r} of relation {rel!r}")
    return tok


def _tokenizer_bytes(d: Path) -> bytes:
    f = d / "tokenizer.json"
    return f.read_bytes() if f.is_file() else b""


def plan_run(run: Run, tokenizer, kinds: Sequence[str]) -> dict[str, KindPlan]:
    """Tokenized plans of the kinds (validates every answer and option)."""
    plans = {}
    for kind in kinds:
        items = run.items(kind)
        opts = answer_options(items, run.facts, kind, n_options=run.config.data.distractors + 1)
        plans[kind] = plan_kind(tokenizer, kind, list(items["text"]), list(items["object"]), opts)
    return plans


def _missing_units(
    run: Run, fingerprint: dict[str, str], entries: list[CheckpointEntry], kinds: list[str], *, redo: bool = False,
    icl_at: set[str] | None = None,
) -> tuple[list[tuple[CheckpointEntry, str]], int]:
    """``(units to compute, how many of them are committed but stale)`` without writing anything.

    A unit is computed when it is not committed, when :func:`unit_stale` says so, or (``redo``)
    always; ``icl_at`` (:func:`~rotelab.probe.icl_checkpoints.icl_checkpoint_ids`) leaves out the ICL kinds' units elsewhere.
    """
    pairs = [(e, k) for e in entries for k in kinds if covers(icl_at, k, e.id)]
    from rotelab.store import Store

    if not (run.store_path / "zarr.json").is_file():
        return pairs, 0
    st = Store.open(run.store_path, fingerprint=fingerprint, mode="r")
    have = set(st.kinds())
    groups = {k: st.kind(k) for k in kinds if k in have}
    todo, stale = [], 0
    for e, k in pairs:
        if k not in groups or not unit_done(groups[k], e.id):
            todo.append((e, k))
        elif redo or unit_stale(groups[k], e.id):
            todo.append((e, k))
            stale += 0 if redo else 1
    return todo, stale


class _Engines:
    """The backend per operation, started lazily on the first checkpoint and reused after."""

    def __init__(self, run: Run, engine: str) -> None:
        self.run = run
        self.score_name, self.gen_name, self.note = resolve_engines(engine)
        self._engines: dict[str, object] = {}

    def _make(self, name: str, checkpoint_dir: Path):
        ev, dtype = self.run.config.eval, self.run.config.model.dtype
        if name == "hf":
            from .engines.hf import HFEngine

            return HFEngine(dtype=dtype, batch_size=ev.batch_size, prompt_batch_size=self.run.config.capture.batch_size)
        from .engines.vllm_engine import VllmEngine

        return VllmEngine(
            checkpoint_dir,
            dtype=dtype,
            batch_size=ev.batch_size,
            gpu_memory_utilization=ev.gpu_memory_utilization,
            tensor_parallel_size=ev.tensor_parallel_size,
            enable_prefix_caching=ev.prefix_caching,
            seed=self.run.config.seed,
        )

    def get(self, name: str, checkpoint_dir: Path):
        eng = self._engines.get(name)
        if eng is None:
            eng = self._engines[name] = self._make(name, checkpoint_dir)
        eng.load(checkpoint_dir)
        return eng

    def close(self) -> None:
        for eng in self._engines.values():
            eng.close()
        self._engines.clear()


def _provenance(score_eng, gen_eng, probe_pass: str = "separate") -> dict[str, object]:
    prov: dict[str, object] = {
        "probe_pass": probe_pass,
        "engine": score_eng.name if score_eng.name == gen_eng.name else f"{score_eng.name} (scoring), {gen_eng.name} (generation)",
        "engine_version": score_eng.version if score_eng.version == gen_eng.version else f"{score_eng.version}; {gen_eng.version}",
        "dtype": score_eng.dtype,
        "batch_size": score_eng.batch_size,
        "prefix_caching": bool(score_eng.prefix_caching),
        "mc_scoring": getattr(score_eng, "scoring", "engine prefix cache"),
        "eval_code_version": EVAL_CODE_VERSION,
    }
    if hasattr(score_eng, "prompt_batch_size"):
        prov["prompt_batch_size"] = score_eng.prompt_batch_size
    for eng in {id(score_eng): score_eng, id(gen_eng): gen_eng}.values():
        if getattr(eng, "load_note", None) is not None:  # the vLLM engine: how the weights got there
            prov["vllm_weights"] = eng.load_note
            prov["vllm_check_diff"] = eng.check_diff
    return prov


def evaluate_unit(
    score_eng,
    gen_eng,
    tokenizer,
    plan: KindPlan,
    max_new_tokens: int,
    stops: Sequence[int],
    *,
    capture_layers: Sequence[int] | None = None,
    capture_final: bool = False,
) -> tuple[dict[str, np.ndarray], "PassOutput | None"]:
    """All metric arrays [item] of one kind on the engines' current checkpoint, and the prompt
    pass's output where the scoring engine is HF (None otherwise).

    HF scoring runs the prompt pass (:meth:`HFEngine.evaluate_plan`): scoring, generation (when
    the HF engine also generates) and, with ``capture_layers``/``capture_final``, the capture
    states of the same forward (the fused probe pass). Otherwise each engine does its operation.
    """
    out = None
    if hasattr(score_eng, "evaluate_plan"):
        gen = Generation(int(max_new_tokens), frozenset(int(s) for s in stops)) if gen_eng is score_eng else None
        lps, out = score_eng.evaluate_plan(plan, gen, layers=capture_layers, final_norm=capture_final)
        gen_ids = out.generated if gen is not None else gen_eng.generate(plan.gen_prompts, max_new_tokens, stops)
    else:
        lps = score_eng.score(plan.requests)
        gen_ids = gen_eng.generate(plan.gen_prompts, max_new_tokens, stops)
    scores = item_scores(plan, lps)
    stop_set = set(stops)
    texts = [finish_generation(tokenizer, ids, stop_set) for ids in gen_ids]
    return {**scores, **generation_metrics(plan.answers, texts)}, out


def _fusable(run: Run, engines: "_Engines") -> bool:
    """Whether capture can share evaluation's prompt pass: HF scoring, on the device capture
    would use (no ``capture.device_map``)."""
    import torch

    from .capture import capture_device

    cfg = run.config.capture
    if engines.score_name != "hf" or cfg.device_map is not None:
        return False
    want = torch.device(capture_device(cfg.device))
    have = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return want.type == have.type and (want.type == "cpu" or (want.index or 0) == (have.index or 0))


def evaluate_run(
    run: Run,
    *,
    engine: str | None = None,
    checkpoints: list[str] | None = None,
    kinds: list[str] | None = None,
    progress: bool = True,
    shard: Shard | str | None = None,
    redo: bool = False,
    capture: bool = False,
) -> pd.DataFrame:
    """Evaluate the missing (checkpoint × kind) units and return :func:`metrics_table` of the run.

    ``engine``: ``auto`` / ``vllm`` / ``hf`` (default ``config.eval.engine``); ``checkpoints``: ids
    (default: the whole series); ``kinds`` (default ``config.eval.kinds`` or all the run's kinds);
    ``shard``: ``"i/n"`` or :class:`Shard` — this process takes the checkpoints at series
    positions ≡ i (mod n) and writes only their cells; ``redo``: recompute the selected units even
    where they are committed and current.

    ``capture``: the fused probe pass (``rotelab run`` with both stages). Where the scoring engine
    is HF on capture's device, every unit computed here whose (checkpoint, kind) capture also
    still needs (:func:`rotelab.probe.capture.plan_capture` with the config's capture kinds and
    layers) takes its capture states from the same prompt forward and writes them (attrs
    ``probe_pass: fused`` on the slabs and the unit's arrays). Requires the kind's capture prompts
    (:func:`rotelab.tokenization.encode_prompt`) to equal its generation prompts, else that kind
    is left to the capture stage. What is left, :func:`rotelab.probe.capture_run` does after.
    """
    from rotelab.store import Store

    from .accuracy_tables import metrics_table

    shard = shard if isinstance(shard, Shard) else Shard.parse(shard)
    engine = engine or run.config.eval.engine
    engines = _Engines(run, engine)  # validates the engine name / availability first
    if engines.note and progress:
        print(f"rotelab eval: {engines.note}", file=sys.stderr)
    entries = select_checkpoints(run, checkpoints, shard)
    kind_list = select_kinds(run, kinds)
    all_entries = run.checkpoints()
    dirs = {e.id: _check_checkpoint_dir(run, e) for e in entries}
    if not entries:
        return metrics_table(run)
    first = dirs[entries[0].id]
    tokenizer = load_checked_tokenizer(run, first)
    for e in entries[1:]:  # every checkpoint must carry the same tokenizer (key tokens included)
        if _tokenizer_bytes(dirs[e.id]) != _tokenizer_bytes(first):
            load_checked_tokenizer(run, dirs[e.id])
    ids = [e.id for e in all_entries]
    fingerprint = run.fingerprint()
    icl_at = icl_checkpoint_ids(run, "eval") if checkpoints is None else None  # an explicit list is evaluated as asked
    todo, stale = _missing_units(run, fingerprint, entries, kind_list, redo=redo, icl_at=icl_at)
    if stale:
        print(
            f"rotelab eval: recomputing {stale} unit(s) of {run.store_path} whose vLLM results predate the "
            f"verified weight swap (eval code < {VERIFIED_SWAP_VERSION}; they used the first checkpoint's output head)",
            file=sys.stderr,
        )
    if not todo:
        return metrics_table(run)
    todo_kinds = [k for k in kind_list if any(kk == k for _, kk in todo)]
    plans = plan_run(run, tokenizer, todo_kinds)  # validates every answer/option before any write
    stops = stop_token_ids(tokenizer)
    n_layers = model_shape(first).n_layers

    from rotelab.runlock import store_layout_lock

    with store_layout_lock(run.root):  # shards started together: one at a time creates/grows the layout
        store = Store.open(run.store_path, fingerprint=fingerprint)
        groups = {
            k: store.ensure_kind(k, checkpoints=ids, layers=list(range(n_layers + 1)), items=run.items(k)) for k in todo_kinds
        }
    if not redo:  # units a sweep sibling computed on the same (linked) folder: copied, not recomputed
        from .sibling_units import copy_sibling_units

        copied = copy_sibling_units(run, groups, todo, plans, lambda src, k: plan_run(src, tokenizer, [k])[k])
        if copied:
            todo = [(e, k) for e, k in todo if (e.id, k) not in copied]
            if progress:
                print(f"rotelab eval: copied {len(copied)} unit(s) a sweep sibling computed on the same linked checkpoints", file=sys.stderr)
    cap_plan = None
    if capture and _fusable(run, engines):
        from rotelab.tokenization import encode_prompt

        from .capture import plan_capture

        ckinds = [k for k in (run.config.capture.kinds or run.kinds()) if k in todo_kinds]
        ckinds = [k for k in ckinds if [tuple(encode_prompt(tokenizer, t)) for t in run.items(k)["text"]] == list(plans[k].gen_prompts)]
        if ckinds:
            cap_plan = plan_capture(run, checkpoints=[e.id for e in entries], kinds=ckinds, shard=Shard())
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="eval", unit="unit", file=sys.stderr)
    try:
        for e in entries:
            units = [k for (ee, k) in todo if ee.id == e.id]
            if not units:
                continue
            score_eng = engines.get(engines.score_name, dirs[e.id])
            gen_eng = engines.get(engines.gen_name, dirs[e.id])
            if cap_plan is not None:
                from .capture import check_shape
                from .sites import ModelSites

                check_shape(ModelSites(score_eng.model), dirs[e.id], cap_plan.n_layers, cap_plan.hidden)
            for k in units:
                if bar is not None:
                    bar.set_postfix_str(f"{e.id} {k}")
                need = cap_plan.todo(e.id, k) if cap_plan is not None else None
                arrays, out = evaluate_unit(
                    score_eng, gen_eng, tokenizer, plans[k], run.config.eval.max_new_tokens, stops,
                    capture_layers=need[0] if need else None, capture_final=bool(need and need[1]),
                )
                prov = _provenance(score_eng, gen_eng, "fused" if need else "separate")
                if need and out is not None:  # capture first: the eval unit's commit is what a rerun checks
                    h = out.hidden if out.hidden is not None else np.empty((0, plans[k].n_items, cap_plan.hidden), np.float32)
                    cap_plan.write(e.id, k, need[0], h, out.final, need[1], "fused")
                groups[k].write_item_arrays(e.id, arrays, attrs={**prov, f"provenance/{e.id}": prov})
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        engines.close()
    table = metrics_table(run)
    if not table.empty:
        store.write_table("eval_summary", table)
    return table
