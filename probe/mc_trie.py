"""Trie-shared multiple-choice scoring: every distinct token path behind a prompt is run once.

The options of one question share more than their prompt ("New York" / "New Delhi", "University
of …"). For one :class:`~rotelab.probe.accuracy_metrics.ScoreRequest` (a prefix and its
continuations) the continuations form a token trie; the log-probability of a node's token comes
from the output at its parent (the prefix's last position for first tokens). So only the prefix
and the trie's *inner* nodes (those with children) need a forward position — leaves never do.
That count, ``Σ prefix + Σ inner nodes``, is the limit of this scheme
(:func:`trie_token_count`); today's flat shared-prefix scheme runs ``Σ prefix + Σ (len − 1)``
and the naive one ``Σ (prefix + len)`` per option.

How it is run: each request becomes one packed row, ``prefix ‖ inner nodes`` (nodes in
depth-first order), with a 4-D additive attention mask — a prefix position sees the prefix
causally, a node sees the whole prefix, its ancestors and itself — and explicit position ids
(a node at depth d sits at position ``len(prefix) + d − 1``, exactly where it would be in the
unpacked sequence ``prefix + option``). Rows are sorted by length, cut into batches by a token
budget (so not :class:`rotelab.batching.Collator`'s fixed batch size) and padded on the right by
:func:`rotelab.batching.pad_values` (padding positions see only themselves and are never read). One forward per batch of rows;
the LM head runs only at the positions whose next-token distribution is read.

Equality with unpacked scoring: every position attends to exactly the keys it would attend to in
its own unpacked sequence, at the same positions; masked keys get ``finfo.min`` added, whose
softmax weight is exactly 0. Differences are float rounding of the different matrix shapes
(tests: within 1e-5 of the flat scheme and of a plain per-option forward on tied and untied tiny
models and SmolLM2).

Assumes ``logits = output_embeddings(base_model(...).last_hidden_state)``, true for the causal
LMs rotelab runs (Llama/SmolLM2, Qwen2, GPT-2); :func:`check_head_split` verifies it once per
model object and raises otherwise (e.g. a model with logit soft-capping).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rotelab.batching import pad_values
from rotelab.errors import RotelabError

from .accuracy_metrics import ScoreRequest

#: Upper bound on the float32 logits one head call may hold (bytes).
LOGITS_BUDGET = 2**28
#: Upper bound on packed tokens per forward (bounds activation memory; rows are never split).
TOKENS_PER_FORWARD = 8192


@dataclass(frozen=True)
class OptionTrie:
    """The continuations of one request as a token trie, nodes in depth-first order.

    ``token[n]``, ``parent[n]`` (−1 = child of the prefix) and ``depth[n]`` (1 = first option token)
    per node ``n``; ``paths[c]``: the node indices of continuation ``c``, root to leaf;
    ``inner``: the nodes with children (they get a forward position), in node order.
    """

    token: tuple[int, ...]
    parent: tuple[int, ...]
    depth: tuple[int, ...]
    paths: tuple[tuple[int, ...], ...]
    inner: tuple[int, ...]


def build_trie(continuations: Sequence[Sequence[int]]) -> OptionTrie:
    """The token trie of ``continuations`` (duplicates share their whole path)."""
    children: list[dict[int, int]] = [{}]  # children[n + 1] = children of node n; children[0] = roots
    token: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    paths: list[tuple[int, ...]] = []
    for cont in continuations:
        if not cont:
            raise RotelabError("MC scoring: an option tokenizes to nothing")
        node, path = -1, []
        for d, t in enumerate(cont, start=1):
            kids = children[node + 1]
            if int(t) not in kids:
                kids[int(t)] = len(token)
                token.append(int(t))
                parent.append(node)
                depth.append(d)
                children.append({})
            node = kids[int(t)]
            path.append(node)
        paths.append(tuple(path))
    # depth-first order: children follow their parent, so a node's ancestors precede it in the row
    order: list[int] = []
    stack = sorted(children[0].values(), reverse=True)
    while stack:
        n = stack.pop()
        order.append(n)
        stack.extend(sorted(children[n + 1].values(), reverse=True))
    new = {old: i for i, old in enumerate(order)}
    return OptionTrie(
        token=tuple(token[o] for o in order),
        parent=tuple(new[parent[o]] if parent[o] >= 0 else -1 for o in order),
        depth=tuple(depth[o] for o in order),
        paths=tuple(tuple(new[n] for n in p) for p in paths),
        inner=tuple(i for i, o in enumerate(order) if children[o + 1]),
    )


def trie_token_count(requests: Sequence[ScoreRequest]) -> int:
    """Positions the trie scheme runs: ``Σ len(prefix) + Σ inner trie nodes`` (its limit)."""
    return sum(len(r.prefix) + len(build_trie(r.continuations).inner) for r in requests)


def check_head_split(model) -> None:
    """Raise unless ``model``'s logits equal its output embeddings applied to its base model's last
    hidden state (checked once per model object on a 4-token input, relative tolerance 1e-4; the
    result is kept on the model, so a new model object is checked again)."""
    if getattr(model, "_rotelab_head_split_ok", False):
        return
    ids = torch.tensor([[1, 2, 3, 4]], device=model.device) % model.config.vocab_size
    with torch.inference_mode():
        full = model(input_ids=ids).logits.float()
        split = model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state).float()
    scale = float(full.abs().max()) or 1.0
    if not torch.allclose(full, split, atol=1e-4 * scale, rtol=0):
        raise RotelabError(
            f"MC trie scoring: {type(model).__name__}'s logits are not its output embeddings applied to its base model's "
            "hidden states (e.g. logit soft-capping); this model is not supported by the trie scorer"
        )
    model._rotelab_head_split_ok = True


def _row(req: ScoreRequest, trie: OptionTrie) -> tuple[list[int], list[int], list[list[int]]]:
    """Packed row of one request: token ids, position ids and, per position, the row positions it attends to."""
    p = len(req.prefix)
    ids = list(req.prefix) + [trie.token[n] for n in trie.inner]
    pos = list(range(p)) + [p + trie.depth[n] - 1 for n in trie.inner]
    at = {n: p + i for i, n in enumerate(trie.inner)}
    sees: list[list[int]] = [list(range(i + 1)) for i in range(p)]
    for n in trie.inner:
        anc, a = [at[n]], trie.parent[n]
        while a >= 0:
            anc.append(at[a])
            a = trie.parent[a]
        sees.append(list(range(p)) + sorted(anc))
    return ids, pos, sees


@torch.inference_mode()
def score_trie(model, requests: Sequence[ScoreRequest], *, pad_id: int, batch_size: int = 32) -> list[list[np.ndarray]]:
    """Per-token log-probabilities ``[request][continuation] -> float32 [len]`` by trie-packed rows.

    ``batch_size``: requests per forward (further capped at :data:`TOKENS_PER_FORWARD` packed tokens).
    """
    check_head_split(model)
    device = model.device
    head = model.get_output_embeddings()
    body = model.base_model
    vocab = int(head.weight.shape[0])
    mask_dtype = next(model.parameters()).dtype
    neg = torch.finfo(mask_dtype).min
    tries = [build_trie(r.continuations) for r in requests]
    for r in requests:
        if not r.prefix:
            raise RotelabError("MC scoring: a scoring prefix is empty (the tokenizer adds no BOS and the prompt is empty)")
    lengths = [len(r.prefix) + len(t.inner) for r, t in zip(requests, tries)]
    order = sorted(range(len(requests)), key=lambda i: lengths[i])
    out: list[list[np.ndarray]] = [[] for _ in requests]
    b0 = 0
    while b0 < len(order):
        chunk = [order[b0]]
        while (
            b0 + len(chunk) < len(order)
            and len(chunk) < batch_size
            and (len(chunk) + 1) * lengths[order[b0 + len(chunk)]] <= TOKENS_PER_FORWARD
        ):
            chunk.append(order[b0 + len(chunk)])
        b0 += len(chunk)
        rows = [_row(requests[i], tries[i]) for i in chunk]
        ids_t, _ = pad_values([ids for ids, _, _ in rows], pad_id, "right")
        n = ids_t.shape[1]
        pos_t = torch.zeros((len(chunk), n), dtype=torch.long)
        allowed = torch.zeros((len(chunk), n, n), dtype=torch.bool)
        for b, (ids, pos, sees) in enumerate(rows):
            pos_t[b, : len(pos)] = torch.tensor(pos)
            q = torch.tensor([i for i, s in enumerate(sees) for _ in s])
            k = torch.tensor([j for s in sees for j in s])
            allowed[b, q, k] = True
            pad = torch.arange(len(ids), n)
            allowed[b, pad, pad] = True  # padding sees itself only (never read)
        mask = torch.zeros((len(chunk), 1, n, n), dtype=mask_dtype)
        mask.masked_fill_(~allowed[:, None], neg)
        hidden = body(
            input_ids=ids_t.to(device), attention_mask=mask.to(device), position_ids=pos_t.to(device), use_cache=False
        ).last_hidden_state  # [B, n, hidden]
        # positions whose next-token distribution is read: the prefix's last and every inner node
        read_b, read_p = [], []
        for b, i in enumerate(chunk):
            p = len(requests[i].prefix)
            read_b += [b] * (1 + len(tries[i].inner))
            read_p += [p - 1] + list(range(p, p + len(tries[i].inner)))
        sel = hidden[torch.tensor(read_b, device=device), torch.tensor(read_p, device=device)]  # [R, hidden]
        cap = max(1, LOGITS_BUDGET // (4 * vocab))
        lps = torch.cat([torch.log_softmax(head(sel[s : s + cap]).float(), -1) for s in range(0, len(sel), cap)])
        r0 = 0
        for b, i in enumerate(chunk):
            trie = tries[i]
            slot = {-1: r0} | {nd: r0 + 1 + j for j, nd in enumerate(trie.inner)}
            r0 += 1 + len(trie.inner)
            node_rows = torch.tensor([slot[trie.parent[nd]] for nd in range(len(trie.token))], device=device)
            node_lp = lps[node_rows, torch.tensor(trie.token, device=device)].cpu().numpy()  # [nodes]
            out[i] = [node_lp[list(path)].astype(np.float32) for path in trie.paths]
    return out
