"""One training stage (phase 1, phase 2 or a baseline) on the DeepSpeed engine, saving its points
into the series and resuming from the last complete one.

Batching: ``batch_size`` examples per optimizer step (the effective batch, over all ranks and
accumulation steps); each step's examples are split into ``grad_accum × world`` micro-batches.
The example order of epoch ``e`` is a pure function of (seed, stage, e) (:func:`epoch_order`), so
a resumed process — and every rank — continues the same order. The loss of a step is the mean over
its labelled target tokens (exactly, across micro-batches and ranks).
"""

from __future__ import annotations

import csv
import io
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rotelab.batching import pad_id
from rotelab.checkpoints import CheckpointEntry, read_index, verify_weights
from rotelab.config import TrainingStageConfig
from rotelab.errors import RotelabError
from rotelab.run import Run
from rotelab.train import engine as eng
from rotelab.train import series
from rotelab.train.data import Example, collate, epoch_order, micro_slices, step_plan

LOSS_FIELDS = ("stage", "step", "epoch", "loss", "lr", "tokens_seen", "seconds")


@dataclass
class Stage:
    """What one stage trains: its examples, optimisation settings, and where it starts."""

    name: str
    """``phase1``, ``phase2``, ``inject``, ``sft`` or ``sft-k`` (also the entries' ``phase``)."""
    prefix: str
    """Checkpoint id prefix: ``p1``, ``p2``, ``inj``, ``sft``, ``sftk``."""
    series: str
    examples: list[Example]
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    grad_accum: int
    save_every: int | str
    start_dir: Path
    """Weights (and tokenizer) the stage starts from."""
    tokens_before: int = 0
    """Training tokens of the start point (its ``total_tokens``): this stage's points record
    ``total_tokens = tokens_before + tokens_seen``."""

    @classmethod
    def of(
        cls, name: str, prefix: str, series: str, examples: list[Example], schedule: TrainingStageConfig, start_dir: Path, **kw
    ) -> "Stage":
        """A stage whose optimisation settings are a config section's schedule (``phase1``,
        ``phase2``, ``inject``; the baselines use phase 2's)."""
        return cls(name, prefix, series, examples, epochs=schedule.epochs, lr=schedule.lr, weight_decay=schedule.weight_decay,
                   batch_size=schedule.batch_size, grad_accum=schedule.grad_accum, save_every=schedule.save_every,
                   start_dir=start_dir, **kw)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def plan_points(stage: Stage) -> list[tuple[str, int]]:
    """``[(checkpoint id, optimizer step after which it is saved)]``: every epoch (``p1-e01``…) or
    every ``save_every`` steps plus the last step (``p1-s000120``…). When every one of those steps
    falls on an epoch boundary (``save_every`` a multiple of the steps per epoch), the ids name
    the epochs instead (``p1-e02``, ``p1-e04``…)."""
    spe, total = stage.steps_per_epoch, stage.total_steps
    if stage.save_every == "epoch":
        return [(f"{stage.prefix}-e{e:02d}", e * spe) for e in range(1, stage.epochs + 1)]
    n = int(stage.save_every)
    steps = list(range(n, total + 1, n))
    if total and (not steps or steps[-1] != total):
        steps.append(total)
    if spe and all(s % spe == 0 for s in steps):
        return [(f"{stage.prefix}-e{s // spe:02d}", s) for s in steps]
    return [(f"{stage.prefix}-s{s:06d}", s) for s in steps]


def _resume_dir(run: Run, stage: Stage) -> Path:
    return run.checkpoints_dir / ".resume" / stage.name


def _drop_resume_state(run: Run, stage: Stage) -> None:
    """A finished stage needs no optimizer state any more (its last point's weights are listed)."""
    d = _resume_dir(run, stage)
    shutil.rmtree(d, ignore_errors=True)
    try:
        d.parent.rmdir()  # only when no other stage's state is left
    except OSError:
        pass


def _loss_log(run: Run) -> Path:
    return run.logs_dir / "train_loss.csv"


