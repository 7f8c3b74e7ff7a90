"""The ``rotelab`` command line (typer). Each stage's work lives in its subpackage; the commands here
only parse arguments, open the run and call it (stage modules are imported inside the commands, so
``rotelab --help`` stays fast and the core imports nothing downstream at import time)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rotelab.errors import RotelabError

app = typer.Typer(
    help="rotelab: rote learning → generalization workbench (arXiv 2507.21914).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Fact datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# Options every stage takes. ``--run-dir`` is the spelling for launchers (torchrun abbreviates ``--run``).
RunOpt = Annotated[
    Optional[Path], typer.Option("--run", "--run-dir", help="Run directory (default: runs/<config name>).")
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress bars.")]
Target = Annotated[str, typer.Argument(help="A config YAML or an existing run directory.")]


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@data_app.command("make")
def data_make(
    out: Annotated[Path, typer.Option("--out", help="Folder to write facts.jsonl and relations.yaml into.")],
    relations: Annotated[Optional[str], typer.Option(help="Comma-separated relations (default: all five).")] = None,
    facts_per_relation: Annotated[int, typer.Option("--facts-per-relation", min=1)] = 100,
    seed: Annotated[int, typer.Option()] = 0,
    distractors: Annotated[int, typer.Option(min=1)] = 99,
    relations_file: Annotated[Optional[Path], typer.Option("--relations-file", help="Your own relations YAML.")] = None,
) -> None:
    """Generate a fact dataset (fictional subjects, real objects, 99 distractors each)."""
    from rotelab.facts import generate_facts, validate_facts, write_dataset
    from rotelab.relations import load_relations, select_relations

    all_rels = load_relations(relations_file)
    from rotelab.config import DataConfig

    # default: the paper's five relations (the catalogue also holds `employer`, the repurposing target)
    names = _csv(relations) or list(DataConfig().relations)
    rels = select_relations(all_rels, names, "--relations")
    facts = generate_facts(rels, facts_per_relation, seed, distractors)
    validate_facts(facts, rels, distractors, "generated facts")
    write_dataset(out, facts, rels)
    typer.echo(f"wrote {len(facts)} facts over {len(rels)} relations to {out / 'facts.jsonl'}")


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="A config YAML (with an optional sweep:).")],
    run: RunOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name (default: the config's name).")] = None,
    stages: Annotated[Optional[str], typer.Option(help="Comma-separated subset of data,train,eval,capture,analyze,figures,summary.")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where runs/<name> go.")] = Path("runs"),
    no_progress: NoProgress = False,
) -> None:
    """All stages, from facts to figures and summary.md; each stage skips what is already done."""
    from rotelab.config import load_config
    from rotelab.pipeline import STAGES, run_config

    cfg = load_config(config)
    if name:
        cfg = cfg.model_copy(update={"name": name})
    results = run_config(
        cfg, run_dir=run, runs_dir=runs_dir, stages=tuple(_csv(stages) or STAGES), progress=not no_progress, echo=typer.echo
    )
    for res in results:
        if res.summary:
            typer.echo("")
            typer.echo(res.summary)
    roots = [str(r.run.root) for r in results]
    target = roots[0] if len(roots) == 1 else str(Path(roots[0]).parent)
    typer.echo(f"Browse it: rotelab tui {target}")
    from rotelab.tracking import logdir_hint

    typer.echo(f"Track it: {logdir_hint(Path(target))}")


def _int_list(value: Optional[str], flag: str) -> Optional[list[int]]:
    """``"0,5,10-12"`` → ``[0, 5, 10, 11, 12]``."""
    if not value:
        return None
    out: list[int] = []
    for part in _csv(value) or []:
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise RotelabError(f"{flag} {value!r}: expected integers or ranges like 0,5,10-12") from None
    return out


@app.command("capture")
def capture(
    target: Target,
    run: RunOpt = None,
    checkpoints: Annotated[Optional[str], typer.Option(help="Comma-separated checkpoint ids (default: all).")] = None,
    kinds: Annotated[Optional[str], typer.Option(help="Comma-separated prompt kinds (default: capture.kinds or all).")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Layers, e.g. 0,5,10-12 (0 = embeddings; default: all).")] = None,
    items: Annotated[Optional[str], typer.Option(help="Item ids per kind, e.g. 0-99 (default: all).")] = None,
    shard: Annotated[
        Optional[str],
        typer.Option(help="i/n: capture only checkpoints whose position % n == i (default: RANK/WORLD_SIZE if set)."),
    ] = None,
    no_progress: NoProgress = False,
) -> None:
    """Capture the last prompt token's hidden state at every layer into the run's store (resumable)."""
    from rotelab.pipeline import run_prerequisites
    from rotelab.probe.accuracy import Shard
    from rotelab.probe.capture import capture_run
    from rotelab.run import Run
    from rotelab.runlock import shard_lock

    r = Run.from_target(target, run)
    sh = Shard.parse(shard) if shard else Shard.from_env()
    if sh is not None:
        _threads_for_shards(sh.count)
    run_prerequisites(r, "capture", sharded=sh is not None and sh.count > 1, progress=not no_progress, echo=typer.echo)
    where = f" --shard {sh.index}/{sh.count}" if sh is not None and sh.count > 1 else ""
    with shard_lock(r.root, "rotelab capture" + where, *((sh.index, sh.count) if sh is not None else (0, 1))):
        capture_run(
            r,
            checkpoints=_csv(checkpoints),
            kinds=_csv(kinds),
            layers=_int_list(layers, "--layers"),
            items=_int_list(items, "--items"),
            shard=sh,
            progress=not no_progress,
        )


@app.command("train")
def train_cmd(
    target: Target,
    run: RunOpt = None,
    no_progress: NoProgress = False,
) -> None:
    """Train what the run still misses: base checkpoint, phase 1, phase 2, baselines (resumable).

    Several ranks: torchrun --nproc_per_node N -m rotelab.cli train CONFIG|DIR --run-dir DIR (CPU: gloo);
    on GPUs also deepspeed --num_gpus N --no_local_rank --module rotelab.cli train CONFIG|DIR --run-dir DIR
    """
    from rotelab.pipeline import run_prerequisites
    from rotelab.runlock import run_lock
    from rotelab.train import train_run
    from rotelab.train.engine import open_run_ranked

    r = open_run_ranked(target, run)
    run_prerequisites(r, "train", progress=not no_progress, echo=typer.echo)
    with run_lock(r.root, "rotelab train"):
        entries = train_run(r, progress=not no_progress)
    typer.echo(f"{r.root}: {len(entries)} checkpoints ({', '.join(e.id for e in entries[:3])}{', …' if len(entries) > 3 else ''})")


@app.command("eval")
def eval_cmd(
    target: Target,
    run: RunOpt = None,
    engine: Annotated[Optional[str], typer.Option(help="vllm, hf or auto (default: eval.engine).")] = None,
    checkpoints: Annotated[Optional[str], typer.Option(help="Comma-separated checkpoint ids (default: all).")] = None,
    kinds: Annotated[Optional[str], typer.Option(help="Comma-separated prompt kinds (default: eval.kinds or all).")] = None,
    shard: Annotated[Optional[str], typer.Option(help="i/n: evaluate only checkpoints whose position % n == i (default: RANK/WORLD_SIZE if set).")] = None,
    redo: Annotated[bool, typer.Option("--redo", help="Recompute the selected units even where the store has them.")] = False,
    no_progress: NoProgress = False,
) -> None:
    """Accuracy (object probability, multiple choice, generation) of every checkpoint × prompt kind
    not yet in the store (or stale: vLLM results from before the verified weight swap; --redo: all
    selected); prints a summary per checkpoint (kinds × metrics, train vs held-out facts)."""
    from rotelab.pipeline import run_prerequisites
    from rotelab.probe.accuracy import Shard, evaluate_run, select_checkpoints
    from rotelab.probe.accuracy_tables import format_summary
    from rotelab.run import Run
    from rotelab.runlock import shard_lock

    r = Run.from_target(target, run)
    sh = Shard.parse(shard) if shard else (Shard.from_env() or Shard())
    _threads_for_shards(sh.count)
    run_prerequisites(r, "eval", sharded=sh.count > 1, progress=not no_progress, echo=typer.echo)
    with shard_lock(r.root, "rotelab eval" + (f" --shard {sh.index}/{sh.count}" if sh.count > 1 else ""), sh.index, sh.count):
        table = evaluate_run(r, engine=engine, checkpoints=_csv(checkpoints), kinds=_csv(kinds), progress=not no_progress, shard=sh, redo=redo)
        if sh.count == 1:  # shards write only their own cells; the unsharded eval (or rotelab run) tracks
            from rotelab.pipeline import track_eval

            track_eval(r)
    for e in select_checkpoints(r, _csv(checkpoints), sh):
        typer.echo("")
        typer.echo(format_summary(r, e.id, table))


@app.command("tui")
def tui(
    target: Annotated[Path, typer.Argument(help="A run directory, or a folder of runs (a picker opens).")],
) -> None:
    """Browse a run in the terminal: layers × checkpoints, projections, curves, accuracy, facts."""
    from rotelab.tui import run_tui

    run_tui(target)


@app.command("report")
def report_cmd(
    targets: Annotated[list[str], typer.Argument(help="Run directories, folders of runs or (sweep) config files.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: reports/<experiment name>/).")] = None,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where a config's runs live.")] = Path("runs"),
) -> None:
    """Statistics over an experiment's sibling runs (mean, 95% t-interval, Appendix-D tests) as
    report.md, CSVs and figures. Reads the stores only; never trains or evaluates."""
    from rotelab.analyses.report import report

    for rep in report(targets, out, runs_dir):
        note = f" ({len(rep.in_progress)} run(s) in progress: committed results only)" if rep.in_progress else ""
        typer.echo(f"{rep.experiment}: {rep.out / 'report.md'}{note}")


@app.command("analyze")
def analyze_cmd(
    target: Target,
    run: RunOpt = None,
    kinds: Annotated[Optional[str], typer.Option(help="Comma-separated prompt kinds (default: every captured kind).")] = None,
    no_progress: NoProgress = False,
) -> None:
    """ΔCosSim curves, PCA/UMAP projections, key-token alignment drift and (analyses.patching)
    activation patching into the run's store; does only what is missing."""
    from rotelab.analyses import analyze_run
    from rotelab.pipeline import run_prerequisites
    from rotelab.run import Run
    from rotelab.runlock import run_lock

    r = Run.from_target(target, run)
    with run_lock(r.root, "rotelab analyze"):
        run_prerequisites(r, "analyze", progress=not no_progress, echo=typer.echo)
        summary = analyze_run(r, kinds=_csv(kinds), progress=not no_progress, note=typer.echo)
    dc = sum(summary["delta_cossim"].values())
    pr = sum(summary["projections"].values())
    typer.echo(f"{r.root}: written now: ΔCosSim rows {dc}, projection cells {pr}; alignment table rows {summary['alignment']}; "
               f"patching checkpoints {summary['patching']}")


