"""The model-sites layer: where a causal LM's activations are, by name, and how a model is fed.

Everything that reads or writes a hidden state (capture, the logit lens, patching) finds the
model's parts here, so "layer v" means the same tensor everywhere.

Sites
-----
* ``resid[v]`` — the residual stream between blocks: ``resid[0]`` is the embedding output (the
  input of block 0; for GPT-2 it already includes the position embeddings: HF's
  ``hidden_states[0]``), ``resid[v]`` for ``v ≥ 1`` the raw output of block ``v`` (before the final
  norm). These are the store's layers (DESIGN "Store layout"). Note that HF's
  ``output_hidden_states`` puts the *final-normed* output of the last block at ``hidden_states[-1]``;
  here ``resid[n_layers]`` is the last block's raw output and ``final_norm`` what HF reports.
* ``final_norm`` — the output of the decoder's final normalization.
* ``attn[v]`` / ``mlp[v]`` (the attention / MLP output of block ``v``) are reserved names: parsing
  them says they are not available yet, so nothing silently reads the wrong tensor.

:class:`ModelSites` finds the decoder (``model.base_model``: ``LlamaModel``, ``GPT2Model``, …), its
one ``ModuleList`` of ``config.num_hidden_layers`` blocks and its final norm, reads the shape once,
and wraps the model with :class:`nnsight.NNsight` once (cheap: no weights are copied; patching reads
its logits). Capture does not trace: :mod:`rotelab.probe.prompt_pass` reads ``resid[v]`` of the
decoder's blocks by forward hooks on the prompt forward it shares with evaluation.
Inside a trace, :meth:`Wrapped.value` gives the site's proxy, to read or to assign into.

:func:`encode_batches` pads and batches through :mod:`rotelab.batching`, the collator training
and evaluation use as well.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch

from rotelab.batching import Collator, Padded, Side, pad, pad_id
from rotelab.errors import RotelabError

#: Names of the final normalization module on the decoders of common architectures.
_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "layer_norm")
_SITE_RE = re.compile(r"^(resid|attn|mlp)\[(-?\d+)\]$")


@dataclass(frozen=True, order=True)
class Site:
    """One activation site: ``name`` ``resid`` (with ``layer`` 0..n_layers) or ``final_norm``
    (``layer`` None). ``str(site)`` is its canonical name (``resid[3]``, ``final_norm``)."""

    name: Literal["resid", "final_norm"]
    layer: int | None = None

    def __str__(self) -> str:
        return self.name if self.layer is None else f"{self.name}[{self.layer}]"


def resid(layer: int) -> Site:
    """The residual-stream site of store layer ``layer``."""
    return Site("resid", int(layer))


def parse_site(spec: str | Site) -> Site:
    """``"resid[3]"`` / ``"final_norm"`` / a :class:`Site` → :class:`Site`."""
    if isinstance(spec, Site):
        return spec
    s = str(spec).strip()
    if s == "final_norm":
        return Site("final_norm")
    m = _SITE_RE.match(s)
    if m is None:
        raise RotelabError(f"unknown activation site {spec!r} (resid[v] with v = 0..n_layers, or final_norm)")
    if m.group(1) != "resid":
        raise RotelabError(f"activation site {spec!r}: {m.group(1)}[v] sites are not available yet (resid[v], final_norm)")
    return resid(int(m.group(2)))


def check_layers(layers: Sequence[int] | None, n_layers: int, where: str) -> list[int]:
    """Sorted unique store layers, all in ``0..n_layers``; None means all."""
    if layers is None:
        return list(range(n_layers + 1))
    bad = [int(x) for x in layers if not 0 <= int(x) <= n_layers]
    if bad:
        raise RotelabError(f"{where}: layer {bad[0]} is out of range (this model has layers 0..{n_layers})")
    out = sorted({int(x) for x in layers})
    if not out:
        raise RotelabError(f"{where}: no layers selected")
    return out


def _resolve(obj: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def resid_location(blocks: Any, v: int, n_layers: int) -> tuple[Any, Literal["input", "output"]]:
    """Where site ``resid[v]`` lives in a block list (torch modules or nnsight envoys): the input of
    block 0 for ``v = 0`` (the embedding output), else the output of block ``v − 1`` (0-based)."""
    if not 0 <= v <= n_layers:
        raise RotelabError(f"site resid[{v}]: out of range (resid[0]..resid[{n_layers}])")
    return (blocks[0], "input") if v == 0 else (blocks[v - 1], "output")


def _hidden(h: Any) -> Any:
    """The hidden states of a block's input or output (blocks of some architectures return
    ``(hidden, extras…)``)."""
    return h[0] if isinstance(h, tuple) else h


@dataclass(frozen=True)
class Wrapped:
    """An nnsight wrapper of the model, with
    the envoys of the block list and the final norm resolved once."""

    nn: Any
    blocks: Any
    norm: Any
    n_layers: int

    def value(self, site: Site) -> Any:
        """Inside ``with self.nn.trace(…)``: the proxy of ``site`` ([batch, seq, hidden]), to read or
        to assign into (``value[rows, positions] = states``)."""
        if site.name == "final_norm":
            return _hidden(self.norm.output)
        block, side = resid_location(self.blocks, int(site.layer), self.n_layers)  # type: ignore[arg-type]
        return _hidden(getattr(block, side))


class ModelSites:
    """The sites of one loaded HF causal LM (or a bare decoder); see the module docstring.

    ``decoder``: the base model; ``n_layers``, ``hidden``: its shape; ``device``: where inputs go
    (the input embedding's device, also under a ``device_map``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        decoder = getattr(model, "base_model", model)
        if not isinstance(decoder, torch.nn.Module):
            decoder = model
        self.decoder: torch.nn.Module = decoder
        cfg = getattr(model, "config", None)
        n_layers, hidden = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None)
        name = type(model).__name__
        if n_layers is None or hidden is None:
            raise RotelabError(f"model {name}: config has no num_hidden_layers/hidden_size")
        self.n_layers, self.hidden = int(n_layers), int(hidden)
        blocks = [n for n, m in decoder.named_children() if isinstance(m, torch.nn.ModuleList) and len(m) == self.n_layers]
        if len(blocks) != 1:
            raise RotelabError(f"model {name}: cannot find its list of {self.n_layers} transformer blocks")
        norms = [n for n in _NORM_NAMES if isinstance(getattr(decoder, n, None), torch.nn.Module)]
        if not norms:
            raise RotelabError(f"model {name}: cannot find its final norm (looked for {', '.join(_NORM_NAMES)})")
        self.blocks_name, self.norm_name = blocks[0], norms[0]
        prefix = next((n for n, m in model.named_modules() if m is decoder), "")
        self.decoder_path = prefix  # "" when the model is the decoder itself

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return getattr(self.decoder, self.blocks_name)

    @property
    def norm(self) -> torch.nn.Module:
        return getattr(self.decoder, self.norm_name)

    @property
    def device(self) -> torch.device:
        emb = self.decoder.get_input_embeddings() if hasattr(self.decoder, "get_input_embeddings") else None
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight.device
        return next(self.decoder.parameters()).device

    def hook_resid(self, v: int, fn: Callable[[torch.Tensor], None]) -> Any:
        """Call ``fn`` with site ``resid[v]``'s value [batch, seq, hidden] on every forward of the
        model (a plain torch hook, no nnsight); returns the hook handle (``.remove()``)."""
        block, side = resid_location(self.blocks, v, self.n_layers)
        if side == "input":
            return block.register_forward_pre_hook(
                lambda _m, args, kwargs: fn(_hidden(args[0] if args else kwargs["hidden_states"])), with_kwargs=True
            )
        return block.register_forward_hook(lambda _m, _args, out: fn(_hidden(out)))

    def sites(self) -> list[Site]:
        """Every readable site: ``resid[0..n_layers]`` and ``final_norm``."""
        return [resid(v) for v in range(self.n_layers + 1)] + [Site("final_norm")]

    def check(self, site: str | Site) -> Site:
        """Parse ``site`` and check it exists on this model."""
        s = parse_site(site)
        if s.name == "resid" and not 0 <= int(s.layer) <= self.n_layers:  # type: ignore[arg-type]
            raise RotelabError(f"site {s}: out of range for this model (resid[0]..resid[{self.n_layers}]; 0 = embeddings)")
        return s

    def _wrap(self, root: torch.nn.Module, prefix: str) -> Wrapped:
        import nnsight

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nn = nnsight.NNsight(root)
        base = _resolve(nn, prefix)
        return Wrapped(nn, getattr(base, self.blocks_name), getattr(base, self.norm_name), self.n_layers)

    @cached_property
    def wrapped_model(self) -> Wrapped:
        """The whole model wrapped once (its trace's ``nn.output.logits`` are the logits)."""
        return self._wrap(self.model, self.decoder_path)


@dataclass(frozen=True)
class Batch:
    """One padded batch of :func:`encode_batches`: ``rows`` (positions in the caller's list) and
    the padded tensors on the model's input device."""

    rows: list[int]
    padded: Padded


def encode_batches(
    sequences: Sequence[Sequence[int]],
    tokenizer: Any,
    batch_size: int,
    *,
    side: Side = "right",
    key: Callable[[int], Any] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[Batch]:
    """Batches of ``sequences`` (token ids) in :class:`rotelab.batching.Collator` order (``key``;
    None keeps the given order), padded on ``side`` with the tokenizer's pad id."""
    token = pad_id(tokenizer)
    for rows in Collator(len(sequences), batch_size, key).batches():
        p = pad([sequences[i] for i in rows], token, side)
        yield Batch(rows, p.to(device) if device is not None else p)