def _truncate_loss_log(run: Run, stage: str, after_step: int) -> None:
    """Drop the rows of ``stage`` with step > ``after_step`` (written after the point we resume from)."""
    path = _loss_log(run)
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    cut = not text.endswith("\n")  # a kill mid-write left a partial last row: drop it
    if cut:
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    keep = [r for r in rows if not (r.get("stage") == stage and int(r.get("step") or 0) > after_step)]
    if len(keep) == len(rows) and not cut:
        return
    from rotelab.facts import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(LOSS_FIELDS))
    w.writeheader()
    w.writerows(keep)
    atomic_write_text(path, buf.getvalue())


def _append_loss(run: Run, row: dict) -> None:
    path = _loss_log(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(LOSS_FIELDS))
        if new:
            w.writeheader()
        w.writerow(row)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _gather_state_dict(engine, zero_stage: int):
    """The full state dict on rank 0 (ZeRO-3 gathers the partitioned weights; all ranks call)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def run_stage(run: Run, stage: Stage, *, progress: bool = True, after_save=None) -> list[CheckpointEntry]:
    """Train ``stage`` to its end, saving every planned point; resume from its last listed point.

    Returns the stage's entries. ``after_save(entry)`` is called on rank 0 after each new entry.
    """
    from tqdm.auto import tqdm

    points = plan_points(stage)
    if not points:
        return []
    listed = {e.id: e for e in read_index(run.index_path)}
    done = [(pid, s) for pid, s in points if pid in listed]
    if done:  # the point everything after rests on: verify its files before trusting it
        last = listed[done[-1][0]]
        if last.path is not None:
            verify_weights(run.root / last.path, last.id, last.sha256)
    if len(done) == len(points):
        if eng.rank() == 0:
            _drop_resume_state(run, stage)
        return [listed[pid] for pid, _ in points]
    if not stage.examples:
        raise RotelabError(f"{run.root}: stage {stage.name} has no training examples")

    cfg = run.config
    _, ds_cfg = eng.resolve_ds_config(cfg.train.deepspeed)
    ds_cfg = eng.monitor_sections(ds_cfg, run.root, stage.name)
    zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
    world = eng.world_size() if _dist_ready() else 1
    model, tok = eng.load_for_training(stage.start_dir)
    parts = stage.grad_accum * world
    micro = math.ceil(stage.batch_size / parts)
    engine = eng.make_engine(
        model, ds_cfg, lr=stage.lr, weight_decay=stage.weight_decay, micro_batch=micro, grad_accum=stage.grad_accum,
        total_steps=stage.total_steps, schedule=cfg.train.lr_schedule, warmup_ratio=cfg.train.warmup_ratio,
    )
    world, rank = eng.world_size(), eng.rank()
    parts = stage.grad_accum * world
    start_step, tokens_seen = 0, 0
    if done:
        last_id, start_step = done[-1]
        tokens_seen = listed[last_id].tokens_seen
        rdir = _resume_dir(run, stage)
        if not (rdir / last_id).is_dir():
            raise RotelabError(f"{rdir / last_id}: resume state of checkpoint {last_id!r} is missing; cannot continue stage {stage.name}")
        _, client = engine.load_checkpoint(str(rdir), tag=last_id, load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None or client.get("step") != start_step:
            raise RotelabError(f"{rdir / last_id}: resume state does not match checkpoint {last_id!r}")
        _set_rng_state(client["rng"])
    if rank == 0:
        _truncate_loss_log(run, stage.name, start_step)
    save_at = {s: pid for pid, s in points}
    n = len(stage.examples)
    spe = stage.steps_per_epoch
    step_slices = step_plan(n, stage.batch_size)
    pad_token = pad_id(tok)
    dtype = cfg.model.dtype
    bar = tqdm(total=stage.total_steps, initial=start_step, desc=stage.name, disable=not progress or rank != 0, unit="step", dynamic_ncols=True)
    seg_loss, seg_steps = 0.0, 0
    t0, tok_count = time.perf_counter(), 0
    entries: list[CheckpointEntry] = []
    order: list[int] = []
    order_epoch = -1
    for step in range(start_step, stage.total_steps):
        epoch, j = divmod(step, spe)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(n, cfg.seed, stage.name, epoch), epoch
        a, b = step_slices[j]
        step_ex = [stage.examples[i] for i in order[a:b]]
        n_targets = sum(e.n_targets for e in step_ex)
        scale = parts / max(1, n_targets)
        loss_sum = 0.0
        for m in range(stage.grad_accum):
            lo, hi = micro_slices(len(step_ex), parts)[m * world + rank]
            mb = step_ex[lo:hi]
            batch = collate(mb if mb else step_ex[:1], pad_token)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss, _ = eng.step_loss(engine, batch, scale if mb else 0.0)
            engine.backward(loss)
            engine.step()
            if mb:
                loss_sum += float(loss.detach()) / scale
                tok_count += int(batch["attention_mask"].sum())
        step_loss = _all_reduce_sum(loss_sum) / max(1, n_targets)
        step_tokens = sum(len(e.input_ids) for e in step_ex)
        tokens_seen += step_tokens
        seg_loss += step_loss
        seg_steps += 1
        lr = engine.get_lr()[0]
        if rank == 0:
            _append_loss(run, {"stage": stage.name, "step": step + 1, "epoch": f"{(step + 1) / spe:.4f}", "loss": f"{step_loss:.6f}",
                               "lr": f"{lr:.3e}", "tokens_seen": tokens_seen, "seconds": f"{time.perf_counter() - t0:.2f}"})
        eng.write_step_events(engine, step + 1, step_loss, lr)
        bar.update(1)
        bar.set_postfix(epoch=f"{epoch + 1}/{stage.epochs}", loss=f"{step_loss:.4f}", tok_s=f"{tok_count * world / max(1e-9, time.perf_counter() - t0):.0f}")
        if step + 1 in save_at:
            pid = save_at[step + 1]
            entry = CheckpointEntry(
                id=pid, phase=stage.name, epoch=round((step + 1) / spe, 4), step=step + 1, tokens_seen=tokens_seen,
                loss=round(seg_loss / seg_steps, 6), path=None, series=stage.series, total_tokens=stage.tokens_before + tokens_seen,
            )
            entry = _save_point(run, stage, engine, tok, entry, zero_stage, dtype)
            entries.append(entry)
            if rank == 0 and after_save is not None:
                after_save(entry)
            seg_loss, seg_steps = 0.0, 0
    bar.close()
    if rank == 0:
        _drop_resume_state(run, stage)
    eng.barrier()
    listed = {e.id: e for e in read_index(run.index_path)}
    return [listed[pid] for pid, _ in points]


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(x: float) -> float:
    import torch.distributed as dist

    if not _dist_ready() or dist.get_world_size() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def _save_point(run: Run, stage: Stage, engine, tok, entry: CheckpointEntry, zero_stage: int, dtype: str) -> CheckpointEntry:
    """Resume state → weights folder → index entry → cleanup (see :mod:`rotelab.train.series`).
    Weights are never dropped here: ``train.keep_weights`` applies once eval, capture and the
    analyses have read them (:func:`rotelab.train.pipeline.prune_consumed_weights`)."""
    from dataclasses import replace

    rank = eng.rank()
    rdir = _resume_dir(run, stage)
    try:
        engine.save_checkpoint(str(rdir), tag=entry.id, client_state={"step": entry.step, "rng": _rng_state()}, save_latest=False)
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as a RuntimeError
        why = series.write_failure(err, rdir)
        shutil.rmtree(rdir / entry.id, ignore_errors=True)
        raise RotelabError(f"{rdir}: cannot save the resume state of {entry.id!r} ({why}); existing checkpoints are untouched") from None
    sd = _gather_state_dict(engine, zero_stage)
    if rank == 0:
        path, sha = series.write_checkpoint_folder(run, entry.id, lambda d: series.save_weights(engine.module, tok, d, dtype, sd))
        entry = replace(entry, path=path, sha256=sha)
        series.append_entry(run, entry)
        for old in rdir.iterdir():
            if old.is_dir() and old.name != entry.id:
                shutil.rmtree(old, ignore_errors=True)
    eng.barrier()
    return entry
