"""Small helpers the analyses share: opening a run's store, choosing reference checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rotelab.errors import RotelabError

if TYPE_CHECKING:
    from rotelab.run import Run
    from rotelab.store import Store


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
