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

RunOpt = Annotated[Optional[Path], typer.Option("--run", help="Run directory (default: runs/<config name>).")]
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
    from rotelab.relations import builtin_relations, load_relations, select_relations

    all_rels = load_relations(relations_file)
    names = _csv(relations) or list(builtin_relations())
    rels = select_relations(all_rels, names, "--relations")
    facts = generate_facts(rels, facts_per_relation, seed, distractors)
    validate_facts(facts, rels, distractors, "generated facts")
    write_dataset(out, facts, rels)
    typer.echo(f"wrote {len(facts)} facts over {len(rels)} relations to {out / 'facts.jsonl'}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except RotelabError as err:
        typer.echo(f"rotelab: error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("rotelab: interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
