"""The ordered checkpoint series of a run: ``checkpoints/index.json``.

The trainer appends an entry only after the checkpoint's folder is complete (written to a temporary
folder, then renamed), so the index lists exactly the complete checkpoints. Every later stage reads
the series through :func:`read_index`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rotelab.errors import RotelabError
from rotelab.facts import atomic_write_text


@dataclass(frozen=True)
class CheckpointEntry:
    """One point of the series. ``path`` is relative to the run; ``None`` once its weights were
    dropped (``train.keep_weights``) — the later stages record what they need first."""

    id: str
    phase: str
    """``base``, ``phase1``, ``phase2`` or a baseline/series name such as ``sft``."""
    epoch: float
    step: int
    tokens_seen: int
    loss: float | None
    path: str | None
    series: str = "main"
    """Which series the point belongs to: ``main`` (base → phase 1 → phase 2 → inject) or a
    baseline (``sft``, ``sft-k``)."""
    total_tokens: int | None = None
    """Training tokens from the base model to this point along its series (``tokens_seen`` counts
    the point's own stage only): phase 1 + phase 2 (+ inject) for ``main``, the baseline's own for
    a baseline — the x-axis of the paper's Fig. 5. A token is one position of a training sequence
    (prompt and answer, BOS included, no padding), counted once per epoch it is trained. ``None`` in
    indexes written before it was recorded."""


def read_index(path: Path) -> list[CheckpointEntry]:
    """The series in order; a missing file is an empty series."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [CheckpointEntry(**e) for e in data["checkpoints"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RotelabError(f"{path}: not a valid checkpoint index ({err})") from None


def write_index(path: Path, entries: list[CheckpointEntry], extra: dict | None = None) -> None:
    """Replace the index atomically."""
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise RotelabError(f"{path}: duplicate checkpoint ids")
    data = {"checkpoints": [asdict(e) for e in entries], **(extra or {})}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
