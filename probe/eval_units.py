"""Bookkeeping of committed eval units (one kind × one checkpoint) in a kind group of the store:
whether a unit is committed, the provenance recorded with it, and whether it is stale.

Shared by :mod:`rotelab.probe.accuracy` (which units to compute) and
:mod:`rotelab.probe.sibling_units` (which units a sweep sibling may copy).
"""

from __future__ import annotations

from .accuracy_metrics import METRIC_ARRAYS

#: Version of the evaluation code, recorded in every result's provenance (``eval_code_version``).
#: 1 = no version recorded (vLLM swap defect on tied models); 2 = verified vLLM swap (2026-12-01).
EVAL_CODE_VERSION = 2
#: vLLM results written by an eval code version below this are stale (see :mod:`rotelab.probe.accuracy`).
VERIFIED_SWAP_VERSION = 2


def unit_done(kg, checkpoint: str) -> bool:
    """Whether all metric arrays of ``checkpoint`` are committed in kind group ``kg``."""
    return all(kg.is_committed(name, checkpoint) for name in METRIC_ARRAYS)


def unit_provenance(kg, checkpoint: str) -> dict | None:
    """The provenance recorded with a committed unit (``None`` where an array lacks it)."""
    provs = [kg.array_attrs(name).get(f"provenance/{checkpoint}") for name in METRIC_ARRAYS]
    if any(not isinstance(p, dict) for p in provs):
        return None
    return provs[0]


def unit_stale(kg, checkpoint: str) -> bool:
    """Whether a committed unit must be recomputed: no provenance, or vLLM results (scoring or
    generation) written by an eval code version below :data:`VERIFIED_SWAP_VERSION`."""
    prov = unit_provenance(kg, checkpoint)
    if prov is None:
        return True
    version = int(prov.get("eval_code_version", 1))
    return "vllm" in str(prov.get("engine", "")) and version < VERIFIED_SWAP_VERSION
