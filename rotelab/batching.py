"""Padding and batching token sequences: the one collator training, evaluation, capture and
patching share.

* :func:`pad_id` — the token id padding uses: the tokenizer's pad id, else its EOS id, else 0
  (padding is masked out everywhere, so the id only has to be a valid token).
* :func:`pad` — a list of token-id sequences → :class:`Padded` (``input_ids``, ``attention_mask``,
  ``position_ids`` [batch, seq], ``lengths`` [batch]), padded on the ``right`` (position ids
  ``0..seq-1``: a causal model's real tokens never see the right padding) or the ``left`` (position
  ids count real tokens only, so a left-padded row equals the row alone: what generation and
  shared-prefix scoring need). :func:`pad_values` pads any per-token values (e.g. labels with -100).
* :class:`Collator` — sorts items by a key, cuts the sorted order into batches and restores the
  caller's order of the per-item results (after lm-eval's ``Collator``): ``for rows in
  c.batches(): …`` then ``c.restore(results)``.

Training may import only the core, so this primitive lives in the core; ``rotelab.probe.sites``
builds the model-facing layer on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import torch

from rotelab.errors import RotelabError

Side = Literal["left", "right"]
T = TypeVar("T")


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        return int(tokenizer.eos_token_id)
    return 0


@dataclass(frozen=True)
class Padded:
    """A padded batch: ``input_ids``, ``attention_mask`` (1 = real token), ``position_ids``
    [batch, seq] (long, CPU) and ``lengths`` [batch] (real tokens per row)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor

    @property
    def last(self) -> torch.Tensor:
        """[batch] index of each row's last real token (right padding)."""
        return self.lengths - 1

    def to(self, device: torch.device | str) -> "Padded":
        return Padded(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device), self.lengths.to(device))


def pad_values(seqs: Sequence[Sequence[int]], value: int, side: Side = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [batch, max_len], mask [batch, max_len])`` of ``seqs`` padded with ``value``."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    n = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), n), int(value), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
        out[i, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    return out, mask


def pad(seqs: Sequence[Sequence[int]], pad_token: int, side: Side = "right") -> Padded:
    """Pad token-id sequences (see the module docstring for the position ids of each side)."""
    if not seqs:
        raise RotelabError("cannot pad an empty batch")
    ids, mask = pad_values(seqs, pad_token, side)
    if side == "left":
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(ids.shape[1], dtype=torch.long).expand(len(seqs), ids.shape[1]).contiguous()
    return Padded(ids, mask, positions, torch.tensor([len(s) for s in seqs], dtype=torch.long))


class Collator(Generic[T]):
    """Sort ``n`` items by ``key(i)`` (ascending; ``None`` keeps the caller's order), batch the
    sorted order by ``batch_size``, restore the caller's order of the results."""

    def __init__(self, n: int, batch_size: int, key: Callable[[int], Any] | None = None) -> None:
        if batch_size < 1:
            raise RotelabError(f"batch_size must be ≥ 1, got {batch_size}")
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.order = sorted(range(self.n), key=key) if key is not None else list(range(self.n))

    def batches(self) -> Iterator[list[int]]:
        """The batches: lists of the items' positions in the caller's order."""
        for b0 in range(0, self.n, self.batch_size):
            yield self.order[b0 : b0 + self.batch_size]

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def restore(self, results: Sequence[Sequence[T]]) -> list[T]:
        """Per-batch results (in :meth:`batches` order, one per item) → one result per item in the
        caller's order."""
        out: list[Any] = [None] * self.n
        flat = [r for batch in results for r in batch]
        if len(flat) != self.n:
            raise ValueError(f"collator: {len(flat)} results for {self.n} items")
        for i, r in zip(self.order, flat):
            out[i] = r
        return out
