"""Where the in-context-learning kinds (``icl``, ``icl-translated-*``) are evaluated and captured.

The paper's ICL baseline is the *base* model with the fact stated in its context (§5 / B.5,
Fig. 6); ICL prompts on a trained checkpoint are no paper quantity. ``eval.icl_checkpoints``
(default ``[base]``) and ``capture.icl_checkpoints`` (default ``null``: every checkpoint) name the
checkpoints at which each stage covers these kinds when the command names no ``--checkpoints``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from rotelab.errors import RotelabError
from rotelab.prompts import is_icl_kind

if TYPE_CHECKING:
    from rotelab.run import Run


def icl_checkpoint_ids(run: Run, stage: Literal["eval", "capture"]) -> set[str] | None:
    """The checkpoint ids ``<stage>.icl_checkpoints`` names (``None``: every checkpoint); an id the
    run does not have is an error naming the setting."""
    wanted = getattr(run.config, stage).icl_checkpoints
    if wanted is None:
        return None
    ids = [e.id for e in run.checkpoints()]
    for c in wanted:
        if c not in ids:
            raise RotelabError(f"{run.config_path}: {stage}.icl_checkpoints names {c!r}, not a checkpoint of the run (known: {', '.join(ids)})")
    return set(wanted)


def covers(icl_at: set[str] | None, kind: str, checkpoint: str) -> bool:
    """Whether a stage covers ``(checkpoint, kind)`` given its :func:`icl_checkpoint_ids`
    ``icl_at``: every non-ICL kind everywhere, an ICL kind only at ``icl_at`` (``None``: everywhere)."""
    return icl_at is None or not is_icl_kind(kind) or checkpoint in icl_at
