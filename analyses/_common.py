"""Small helpers the analyses share: opening a run's store, choosing reference checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rotelab.errors import RotelabError

if TYPE_CHECKING:
    from rotelab.run import Run
    from rotelab.store import KindGroup, Store

FINAL_NORM_LAYER = -1
"""The pseudo-layer of the analyses that selects the ``final_norm`` state (the last block's output
after the model's final norm, what the LM head reads). Layers ``0…L`` are the raw hidden states:
0 = embedding output, i = output of block i, so layer L is the last block *before* the final norm.
The paper (F.1: "the hidden state of the final token from a specified transformer layer") does not
say which of the two its last-layer numbers use; the analyses compute both."""


def representation(layer: int) -> str:
    """``final_norm`` for :data:`FINAL_NORM_LAYER`, else ``raw``."""
    return "final_norm" if layer == FINAL_NORM_LAYER else "raw"


def read_state(group: KindGroup, checkpoint: str, layer: int) -> np.ndarray:
    """[item, hidden] of one checkpoint at ``layer`` (:data:`FINAL_NORM_LAYER`: the ``final_norm`` array)."""
    if layer == FINAL_NORM_LAYER:
        return group.read_final_norm([checkpoint])[0]
    return group.read_slab(checkpoint, layer)


def final_norm_committed(group: KindGroup) -> np.ndarray:
    """bool [checkpoint]: whether ``final_norm`` of each checkpoint is committed (False when absent)."""
    if "final_norm" not in group.arrays():
        return np.zeros(len(group.checkpoints), bool)
    return np.asarray(group.committed("final_norm"), bool)


def open_store(run: Run, mode: str = "a") -> Store:
    """The run's store (``mode="r"`` for figures; it must exist)."""
    from rotelab.store import Store

    if not run.store_path.exists():
        raise RotelabError(f"{run.store_path}: no store yet (run `rotelab capture` / `rotelab eval` first)")
    return Store.open(run.store_path, fingerprint=run.fingerprint(), mode=mode)  # type: ignore[arg-type]


def captured_kinds(store: Store) -> list[str]:
    """Kinds whose group holds at least one committed activations slab."""
    out = []
    for k in store.kinds():
        g = store.kind(k)
        if g.hidden is not None and g.committed("activations").any():
            out.append(k)
    return out


def reference_checkpoint(run: Run, ids: list[str] | None = None) -> str:
    """``config.analyses.reference_checkpoint`` or the last phase-1 checkpoint of the ``main``
    series (falls back to the first checkpoint of the series when there is no phase 1)."""
    ref = run.config.analyses.reference_checkpoint
    entries = run.checkpoints()
    known = [e.id for e in entries] if ids is None else ids
    if ref is not None:
        if ref not in known:
            raise RotelabError(f"{run.config_path}: analyses.reference_checkpoint {ref!r} is not a checkpoint ({', '.join(known)})")
        return ref
    main = [e for e in entries if e.series == "main"]
    p1 = [e.id for e in main if e.phase == "phase1"]
    if p1:
        return p1[-1]
    if main:
        return main[0].id
    if known:
        return known[0]
    raise RotelabError(f"{run.index_path}: no checkpoints")


def stage_checkpoints(run: Run) -> dict[str, str]:
    """``{"base": id, "rote": last phase-1 id, "generalization": last phase-2 id}`` of the main
    series (stages without a checkpoint are left out)."""
    main = [e for e in run.checkpoints() if e.series == "main"]
    out: dict[str, str] = {}
    for phase, stage in (("base", "base"), ("phase1", "rote"), ("phase2", "generalization")):
        ids = [e.id for e in main if e.phase == phase]
        if ids:
            out[stage] = ids[-1] if phase != "base" else ids[0]
    return out
