"""Brute-force references for engine tests: one plain, unpadded transformers forward per sequence,
no cache, none of rotelab's engine code."""

from __future__ import annotations

import numpy as np
import torch


def brute_logprobs(model, prompt_ids, answer_ids) -> np.ndarray:
    """log P(answer token j | prompt, answer[:j]) from one plain unpadded forward pass (float64 softmax)."""
    seq = torch.tensor([list(prompt_ids) + list(answer_ids)])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq).logits[0].double(), -1)
    p = len(prompt_ids)
    return np.array([lp[p - 1 + j, t].item() for j, t in enumerate(answer_ids)])


def brute_greedy(model, prompt_ids, n, stops) -> list[int]:
    """Greedy decoding by full forward passes (no cache, no padding), stopping after a stop id."""
    seq, out = list(prompt_ids), []
    for _ in range(n):
        with torch.no_grad():
            t = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        out.append(t)
        seq.append(t)
        if t in stops:
            break
    return out
