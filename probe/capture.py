"""Hidden-state capture: the last prompt token's hidden state at every layer, for every checkpoint
of a run and every prompt kind, into the run's zarr store.

* :func:`capture_hidden` — one loaded model, a list of prompts → ``hidden [layer, item, hidden]`` and
  ``final_norm [item, hidden]`` (float32 numpy). Prompts are tokenized exactly as evaluation scores
  them (:func:`rotelab.tokenization.encode_prompt`) and run by the prompt pass
  (:mod:`rotelab.probe.prompt_pass`): batched by length and padded on the *right* with position
  ids ``0..len-1`` (a causal model's real tokens never see the padding, so a batch equals one
  prompt at a time for rotary (Llama) and absolute-position (GPT-2) models alike), states read by
  forward hooks on the decoder's blocks.
* :func:`capture_run` — the stage (:func:`plan_capture` finds what is missing, :class:`CapturePlan`
  writes it): loads each checkpoint once, captures every requested kind, writes one ``(checkpoint,
  layer)`` slab at a time (chunk, then commit marker) and the final-norm entry. The fused probe
  pass (:func:`rotelab.probe.evaluate_run` ``capture=True``) writes through the same plan.
  It does only what is not committed yet, so a killed capture resumes where it stopped; several
  processes may capture disjoint checkpoints at once (``shard``).

Subsets of items (``items=``) write slabs whose other rows stay NaN (merged into what is already
committed). Such a slab is recorded as partial in the derived array ``capture_coverage``
[checkpoint, layer] (fraction of items present) *before* it is written, so a later full capture
redoes it; a full rewrite sets the fraction back to 1 after the slab.

Scale
-----
* A model larger than one GPU: ``capture.device_map: auto`` (any HF ``device_map``) loads each
  checkpoint sharded over the visible GPUs; inputs go to the embedding's device and every layer's
  last-token rows come back to the CPU.
* A long series on several GPUs/processes: each process captures the checkpoints whose position in
  the selected series ``% n == i`` and writes only their slabs (distinct chunks: safe for zarr)::

      rotelab capture RUN --shard 0/4 & rotelab capture RUN --shard 1/4 & …
      torchrun --nproc-per-node 4 -m rotelab.cli capture RUN      # RANK/WORLD_SIZE picked up
      deepspeed --num_gpus 4 --module rotelab.cli capture RUN     # likewise; LOCAL_RANK picks the GPU

  With ``capture.device: auto`` each process uses ``cuda:$LOCAL_RANK``. No process group is
  needed (there is no communication). When the checkpoint series has grown since the last
  capture, the first process to start extends the store's checkpoint coordinate; start one shard
  a few seconds before the others, or run ``rotelab capture RUN --checkpoints base`` once first.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rotelab.checkpoints import CheckpointEntry
from rotelab.errors import RotelabError
from rotelab.models import ModelShape, model_shape
from rotelab.tokenization import encode_prompt

from rotelab.batching import pad_id

from .icl_checkpoints import covers, icl_checkpoint_ids
from .prompt_pass import prompt_pass
from .shard import Shard
from .sites import ModelSites, check_layers

COVERAGE = "capture_coverage"


# --------------------------------------------------------------------------- one model


def capture_into(
    model: torch.nn.Module | ModelSites,
    tokenizer,
    texts: Sequence[str],
    layers: Sequence[int],
    hidden_out: np.ndarray,
    final_out: np.ndarray,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Fill ``hidden_out [len(layers), len(texts), hidden]`` (sites ``resid[v]``) and ``final_out
    [len(texts), hidden]`` (site ``final_norm``), any float dtype, with the last prompt token's
    states, by :func:`rotelab.probe.prompt_pass.prompt_pass` over the prompts tokenized with
    :func:`encode_prompt` (``batch_size`` prompts per forward); ``on_batch(n)`` after each batch.
    Pass a :class:`ModelSites` to reuse its layer lookup."""
    sites = model if isinstance(model, ModelSites) else ModelSites(model)
    layers = [int(x) for x in layers]
    if layers and (check_layers(layers, sites.n_layers, type(sites.model).__name__) != layers):
        raise RotelabError(f"capture_into: layers must be unique and ascending, got {layers}")
    if batch_size < 1:
        raise RotelabError(f"batch_size must be ≥ 1, got {batch_size}")
    ids = [encode_prompt(tokenizer, t) for t in texts]
    for t, x in zip(texts, ids):
        if not x:
            raise RotelabError(f"prompt {t!r} tokenizes to nothing")
    out = prompt_pass(sites, ids, pad_id=pad_id(tokenizer), batch_size=batch_size, layers=layers, final_norm=True, on_batch=on_batch)
    if layers:
        hidden_out[...] = out.hidden
    final_out[...] = out.final


