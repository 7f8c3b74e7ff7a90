"""``rotelab run``: data → train → eval → capture → analyses → figures → summary, resumable.

This is the one orchestrating module above every stage (like the CLI it imports the stages inside
its functions); each stage does only what is missing, so re-running a finished run is cheap and an
interrupted one continues where it stopped.

The prerequisite rule (the same for every stage command, given a config or a run directory): a
stage first does the missing stages it reads (:data:`NEEDS`, :func:`run_prerequisites`). ``data``
is written once; ``train`` counts as missing while the run has no checkpoint (``rotelab train``
completes a partial series); ``eval``, ``capture`` and ``analyze`` are run, each doing only what is
missing. A sharded ``eval``/``capture`` (``--shard``, or a launcher's ``RANK``/``WORLD_SIZE``) never
trains: its processes write only their own cells, without the run's writer lock.

Sweeps: a config with ``sweep:`` expands into sibling runs ``runs/<name>-<key>=<value>…``. Siblings
that agree on everything phase 1 depends on share its checkpoints (phase 1 is trained once, in the
first sibling, and linked into the others).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rotelab.config import Config, expand_sweep
from rotelab.errors import RotelabError
from rotelab.run import Run

STAGES = ("data", "train", "eval", "capture", "analyze", "figures", "summary")
#: The stages each stage reads, in order: what a stage command does first when they are missing.
NEEDS: dict[str, tuple[str, ...]] = {
    "data": (),
    "train": ("data",),
    "eval": ("data", "train"),
    "capture": ("data", "train"),
    "analyze": ("data", "train", "eval", "capture"),
    "figures": ("data", "train", "eval", "capture", "analyze"),
    "summary": ("data", "train", "eval", "capture", "analyze", "figures"),
}


@dataclass
class StageTiming:
    stage: str
    seconds: float


@dataclass
class PipelineResult:
    run: Run
    timings: list[StageTiming] = field(default_factory=list)
    summary: str = ""


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def _stage_functions(progress: bool, fuse: bool = False) -> dict[str, Callable[[Run], object]]:
    """The stage callables; ``fuse``: eval also captures what capture needs from its prompt pass
    (the fused probe pass, :func:`rotelab.probe.evaluate_run` ``capture=True``), so the capture
    stage after it only does what eval could not share."""

    def data(run: Run) -> None:
        run.ensure_data()

    def train(run: Run) -> None:
        from rotelab.train import train_run

        train_run(run, progress=progress)

    def eval_(run: Run) -> None:
        from rotelab.probe import evaluate_run

        evaluate_run(run, progress=progress, capture=fuse)
        track_eval(run)

    def capture(run: Run) -> None:
        from rotelab.probe import capture_run

        capture_run(run, progress=progress)

    def analyze(run: Run) -> None:
        from rotelab.analyses import analyze_run

        analyze_run(run, progress=progress)

    def figures(run: Run) -> None:
        from rotelab.analyses import figures_run

        figures_run(run)

    def summary(run: Run) -> None:
        from rotelab.analyses.summary import write_summary

        write_summary(run)

    return {"data": data, "train": train, "eval": eval_, "capture": capture, "analyze": analyze, "figures": figures, "summary": summary}


def track_eval(run: Run) -> None:
    """Write the run's per-checkpoint eval metrics as TensorBoard scalars
    (:func:`rotelab.tracking.write_eval_scalars`): ``<metric>/<kind>/<split>`` for object
    probability, MC accuracy and generation accuracy, at step = the checkpoint's ``total_tokens``."""
    import math

    from rotelab.probe.accuracy_tables import SUMMARY_METRICS, metrics_table
    from rotelab.tracking import write_eval_scalars
    from rotelab.train.pipeline import total_tokens

    entries = {e.id: e for e in run.checkpoints()}
    steps = {cid: total_tokens(run, cid) for cid in entries}
    rows = [
        (entries[r.checkpoint].series, f"{r.metric}/{r.kind}/{r.split}", steps[r.checkpoint], float(r.value))
        for r in metrics_table(run).itertuples(index=False)
        if r.metric in SUMMARY_METRICS and r.checkpoint in entries and not math.isnan(float(r.value))
    ]
    if rows:
        write_eval_scalars(run.root, rows)


