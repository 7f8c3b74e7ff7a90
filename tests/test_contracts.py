"""Architecture contracts (CONTRIBUTING.md "Layout and the one-way data flow"):

* the import-direction table, checked by scanning every module's imports with ``ast``;
* ``store``, ``analyses`` and the core never import ``textual`` — statically, and by importing them
  in a fresh interpreter where ``import textual`` fails.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"rotelab": "core", "train": "train", "probe": "probe", "store": "store", "analyses": "analyses", "tui": "tui"}
SUBPACKAGES = {"train", "probe", "store", "analyses", "tui"}
#: What each part may import from rotelab (CONTRIBUTING.md). The store may use only rotelab.errors.
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "train": {"core", "train"},
    "store": {"store"},
    "probe": {"core", "store", "probe"},
    "analyses": {"core", "store", "probe", "analyses"},
    "tui": {"core", "store", "analyses", "tui"},
}
STORE_CORE_MODULES = {"rotelab.errors"}
#: Core modules that orchestrate stages: like the CLI they may import stages inside functions only.
ORCHESTRATORS = {"cli.py", "pipeline.py"}
NO_TEXTUAL = {"core", "train", "probe", "store", "analyses"}


def _modules(folder: str, root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _package_of(folder: str, path: Path, root: Path = ROOT) -> list[str]:
    """The dotted package a module file lives in, as import names (``rotelab.tui`` ...)."""
    base = ["rotelab"] if folder == "rotelab" else ["rotelab", folder]
    rel = path.relative_to(root / folder).parent.parts
    return base + list(rel)


def _imports(folder: str, path: Path, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """(absolute module name, line, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg = _package_of(folder, path, root)
    out: list[tuple[str, int, bool]] = []
    top_level = {id(n) for n in tree.body}
    # imports inside `if TYPE_CHECKING:` blocks at module level do not run
    type_checking: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((a.name, node.lineno, id(node) in top_level))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            for n in names:
                out.append((n, node.lineno, id(node) in top_level))
    return out


def _part(module: str) -> str | None:
    """Which part of rotelab an absolute module name belongs to (None: not rotelab)."""
    parts = module.split(".")
    if parts[0] != "rotelab":
        return None
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    return "core"


def violations(folder: str, root: Path = ROOT) -> list[str]:
    """Imports of ``folder`` that break the table."""
    me = FOLDERS[folder]
    bad = []
    for path in _modules(folder, root):
        orchestrator = folder == "rotelab" and path.name in ORCHESTRATORS
        for mod, line, top in _imports(folder, path, root):
            where = f"{path.relative_to(root)}:{line} imports {mod}"
            if me in NO_TEXTUAL and (mod == "textual" or mod.startswith("textual.")):
                bad.append(f"{where} (only tui may import textual)")
            part = _part(mod)
            if part is None:
                continue
            if orchestrator and not top:
                continue  # the CLI (and the pipeline) import stages lazily inside functions
            if me == "store" and part == "core":
                if mod not in STORE_CORE_MODULES and not any(mod.startswith(m + ".") for m in STORE_CORE_MODULES):
                    bad.append(f"{where} (store may use only rotelab.errors)")
                continue
            if part not in ALLOWED[me]:
                bad.append(f"{where} ({me} may import {sorted(ALLOWED[me])})")
    return bad


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_import_direction(folder: str) -> None:
    bad = violations(folder)
    assert not bad, "\n".join(bad)


def test_scanner_sees_violations(tmp_path: Path) -> None:
    """The scanner on a planted tree: relative, absolute, lazy and TYPE_CHECKING imports."""
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "ok.py").write_text("from .errors import StoreError\nfrom rotelab.errors import RotelabError\n")
    (tmp_path / "store" / "bad.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rotelab.probe import x\n"
        "from ..tui import app\nimport rotelab.config\ndef f():\n    import textual\n"
    )
    (tmp_path / "rotelab").mkdir()
    (tmp_path / "rotelab" / "cli.py").write_text("def cmd():\n    from rotelab.train import t\n")
    (tmp_path / "rotelab" / "run.py").write_text("def f():\n    from rotelab.tui import t\n")
    store_bad = violations("store", tmp_path)
    assert [b.split(" imports ")[1].split(" ")[0] for b in store_bad] == ["rotelab.tui", "rotelab.config", "textual"]
    assert [b.split(":")[0] for b in violations("rotelab", tmp_path)] == ["rotelab/run.py"]


def test_store_and_analyses_import_without_textual() -> None:
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        sys.modules["textual"] = None  # any `import textual` now raises ImportError
        import rotelab.store, rotelab.analyses
        for pkg in (rotelab.store, rotelab.analyses):
            for m in pkgutil.iter_modules(pkg.__path__):
                importlib.import_module(f"{pkg.__name__}.{m.name}")
        import rotelab.config, rotelab.run, rotelab.checkpoints
        assert not any(k == "textual" or k.startswith("textual.") for k, v in sys.modules.items() if v is not None)
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# --------------------------------------------------------------------------- import circles

def _module_name(folder: str, path: Path, root: Path = ROOT) -> str:
    pkg = _package_of(folder, path, root)
    return ".".join(pkg) if path.name == "__init__.py" else ".".join([*pkg, path.stem])


def import_graph(folder: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the modules of the same room it imports (at module level or inside functions;
    ``TYPE_CHECKING`` imports excluded). ``from pkg import name`` counts as importing ``pkg.name``
    when that is a module, else ``pkg`` (its ``__init__``); ``import a.b`` counts as ``a.b``."""
    mods = {_module_name(folder, p, root): p for p in _modules(folder, root)}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        pkg = _package_of(folder, path, root)
        skip: set[int] = set()
        for node in tree.body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else [])) if node.level else (node.module or "")
                for a in node.names:
                    if f"{base}.{a.name}" in mods:
                        graph[name].add(f"{base}.{a.name}")
                    elif base in mods:
                        graph[name].add(base)
        graph[name].discard(name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (an import circle), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


@pytest.mark.parametrize("folder", ["rotelab", "train", "probe", "analyses", "store", "tui"])
def test_no_import_circle_inside_a_room(folder: str) -> None:
    found = circles(import_graph(folder))
    assert not found, "import circles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_circle_finder_sees_a_planted_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from rotelab.probe import f\n")
    (pkg / "c.py").write_text("from .a import f\n")
    assert circles(import_graph("probe", tmp_path)) == [["rotelab.probe", "rotelab.probe.a", "rotelab.probe.b"]]
