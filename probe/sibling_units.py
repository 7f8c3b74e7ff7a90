"""Evaluation units a sweep sibling already computed on the same weights.

A sweep links a later sibling's base and phase-1 checkpoints to the folders an earlier sibling
trained (:func:`rotelab.train.import_phase1`): ``checkpoints/p1-e03`` is a symlink to
``../<sibling>/checkpoints/p1-e03``. Evaluating such a checkpoint again computes the same numbers a
second time — e.g. ``table1a-memorize-more`` (four phase-2 starts per seed) evaluated each seed's 21
phase-1 points four times. :func:`copy_sibling_units` copies a unit from the sibling's store instead,
only when every input of the unit's numbers is verifiably the same:

* **weights and tokenizer:** the checkpoint folder of this run is a symlink that resolves to the
  sibling's folder of the same id (one folder, not a copy);
* **the questions:** the kind's tokenized plan (:class:`~rotelab.probe.accuracy_metrics.KindPlan`:
  every scoring request, option and generation prompt, in item order) built from the sibling's
  items equals this run's (the ``split`` labels may differ, e.g. another ``phase2.k``: no per-item
  number depends on them);
* **how they were computed:** the settings that change the numbers or their float rounding agree
  (``model``, ``eval.engine``, ``eval.batch_size``, ``eval.max_new_tokens``,
  ``eval.prefix_caching``, ``capture.batch_size``, ``capture.device``);
* **the unit itself:** committed in the sibling's store and not stale
  (:func:`~rotelab.probe.eval_units.unit_stale`).

A copied unit is written like a computed one (all arrays, then the commit markers); its provenance
is the sibling's, plus ``copied_from`` (the sibling's folder name). Anything that does not match is
simply computed. Capture slabs are not copied (the capture stage computes them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rotelab.checkpoints import CheckpointEntry
from rotelab.errors import RotelabError
from rotelab.run import Run

from .accuracy_metrics import METRIC_ARRAYS, KindPlan

_SAME_SETTINGS = ("eval.engine", "eval.batch_size", "eval.max_new_tokens", "eval.prefix_caching", "capture.batch_size", "capture.device")


def sibling_root(run: Run, entry: CheckpointEntry) -> Path | None:
    """The root of the run whose folder ``entry``'s checkpoint links to (same checkpoint id), or ``None``."""
    if entry.path is None:
        return None
    link = run.root / entry.path
    if not link.is_symlink():
        return None
    target = link.resolve()
    if target.name != Path(entry.path).name or target.parent.name != "checkpoints":
        return None
    root = target.parent.parent
    if root == run.root.resolve() or not (root / "config.yaml").is_file():
        return None
    return root


def _open_source(run: Run, root: Path) -> tuple[Run, Any] | None:
    """``(sibling run, its store opened read-only)`` when the sibling has the same settings and a
    store of its own, else ``None``."""
    from rotelab.store import Store

    try:
        src = Run.open(root)
        if not same_settings(run, src) or not (src.store_path / "zarr.json").is_file():
            return None
        return src, Store.open(src.store_path, fingerprint=src.fingerprint(), mode="r")
    except RotelabError:
        return None


def _setting(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def same_settings(a: Run, b: Run) -> bool:
    """Whether two runs agree on the model and the settings in :data:`_SAME_SETTINGS`."""
    return a.config.model == b.config.model and all(_setting(a.config, k) == _setting(b.config, k) for k in _SAME_SETTINGS)


def copy_sibling_units(
    run: Run,
    groups: Mapping[str, Any],
    todo: Sequence[tuple[CheckpointEntry, str]],
    plans: Mapping[str, KindPlan],
    plan_of: Callable[[Run, str], KindPlan],
) -> set[tuple[str, str]]:
    """Copy the units of ``todo`` (``(entry, kind)``) that a sibling computed on the same folder
    into this run's kind groups ``groups``; returns the ``(checkpoint id, kind)`` pairs copied.

    ``plans``: this run's plan per kind; ``plan_of(source, kind)``: the same plan built from the
    source run's items (compared for equality).
    """
    from .eval_units import unit_done, unit_provenance, unit_stale

    sources: dict[Path, tuple[Run, Any] | None] = {}
    same_plan: dict[tuple[Path, str], bool] = {}
    copied: set[tuple[str, str]] = set()
    for e, kind in todo:
        root = sibling_root(run, e)
        if root is None:
            continue
        if root not in sources:  # each sibling opened once, not once per unit
            sources[root] = _open_source(run, root)
        got = sources[root]
        if got is None:
            continue
        src, st = got
        if kind not in st.kinds():
            continue
        kg = st.kind(kind)
        if e.id not in kg.checkpoints or not unit_done(kg, e.id) or unit_stale(kg, e.id):
            continue
        key = (src.root, kind)
        if key not in same_plan:
            try:
                same_plan[key] = plan_of(src, kind) == plans[kind]
            except RotelabError:
                same_plan[key] = False
        if not same_plan[key]:
            continue
        arrays = {name: kg.read_item_array(name, checkpoints=[e.id])[0] for name in METRIC_ARRAYS}
        prov = {**(unit_provenance(kg, e.id) or {}), "copied_from": src.root.name}
        groups[kind].write_item_arrays(e.id, arrays, attrs={**prov, f"provenance/{e.id}": prov})
        copied.add((e.id, kind))
    return copied
