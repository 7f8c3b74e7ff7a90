"""The nnsight trace that reads the last prompt token's hidden state at every requested layer.

nnsight 0.8 reads the source of the ``with model.trace(...)`` block it runs, so the trace lives here,
in a real module file. The model is wrapped with :class:`nnsight.NNsight` (any ``torch.nn.Module``;
``LanguageModel`` is deprecated in 0.8 and would reload the weights), and only its *decoder* (the
base model without the LM head: ``LlamaModel``, ``GPT2Model``, …) is run: the logits are never
needed, so their cost (vocab × hidden per position) is skipped.

Layer convention (DESIGN "Store layout"): layer 0 is the embedding output (the input of block 0,
which for GPT-2 already includes the position embeddings: HF's ``hidden_states[0]``), layer i is
the raw output of block i, and the final-norm output is read separately. Note that HF's
``output_hidden_states`` puts the *final-normed* output of the last block at ``hidden_states[-1]``;
here layer ``n_layers`` is the last block's raw output, and ``final_norm`` is what HF reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rotelab.errors import RotelabError

if TYPE_CHECKING:  # nnsight (and with it transformers) is imported when a trace is first made
    import nnsight

#: Names of the final normalization module on the decoders of common architectures.
_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "layer_norm")


@dataclass(frozen=True)
class DecoderParts:
    """Where the pieces of a causal LM's decoder are.

    ``decoder``: the base model that is run (input_ids → last hidden state); ``blocks``: the
    attribute name of its ``ModuleList`` of transformer blocks; ``norm``: the attribute name of its
    final normalization; ``n_layers``: number of blocks; ``hidden``: hidden size.
    """

    decoder: torch.nn.Module
    blocks: str
    norm: str
    n_layers: int
    hidden: int


def decoder_parts(model: torch.nn.Module) -> DecoderParts:
    """Find the decoder, its block list and its final norm in a HF causal LM (or a bare decoder)."""
    decoder = getattr(model, "base_model", model)
    if not isinstance(decoder, torch.nn.Module):
        decoder = model
    cfg = getattr(model, "config", None)
    n_layers = getattr(cfg, "num_hidden_layers", None)
    hidden = getattr(cfg, "hidden_size", None)
    name = type(model).__name__
    if n_layers is None or hidden is None:
        raise RotelabError(f"model {name}: config has no num_hidden_layers/hidden_size")
    blocks = [n for n, m in decoder.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if len(blocks) != 1:
        raise RotelabError(f"model {name}: cannot find its list of {n_layers} transformer blocks")
    norms = [n for n in _NORM_NAMES if isinstance(getattr(decoder, n, None), torch.nn.Module)]
    if not norms:
        raise RotelabError(f"model {name}: cannot find its final norm (looked for {', '.join(_NORM_NAMES)})")
    return DecoderParts(decoder, blocks[0], norms[0], int(n_layers), int(hidden))


def wrap(parts: DecoderParts) -> "nnsight.NNsight":
    """The nnsight wrapper of the decoder (cheap: no weights are copied)."""
    import nnsight

    return nnsight.NNsight(parts.decoder)


def trace_last_token(
    wrapped: "nnsight.NNsight",
    parts: DecoderParts,
    layers: Sequence[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    last: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one batch and return the hidden states of token ``last[b]`` of every row ``b``.

    ``input_ids``, ``attention_mask``, ``position_ids``: [batch, seq] on the embedding's device;
    ``last``: [batch] index of each row's last real token; ``layers``: ascending layer numbers
    (0 = embedding output, i = output of block i). Returns ``(hidden [layer, batch, hidden],
    final_norm [batch, hidden])``, float32 on the CPU.
    """
    import nnsight

    blocks = getattr(wrapped, parts.blocks)
    norm = getattr(wrapped, parts.norm)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    with torch.no_grad():
        with wrapped.trace(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False):
            picked = nnsight.save([])
            for layer in layers:
                h = blocks[0].input if layer == 0 else blocks[layer - 1].output
                if isinstance(h, tuple):  # blocks of some architectures return (hidden, extras…)
                    h = h[0]
                picked.append(h[rows.to(h.device), last.to(h.device)].float().cpu())
            final = norm.output
            if isinstance(final, tuple):
                final = final[0]
            final_last = final[rows.to(final.device), last.to(final.device)].float().cpu().save()
    hidden = torch.stack(picked) if picked else torch.empty(0, input_ids.shape[0], parts.hidden)
    return hidden, final_last
