"""Export what the browser shows as paper figures, through the analyses' figure functions
(:mod:`rotelab.analyses.figures`: one consistent style, PNG + PDF + SVG and the data as CSV).

The browser only decides *which* figure and with which selection; drawing is the analyses' job:

* main view → :func:`plot_projection_panels` of the selected checkpoint × layer (one file set per
  visible kind; ΔCosSim in the title) and :func:`plot_delta_cossim_layers` at that checkpoint;
* patching screen → :func:`plot_patching_heatmap` of the panel shown.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotelab.errors import RotelabError
from rotelab.run import Run

FILE_TYPES = ("png", "pdf", "svg", "csv")


@dataclass(frozen=True)
class ViewSelection:
    """The main screen's selection: kinds shown, projection array, checkpoint id, layer value."""

    kinds: tuple[str, ...]
    projection: str
    checkpoint: str
    layer: int
    with_delta_cossim: bool = True


def _figures() -> Any:
    try:
        return importlib.import_module("rotelab.analyses.figures")
    except ImportError as err:
        raise RotelabError(f"figure export needs rotelab.analyses.figures ({err})") from None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def _render(fn: Callable[..., Any], name: str, out_dir: Path, *args: Any, **kwargs: Any) -> list[Path]:
    import matplotlib.pyplot as plt

    fig = fn(*args, name=name, out_dir=out_dir, save=True, **kwargs)
    plt.close(fig)
    return [out_dir / f"{name}.{ext}" for ext in FILE_TYPES]


def export_view(run: Run, sel: ViewSelection, out_dir: Path) -> list[Path]:
    """Paper figures of the main view into ``out_dir``; returns the files (PNG first)."""
    figs = _figures()
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for kind in sel.kinds:
        name = _safe(f"tui_{sel.projection}_{kind}_{sel.checkpoint}_layer{sel.layer}")
        paths += _render(figs.plot_projection_panels, name, out_dir, run, kind, layer=sel.layer,
                         checkpoints=[sel.checkpoint], projection=sel.projection)
    if sel.with_delta_cossim:
        name = _safe(f"tui_delta_cossim_layers_{sel.checkpoint}")
        paths += _render(figs.plot_delta_cossim_layers, name, out_dir, run, list(sel.kinds), checkpoints=[sel.checkpoint])
    return paths


def export_patching(run: Run, keys: dict[str, str], out_dir: Path) -> list[Path]:
    """The patching heatmap of one panel (``keys``: source_kind, target_kind, metric, position)."""
    figs = _figures()
    src, tgt = keys.get("source_kind", "key"), keys.get("target_kind", "test")
    name = _safe(f"tui_patching_{src}_to_{tgt}_{keys.get('metric', '')}_{keys.get('position', 'last')}")
    return _render(figs.plot_patching_heatmap, name, Path(out_dir), run, src, tgt,
                   metric=keys.get("metric"), position=keys.get("position", "last"))


def export_where(run: Run, keys: dict[str, str], out_dir: Path) -> list[Path]:
    """The where-the-fact-lives figure of one panel (``keys``: ``array`` of
    :data:`rotelab.tui.data.WHERE_ARRAYS`, ``kind``): the same analysis for every kind, as
    :mod:`rotelab.analyses.figures_where` draws it."""
    try:
        fw = importlib.import_module("rotelab.analyses.figures_where")
    except ImportError as err:
        raise RotelabError(f"figure export needs rotelab.analyses.figures_where ({err})") from None
    array, out = keys.get("array", ""), Path(out_dir)
    name = _safe(f"tui_{array}")
    if array == "logit_lens_prob":
        return _render(fw.plot_logit_lens, name, out, run, value="prob")
    if array.startswith("probe_"):
        return _render(fw.plot_probe, name, out, run, array)
    if array.startswith("cka_"):
        return _render(fw.plot_cka, name, out, run, array)
    raise RotelabError(f"no figure for the where panel {array!r}")


def describe(paths: Sequence[Path]) -> str:
    """One line for the notification: the first file and the other types."""
    if not paths:
        return "nothing exported"
    others = sorted({p.suffix[1:] for p in paths[1:]})
    n = len({p.stem for p in paths})
    return f"exported {n} figure{'s' if n > 1 else ''} to {paths[0]} (+ {', '.join(others)})"
