"""The nnsight trace that reads the last prompt token's hidden state at a list of sites.

nnsight 0.8 reads the source of the ``with model.trace(...)`` block it runs, so the trace lives here,
in a real module file. Only the model's *decoder* is run (:attr:`ModelSites.wrapped_decoder`): the
logits are never needed, so their cost (vocab × hidden per position) is skipped. The sites and
their numbering are :mod:`rotelab.probe.sites`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rotelab.batching import Padded

from .sites import Site, Wrapped


def trace_last_token(wrapped: Wrapped, sites: Sequence[Site], batch: Padded) -> torch.Tensor:
    """Run one right-padded batch (on the model's input device) and return the hidden state of
    each row's last real token at every site: float32 ``[site, batch, hidden]`` on the CPU."""
    import nnsight

    if not sites:
        return torch.empty(0, batch.input_ids.shape[0], 0)
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    last = batch.last
    with torch.no_grad():
        with wrapped.nn.trace(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
        ):
            picked = nnsight.save([])
            for site in sites:
                h = wrapped.value(site)
                picked.append(h[rows.to(h.device), last.to(h.device)].float().cpu())
    return torch.stack(picked)