def capture_hidden(
    model: torch.nn.Module | ModelSites,
    tokenizer,
    texts: list[str],
    layers: list[int] | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states of the last prompt token of each text.

    Returns ``(hidden float32 [layer, item, hidden], final_norm float32 [item, hidden])`` where the
    layer axis follows ``layers`` sorted ascending (default: all, ``0..n_layers``; the sites
    ``resid[v]`` of :mod:`rotelab.probe.sites`) and ``final_norm`` is the final normalization's output.
    """
    sites = model if isinstance(model, ModelSites) else ModelSites(model)
    layers = check_layers(layers, sites.n_layers, type(sites.model).__name__)
    hidden = np.empty((len(layers), len(texts), sites.hidden), dtype=np.float32)
    final = np.empty((len(texts), sites.hidden), dtype=np.float32)
    if texts:
        capture_into(sites, tokenizer, texts, layers, hidden, final, batch_size)
    return hidden, final


# --------------------------------------------------------------------------- the stage


def capture_device(spec: str) -> str:
    """The device of ``capture.device``: ``auto`` = ``cuda:$LOCAL_RANK`` (modulo the visible GPUs)
    when CUDA is available, else ``cpu``; anything else as given."""
    if spec != "auto":
        return spec
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(1, torch.cuda.device_count())}"
    return "cpu"


def load_checkpoint(path: Path, dtype: str, device: str = "auto", device_map: str | None = None):
    """``(model, tokenizer)`` of a checkpoint folder, on ``device`` or sharded by ``device_map``."""
    from rotelab.models import load_model

    return load_model(path, dtype, capture_device(device), device_map=device_map)


def _model_shape(run, entries: Sequence[CheckpointEntry]) -> ModelShape:
    """The shape from the config.json of the first checkpoint whose folder exists."""
    for e in entries:
        if e.path is not None and (run.root / e.path / "config.json").is_file():
            return model_shape(run.root / e.path)
    raise RotelabError(f"{run.index_path}: no checkpoint folder with a config.json (missing checkpoints?)")


@dataclass
class _KindWork:
    kind: str
    group: object  # rotelab.store.KindGroup
    item_ids: np.ndarray  # ids to capture (all, or the requested subset present in the kind)
    positions: np.ndarray  # their positions in the kind's item table
    texts: list[str]
    n_items: int
    subset: bool
    has_coverage: bool = False  # whether the kind has a capture_coverage array (ever captured partially)


@dataclass
class _Todo:
    entry: CheckpointEntry
    layers: dict[str, list[int]] = field(default_factory=dict)  # kind -> layers to (re)write
    final: dict[str, bool] = field(default_factory=dict)  # kind -> final norm to (re)write

    def kinds(self) -> list[str]:
        return [k for k in self.layers if self.layers[k] or self.final[k]]


def _nan_rows(x: np.ndarray) -> np.ndarray:
    return np.isnan(x).any(axis=-1)


def _plan(work: _KindWork, entries: Sequence[CheckpointEntry], layers: list[int]) -> dict[str, tuple[list[int], bool]]:
    """checkpoint id → (layers to write, final norm to write) for one kind."""
    kg = work.group
    cps = kg.checkpoints
    committed = kg.committed("activations")
    final_committed = kg.committed("final_norm")
    partial_store = work.has_coverage = COVERAGE in kg.derived_arrays()
    coverage = kg.read_derived(COVERAGE) if partial_store else None
    out: dict[str, tuple[list[int], bool]] = {}
    for e in entries:
        ci = cps.index(e.id)
        todo = []
        for layer in layers:
            done = bool(committed[ci, layer])
            if done and coverage is not None and coverage[ci, layer] < 1.0:  # a partial slab
                done = work.subset and not _nan_rows(kg.read_slab(e.id, layer)[work.positions]).any()
            if not done:
                todo.append(layer)
        final_done = bool(final_committed[ci])
        if final_done and (work.subset or partial_store):
            fn = kg.read_final_norm(checkpoints=[e.id])[0]
            final_done = not _nan_rows(fn[work.positions] if work.subset else fn).any()
        out[e.id] = (todo, not final_done)
    return out


def _write_slab(work: _KindWork, ckpt: str, layer: int, rows: np.ndarray) -> None:
    """Write the captured ``rows [selected item, hidden]`` as slab (ckpt, layer), partial or full."""
    kg = work.group
    if not work.subset:
        kg.write_slab(ckpt, layer, rows)
        if work.has_coverage:
            cov = kg.read_derived(COVERAGE, checkpoints=[ckpt], layers=[layer])[0, 0]
            if not np.isnan(cov) and cov < 1.0:
                kg.write_derived(COVERAGE, ("checkpoint", "layer"), np.float32(1.0), index={"checkpoint": ckpt, "layer": layer})
        return
    slab = (
        kg.read_slab(ckpt, layer)
        if kg.is_committed("activations", ckpt, layer)
        else np.full((work.n_items, rows.shape[-1]), np.nan, np.float32)
    )
    slab[work.positions] = rows
    frac = float(1.0 - _nan_rows(slab).mean())
    if frac < 1.0:  # record the partial slab before it exists, so no full capture trusts it
        kg.write_derived(COVERAGE, ("checkpoint", "layer"), np.float32(frac), index={"checkpoint": ckpt, "layer": layer})
        work.has_coverage = True
    kg.write_slab(ckpt, layer, slab)
    if frac == 1.0 and work.has_coverage:
        kg.write_derived(COVERAGE, ("checkpoint", "layer"), np.float32(1.0), index={"checkpoint": ckpt, "layer": layer})


def _write_final(work: _KindWork, ckpt: str, rows: np.ndarray) -> None:
    kg = work.group
    if not work.subset:
        kg.write_final_norm(ckpt, rows)
        return
    cur = kg.read_final_norm(checkpoints=[ckpt])[0]  # NaN where uncommitted
    cur[work.positions] = rows
    kg.write_final_norm(ckpt, cur)


def _disk_error(err: OSError, store_path: Path, what: str) -> RotelabError:
    reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return RotelabError(
        f"{store_path}: cannot write {what} ({reason}); committed slabs are kept, rerun capture to resume"
    )


def _human(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n_bytes < 1024 or unit == "TB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TB"


#: Attribute (on ``activations`` and ``final_norm``) naming the pass that wrote a checkpoint's
#: cells: ``probe_pass/<checkpoint>`` = ``{"<layer>": pass, …}`` on activations, the pass on final_norm.
PROBE_PASS_ATTR = "probe_pass"


@dataclass
class CapturePlan:
    """What a capture still has to write (:func:`plan_capture`): per checkpoint, per kind, the
    layers and whether the final norm; ``write`` stores one (checkpoint, kind)'s states."""

    run: object
    store: object
    works: dict[str, _KindWork]
    todos: list[_Todo]
    layers: list[int]
    n_layers: int
    hidden: int
    shard: Shard | None
    selected: list[CheckpointEntry]

    def todo(self, checkpoint: str, kind: str) -> tuple[list[int], bool] | None:
        """(layers, final norm) still to write for (checkpoint, kind); None when nothing is."""
        for t in self.todos:
            if t.entry.id == checkpoint and kind in t.kinds():
                return list(t.layers[kind]), bool(t.final[kind])
        return None

    def write(self, checkpoint: str, kind: str, layers: Sequence[int], h: np.ndarray, f: np.ndarray, final: bool, probe_pass: str) -> None:
        """Write the slabs ``h [len(layers), item, hidden]`` and (``final``) the final norm ``f [item,
        hidden]`` of (checkpoint, kind), recording ``probe_pass`` (``fused``/``separate``) in the
        attrs first (so a committed cell's entry always names the pass that wrote it), and mark
        the pair done."""
        from rotelab.runlock import store_layout_lock

        w = self.works[kind]
        key = f"{PROBE_PASS_ATTR}/{checkpoint}"
        try:
            with store_layout_lock(self.run.root):  # shards share the arrays' metadata
                if layers:
                    have = w.group.array_attrs("activations").get(key) or {}
                    w.group.merge_attrs("activations", {key: {**have, **{str(v): probe_pass for v in layers}}})
                if final:
                    w.group.merge_attrs("final_norm", {key: probe_pass})
        except OSError as err:
            raise _disk_error(err, self.run.store_path, f"the provenance of {checkpoint!r}, kind {kind!r}") from None
        for li, layer in enumerate(layers):
            try:
                _write_slab(w, checkpoint, layer, h[li])
            except OSError as err:
                raise _disk_error(err, self.run.store_path, f"slab ({checkpoint}, layer {layer}) of kind {kind!r}") from None
        if final:
            try:
                _write_final(w, checkpoint, f)
            except OSError as err:
                raise _disk_error(err, self.run.store_path, f"final_norm of {checkpoint!r}, kind {kind!r}") from None
        for t in self.todos:
            if t.entry.id == checkpoint and kind in t.layers:
                t.layers[kind], t.final[kind] = [], False
        self.todos = [t for t in self.todos if t.kinds()]


def plan_capture(
    run,
    *,
    checkpoints: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    items: Sequence[int] | None = None,
    shard: Shard | tuple[int, int] | None = None,
) -> CapturePlan:
    """Validate a capture request, create or grow the store layout, and find what is not committed
    (arguments as :func:`capture_run`)."""
    from rotelab.store import Store

    cfg = run.config.capture
    entries = run.checkpoints()
    if not entries:
        raise RotelabError(f"{run.index_path}: the run has no checkpoints yet (run `rotelab train` first)")
    if checkpoints is not None:
        wanted = {run.checkpoint(c).id for c in checkpoints}  # unknown ids raise
        selected = [e for e in entries if e.id in wanted]
    else:
        selected = list(entries)
    shard = Shard.of(shard) if shard is not None else Shard.from_env()
    if shard is not None:
        selected = [e for k, e in enumerate(selected) if k % shard.count == shard.index]

    kind_names = list(dict.fromkeys(kinds if kinds is not None else (cfg.kinds or run.kinds())))
    if not kind_names:
        raise RotelabError(f"{run.config_path}: no prompt kinds selected for capture")
    shape = _model_shape(run, entries)
    n_layers, hidden = shape.n_layers, shape.hidden
    layer_list = check_layers(layers if layers is not None else cfg.layers, n_layers, str(run.config_path))

    tables = {kind: run.items(kind) for kind in kind_names}  # unknown kinds raise
    for kind, table in tables.items():
        if len(table) == 0:
            raise RotelabError(
                f"{run.data_dir}: prompt kind {kind!r} has no items (check data.templates_per_kind and the relations' templates)"
            )
    from rotelab.runlock import store_layout_lock

    all_ids = [e.id for e in entries]
    works: list[_KindWork] = []
    try:
        with store_layout_lock(run.root):  # shards started together: one at a time creates/grows the layout
            store = Store.open(run.store_path, fingerprint=run.fingerprint())
            for kind, table in tables.items():
                kg = store.ensure_kind(kind, checkpoints=all_ids, layers=list(range(n_layers + 1)), items=table, hidden=hidden)
                ids = table["item"].to_numpy()
                if items is None:
                    pos = np.arange(len(ids))
                else:
                    want = set(int(x) for x in items)
                    pos = np.asarray([k for k, v in enumerate(ids.tolist()) if v in want], dtype=np.int64)
                    if len(pos) == 0:
                        raise RotelabError(f"{run.root}: none of the requested items exist in kind {kind!r} (item ids 0..{len(ids) - 1})")
                works.append(
                    _KindWork(kind, kg, ids[pos], pos, [str(t) for t in table["text"].to_numpy()[pos]], len(ids), items is not None)
                )
    except OSError as err:
        raise _disk_error(err, run.store_path, "the store layout") from None

    # the ICL kinds at capture.icl_checkpoints only, unless the checkpoints are named
    icl_at = icl_checkpoint_ids(run, "capture") if checkpoints is None else None
    todos = [_Todo(e) for e in selected]
    for w in works:
        plan = _plan(w, [e for e in selected if covers(icl_at, w.kind, e.id)], layer_list)
        for t in todos:
            t.layers[w.kind], t.final[w.kind] = plan.get(t.entry.id, ([], False))
    todos = [t for t in todos if t.kinds()]
    return CapturePlan(run, store, {w.kind: w for w in works}, todos, layer_list, n_layers, hidden, shard, selected)


def capture_run(
    run,
    *,
    checkpoints: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    items: Sequence[int] | None = None,
    shard: Shard | tuple[int, int] | None = None,
    progress: bool = True,
) -> None:
    """Capture hidden states of ``run`` into ``run.store_path`` (see the module docstring).

    ``checkpoints`` (ids), ``kinds``, ``layers`` default to the config's ``capture`` section, then
    to everything. ``items``: item ids to capture in each kind (ids a kind lacks are skipped);
    default all. ``shard`` (a :class:`rotelab.probe.accuracy.Shard`, the type eval uses, or ``(i, n)``): take only the selected checkpoints whose position ``% n == i``
    (default: ``RANK``/``WORLD_SIZE`` from a launcher's environment). Committed slabs are skipped;
    everything else is (re)written, one ``(checkpoint, layer)`` slab at a time. The forward is the
    prompt pass (:mod:`rotelab.probe.prompt_pass`, ``capture.batch_size`` prompts per forward); the
    slabs' attrs record ``probe_pass: separate`` (``fused`` where :func:`rotelab.probe.evaluate_run`
    captured them in its own pass).
    """
    from tqdm.auto import tqdm

    cfg = run.config.capture
    plan = plan_capture(run, checkpoints=checkpoints, kinds=kinds, layers=layers, items=items, shard=shard)
    shard, hidden, n_layers, todos, by_kind = plan.shard, plan.hidden, plan.n_layers, list(plan.todos), plan.works
    n_items = sum(len(w.positions) for w in by_kind.values())
    total = n_items * len(plan.layers) * hidden * len(plan.selected) * 2
    todo_bytes = sum(len(by_kind[k].positions) * len(t.layers[k]) * hidden * 2 for t in todos for k in t.kinds())
    if progress:
        print(
            f"capture{f' [shard {shard.index}/{shard.count}]' if shard else ''}: {len(plan.selected)} checkpoints × {len(by_kind)} kinds ({n_items} items) × {len(plan.layers)} layers"
            f" × {hidden} hidden × 2 bytes ≈ {_human(total)} of activations; {_human(todo_bytes)} still to write"
            f" ({len(todos)} checkpoints) in {plan.store.path}",
            file=sys.stderr,
            flush=True,
        )
    if not todos:
        return
    for t in todos:  # fail before any work if a needed checkpoint's weights are gone
        run.checkpoint_dir(t.entry)

    bar = tqdm(
        total=sum(len(by_kind[k].positions) for t in todos for k in t.kinds()),
        unit="item",
        desc="capture",
        disable=not progress,
        dynamic_ncols=True,
    )
    dtype = run.config.model.dtype
    try:
        for t in todos:
            model, tok = load_checkpoint(run.checkpoint_dir(t.entry), dtype, cfg.device, cfg.device_map)
            sites = ModelSites(model)
            check_shape(sites, run.checkpoint_dir(t.entry), n_layers, hidden)
            for kind in t.kinds():
                w = by_kind[kind]
                bar.set_postfix_str(f"{t.entry.id} {kind}", refresh=False)
                todo_layers = t.layers[kind]
                h = np.empty((len(todo_layers), len(w.texts), hidden), dtype=np.float32)
                f = np.empty((len(w.texts), hidden), dtype=np.float32)
                capture_into(sites, tok, w.texts, todo_layers, h, f, cfg.batch_size, on_batch=bar.update)
                plan.write(t.entry.id, kind, todo_layers, h, f, t.final[kind], "separate")
            del model, sites
    finally:
        bar.close()


def check_shape(sites: ModelSites, where: Path, n_layers: int, hidden: int) -> None:
    """Raise unless the loaded model has the series' shape."""
    if sites.hidden != hidden or sites.n_layers != n_layers:
        raise RotelabError(f"{where}: model shape {sites.n_layers} layers × {sites.hidden} differs from the series' {n_layers} × {hidden}")