def run_pipeline(
    run: Run,
    *,
    stages: tuple[str, ...] = STAGES,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    prune: bool = True,
) -> PipelineResult:
    """Run the stages in order on one run; each skips what is already done. Holds the run's
    writer lock (:mod:`rotelab.runlock`) throughout. ``prune``: apply ``train.keep_weights`` at the
    end (:func:`prune_weights_after`); a sweep defers it until every sibling has trained."""
    from rotelab.runlock import run_lock

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise RotelabError(f"unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
    with run_lock(run.root, "rotelab run " + ",".join(stages)):
        return _run_stages(run, stages, progress, echo, prune)


def prune_weights_after(run: Run, stages: tuple[str, ...], echo: Callable[[str], None]) -> None:
    """Drop the weights ``train.keep_weights`` does not keep, if ``stages`` ran every consumer of
    them (eval, capture, analyze)."""
    if {"eval", "capture", "analyze"} <= set(stages):
        from rotelab.train.pipeline import prune_consumed_weights

        dropped = prune_consumed_weights(run)
        if dropped:
            echo(f"   train.keep_weights: {run.config.train.keep_weights} — dropped the weights of {len(dropped)} checkpoints ({', '.join(dropped[:4])}{', …' if len(dropped) > 4 else ''})")


def _run_stages(run: Run, stages: tuple[str, ...], progress: bool, echo: Callable[[str], None], prune: bool = True) -> PipelineResult:
    fns = _stage_functions(progress, fuse={"eval", "capture"} <= set(stages))
    result = PipelineResult(run)
    t_all = time.perf_counter()
    for i, stage in enumerate(stages, start=1):
        done = sum(t.seconds for t in result.timings)
        eta = f", elapsed {_fmt(done)}" if done else ""
        echo(f"── [{i}/{len(stages)}] {stage} · {run.root}{eta}")
        t0 = time.perf_counter()
        fns[stage](run)
        result.timings.append(StageTiming(stage, time.perf_counter() - t0))
        echo(f"   {stage} done in {_fmt(result.timings[-1].seconds)}")
    if prune:
        prune_weights_after(run, stages, echo)
    if "summary" in stages and run.summary_path.is_file():
        result.summary = run.summary_path.read_text(encoding="utf-8")
    echo(f"── all stages done in {_fmt(time.perf_counter() - t_all)}")
    return result


def run_prerequisites(
    run: Run, stage: str, *, sharded: bool = False, progress: bool = True, echo: Callable[[str], None] = print
) -> tuple[str, ...]:
    """Do the missing stages ``stage`` needs (see the module docstring); returns the stages run
    through the pipeline (``data`` is written directly, without the run's writer lock)."""
    if stage not in NEEDS:
        raise RotelabError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
    needs = NEEDS[stage]
    if "data" in needs:
        run.ensure_data()
    todo = tuple(s for s in needs if s != "data" and not (s == "train" and run.checkpoints()))
    if sharded and "train" in todo:
        raise RotelabError(
            f"{run.index_path}: the run has no checkpoints yet; a sharded {stage} does not train (run `rotelab train {run.root}` first)"
        )
    if todo:
        run_pipeline(run, stages=todo, progress=progress, echo=echo)
    return todo


def run_config(
    config: Config,
    *,
    run_dir: str | Path | None = None,
    runs_dir: str | Path = "runs",
    stages: tuple[str, ...] = STAGES,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[PipelineResult]:
    """Run a config (or every sibling of its sweep). Returns one result per run."""
    configs = expand_sweep(config)
    if len(configs) > 1 and run_dir is not None:
        runs_dir, run_dir = Path(run_dir), None
    results: list[PipelineResult] = []
    trained_phase1: dict[str, Run] = {}
    sweep = len(configs) > 1
    for cfg in configs:
        run = Run.create(cfg, run_dir, runs_dir)
        if sweep:
            echo(f"══ sweep run {len(results) + 1}/{len(configs)}: {cfg.name}")
            if "train" in stages:  # a sibling's phase 1 exists only once it was trained
                _share_phase1(run, trained_phase1, echo)
        # in a sweep, a later sibling links its phase 1 (and its phase-2 start) from an earlier one:
        # pruning an earlier sibling before the later ones have linked would drop what they need
        results.append(run_pipeline(run, stages=stages, progress=progress, echo=echo, prune=not sweep))
    if sweep:  # every link exists now, and pruning keeps every folder a sibling links to
        for res in reversed(results):
            with _lock_for_prune(res.run, stages):
                prune_weights_after(res.run, stages, echo)
    return results


def _lock_for_prune(run: Run, stages: tuple[str, ...]):
    from rotelab.runlock import run_lock

    return run_lock(run.root, "rotelab run " + ",".join(stages) + " (train.keep_weights)")


def _share_phase1(run: Run, trained: dict[str, Run], echo: Callable[[str], None]) -> None:
    """Link phase-1 checkpoints from an earlier sibling with the same phase-1 key, or remember this one."""
    from rotelab.train import import_phase1, phase1_key

    key = phase1_key(run.config)
    source = trained.get(key)
    if source is not None and not run.checkpoints(series="main"):
        echo(f"   reusing phase 1 of {source.root.name}")
        import_phase1(run, source)
    trained.setdefault(key, run)
