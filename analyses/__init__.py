"""rotelab.analyses — ΔCosSim, projections, key-token alignment drift, activation patching,
logit lens, causal tracing, relation probes, CKA drift, generalization onset, statistics across seeds and the
paper's figures.

Pure functions over numpy (``delta_cossim``, ``relation_similarities``, ``alignment_by_relation``,
``fit_projection``/``project``, ``seed_statistics``) and store-level drivers (``analyze_run``,
``patch``, ``figures_run``). Heavy modules (nnsight, matplotlib, umap) load only when used.
"""

from __future__ import annotations

from typing import Any

from .alignment import alignment_by_relation, key_prompt_cosines, with_delta
from .cossim import delta_cossim, relation_similarities
from .projections import fit_projection, project, project_kinds, project_slabs
from .stats import one_sided_t, run_statistics, seed_statistics

_LAZY = {
    "analyze_run": "analyze", "delta_cossim_kind": "analyze", "delta_cossim_table": "analyze",
    "alignment_run": "analyze", "patching_run": "analyze",
    "patch": "patching", "patched_forward": "patching", "hidden_states_at": "patching", "ModelCache": "patching",
    "sample_items": "patching",
    "figures_run": "figures", "metric_table": "metrics", "write_summary": "summary",
    "logit_lens_run": "logit_lens", "logit_lens_table": "logit_lens",
    "final_norm_and_head": "logit_lens", "probe_accuracy": "probes", "transfer_accuracy": "probes",
    "fact_folds": "probes", "linear_cka": "cka", "onset_index": "onset", "onset_run": "onset", "where_run": "where",
    "causal_trace_run": "causal_trace", "trace_items": "causal_trace",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'rotelab.analyses' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


__all__ = [
    "ModelCache", "alignment_by_relation", "alignment_run", "analyze_run", "delta_cossim", "delta_cossim_kind",
    "delta_cossim_table", "figures_run", "fit_projection", "hidden_states_at", "key_prompt_cosines", "one_sided_t",
    "patch", "patched_forward", "patching_run", "project", "project_kinds", "project_slabs", "relation_similarities",
    "metric_table", "run_statistics", "sample_items", "seed_statistics", "with_delta", "write_summary",
    "fact_folds", "final_norm_and_head", "linear_cka", "logit_lens_run", "logit_lens_table", "onset_index",
    "onset_run", "probe_accuracy", "transfer_accuracy", "where_run", "causal_trace_run", "trace_items",
]
