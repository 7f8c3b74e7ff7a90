"""The "where the fact lives" steps of ``rotelab analyze`` (issue 16), each switched by the
``analyses`` config section and each doing only what is missing:

* ``analyses.logit_lens`` — :mod:`.logit_lens`: ``logit_lens_logprob`` / ``logit_lens_rank``
  [checkpoint, layer, item] in every captured kind;
* ``analyses.probes`` — :mod:`.probes`: ``probe_relation_acc`` [checkpoint, layer] in the
  ``probe_kinds``, ``probe_transfer_acc`` (trained on key) in the ``probe_transfer_kinds``;
* ``analyses.cka`` — :mod:`.cka`: ``cka_prev`` / ``cka_base`` [checkpoint, layer] in every captured kind;
* ``analyses.onset`` — :mod:`.onset`: the store table ``onset`` (from ``gen_correct``; needs no capture);
* ``analyses.causal_trace`` — :mod:`.causal_trace`: the store table ``causal_trace`` (new forward
  passes of the stage checkpoints; needs no capture).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rotelab.run import Run
    from rotelab.store import Store

Note = Callable[[str], None]


def where_run(run: Run, store: Store, kinds: Sequence[str], *, progress: bool = True, note: Note = print) -> dict[str, Any]:
    """Run the enabled steps over the captured ``kinds``; returns ``{"logit_lens": {kind: cells},
    "probes": {kind: cells}, "cka": {kind: cells}, "onset": rows, "causal_trace": rows}``."""
    cfg = run.config.analyses
    out: dict[str, Any] = {"logit_lens": {}, "probes": {}, "cka": {}, "onset": 0, "causal_trace": 0}
    kinds = list(kinds)
    if cfg.logit_lens and kinds:
        from .logit_lens import logit_lens_run

        out["logit_lens"] = logit_lens_run(run, store, kinds, progress=progress, note=note)
    if cfg.probes:
        from .probes import probes_kind

        key = store.kind("key") if "key" in kinds else None
        for k in kinds:
            rel, tr = k in cfg.probe_kinds, k in cfg.probe_transfer_kinds and key is not None and k != "key"
            if rel or tr:
                out["probes"][k] = probes_kind(store.kind(k), key if tr else None, n_splits=cfg.probe_folds,
                                               C=cfg.probe_C, relation=rel, note=note)
    if cfg.cka:
        from .cka import cka_kind

        for k in kinds:
            out["cka"][k] = cka_kind(run, store.kind(k), note=note)
    if cfg.onset:
        from .onset import onset_run

        t = onset_run(run, store, threshold=cfg.onset_threshold, note=note)
        out["onset"] = 0 if t is None else len(t)
    if cfg.causal_trace.enabled:
        from .causal_trace import causal_trace_run

        t = causal_trace_run(run, progress=progress, note=note)
        out["causal_trace"] = 0 if t is None else len(t)
    return out


__all__ = ["where_run"]