@app.command("figures")
def figures_cmd(
    target: Target,
    run: RunOpt = None,
    no_progress: NoProgress = False,
) -> None:
    """Render the paper's figures (PNG + PDF + SVG + CSV) whose data exist into the run's figures/."""
    from rotelab.analyses import figures_run
    from rotelab.pipeline import run_prerequisites
    from rotelab.run import Run
    from rotelab.runlock import run_lock

    r = Run.from_target(target, run)
    with run_lock(r.root, "rotelab figures"):
        run_prerequisites(r, "figures", progress=not no_progress, echo=typer.echo)
        out = figures_run(r, note=lambda m: None)
    for name, path in out.items():
        typer.echo(f"{name:28s} {path}")


def _threads_for_shards(count: int) -> None:
    """Re-apply the thread rule (rotelab.threads) for ``count`` processes of a sharded command."""
    from rotelab import threads

    threads.apply(int(count))


def main() -> None:
    """Entry point: every failure is one line on stderr — user errors (``rotelab: error: …``) and
    usage errors exit 2, Ctrl-C exits 130 (``rotelab: interrupted``)."""
    try:
        from rotelab import threads

        threads.apply()  # before any stage imports torch; sharded commands re-decide for their share
        rc = app(standalone_mode=False)
    except RotelabError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _interrupted()
    except typer.TyperException as err:  # usage errors of typer's (bundled) click
        if not err.format_message().strip():  # `rotelab` alone: the help was printed
            sys.exit(getattr(err, "exit_code", 2))
        _fail(_usage_message(err))
    except OSError as err:  # e.g. a full disk in a library's writer: name the file, keep it one line
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"{where}{err.strerror or err}")
    if rc == 130:  # typer turns a KeyboardInterrupt inside a command into Exit(130)
        _interrupted()
    if isinstance(rc, int) and rc:
        sys.exit(rc)


def _usage_message(err: typer.TyperException) -> str:
    msg = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        msg += f" (see: {ctx.command_path} --help)"
    return msg


def _fail(message: str) -> None:
    typer.echo(f"rotelab: error: {' '.join(message.split())}", err=True)
    sys.exit(2)


def _interrupted() -> None:
    typer.echo("rotelab: interrupted", err=True)
    sys.exit(130)


if __name__ == "__main__":
    main()
