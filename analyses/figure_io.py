"""Figure plumbing shared by :mod:`.figures` and :mod:`.figures_where`: headless matplotlib, the
one paper style, saving a figure with its data (PNG, PDF, SVG and CSV), checkpoint order."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from rotelab.errors import RotelabError  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from rotelab.run import Run

#: The one paper style (pass ``style=`` to override keys).
STYLE: dict[str, Any] = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.alpha": 0.3, "grid.linewidth": 0.5, "lines.linewidth": 1.5, "lines.markersize": 3.5,
    "savefig.dpi": 200, "savefig.bbox": "tight", "figure.dpi": 100, "pdf.fonttype": 42, "svg.fonttype": "none",
}
def save_figure(fig: Figure, data: pd.DataFrame, name: str, out_dir: str | Path) -> Path:
    """Write ``name``.png/.pdf/.svg and the data as ``name``.csv into ``out_dir``; returns the PNG path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for ext in ("png", "pdf", "svg"):
        fig.savefig(out / f"{name}.{ext}")
    data.to_csv(out / f"{name}.csv", index=False)
    return out / f"{name}.png"


def finish(fig: Figure, data: pd.DataFrame, name: str, run: Run | None, out_dir: str | Path | None, save: bool) -> Figure:
    fig.set_label(name)
    fig.rotelab_data = data  # type: ignore[attr-defined]  # the plotted data (also the CSV)
    if save:
        if out_dir is None and run is None:
            raise RotelabError(f"figure {name}: give out_dir")
        save_figure(fig, data, name, out_dir if out_dir is not None else run.figures_dir)  # type: ignore[union-attr]
    return fig


def checkpoint_order(run: Run) -> dict[str, int]:
    return {e.id: i for i, e in enumerate(run.checkpoints())}


__all__ = ["STYLE", "checkpoint_order", "finish", "plt", "save_figure"]
