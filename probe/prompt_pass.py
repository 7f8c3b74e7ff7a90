"""The prompt pass: one forward over a kind's prompts that capture and HF evaluation share.

For ``n`` prompts (token ids) one call of :func:`prompt_pass` yields any of

* **states** — the last prompt token's hidden state at the sites ``resid[v]`` of the requested
  store layers and at ``final_norm`` (capture: :mod:`rotelab.probe.capture`);
* **option log-probabilities** — per prompt, the per-token log-probabilities of its options
  (MC / object scoring: :mod:`rotelab.probe.accuracy`). The first token of every option is read
  from the prompt-final logits; the inner nodes of the options' token trie
  (:func:`rotelab.probe.mc_trie.build_trie`) run once, in one forward that continues from the
  prompt's KV cache (leaves never need a position);
* **greedy generations** — continuing from the same cache (the first token is the argmax of the
  prompt-final logits), cut after the first stop id.

Nothing is computed twice: the prompt runs once however many of the three are asked for.

Batching (one rule, so that every caller computes the same numbers): prompts are sorted longest
first (ties by position), cut into batches of ``batch_size`` (:class:`rotelab.batching.Collator`),
padded on the right with position ids ``0..len-1`` and run through the decoder (``model.base_model``)
with a 2-D attention mask and a KV cache. Since the prompt forward of a batch is the same call
whatever is read from it, capture alone, evaluation alone and the fused pass give bit-identical
states and log-probabilities for the same ``batch_size``. The stages take ``batch_size`` from
``capture.batch_size`` (see ``CONTRIBUTING.md`` "Prompt pass").

Continuing from a right-padded cache: row ``b`` has ``len_b`` real prompt tokens in a cache of
``L = max len``. A continuation token (trie node or generated token) at depth ``d`` gets position
id ``len_b + d − 1`` — where it would be in its own unpadded sequence — and a 4-D additive
attention mask lets it see the row's real prompt positions ``< len_b``, its own ancestors (trie) or
earlier generated tokens, and itself; the padding slots ``len_b..L−1`` get ``finfo.min`` added,
whose softmax weight is exactly 0. So each continuation attends to exactly the keys of its
unpadded sequence; differences to a plain per-option forward are float rounding (tests: ≤ 1e-5
against a plain forward and against :func:`rotelab.probe.mc_trie.score_trie` on tied and untied
tiny models, 1e-4 on SmolLM2; greedy tokens equal to ``model.generate``'s). The trie forward
leaves the prompt cache as it is: the rows of a batch are regrouped by their inner-node count
(:func:`inner_groups`, padding within :data:`INNER_PAD_SLACK`) and each group continues on a copy
of its rows of the cache; generation then continues on the cache itself.

Assumes ``logits = output_embeddings(base_model(...).last_hidden_state)``
(:func:`rotelab.probe.mc_trie.check_head_split`, checked once per model when logits are needed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from rotelab.batching import Collator, pad
from rotelab.errors import RotelabError

from .accuracy_metrics import cut_at_stop
from .mc_trie import LOGITS_BUDGET, OptionTrie, build_trie, check_head_split
from .sites import ModelSites, check_layers


@dataclass(frozen=True)
class Generation:
    """Greedy generation settings: at most ``max_new_tokens`` tokens, stopping at any ``stop_ids``."""

    max_new_tokens: int
    stop_ids: frozenset[int]


@dataclass
class PassOutput:
    """What :func:`prompt_pass` read, in the caller's prompt order.

    ``hidden`` float32 [len(layers), n, hidden] (sites ``resid[v]``) and ``final`` float32 [n,
    hidden] (``final_norm``) when states were asked for; ``logprobs[i][c]`` float32
    [len(option c)] per scored prompt (``None`` for prompts without options); ``generated[i]``:
    new token ids, cut after the first stop id.
    """

    hidden: np.ndarray | None = None
    final: np.ndarray | None = None
    logprobs: list[list[np.ndarray] | None] = field(default_factory=list)
    generated: list[list[int]] = field(default_factory=list)
    forward_tokens: int = 0
    """Token positions run through the decoder (prompt + trie inner nodes + generation steps)."""


def pass_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> Collator:
    """The prompt pass's batching: longest first, ties by position, ``batch_size`` per batch."""
    return Collator(len(prompts), batch_size, key=lambda i: (-len(prompts[i]), i))


class _LastTokenHooks:
    """Forward hooks that keep the last real token's state [batch, hidden] at sites ``resid[v]``."""

    def __init__(self, sites: ModelSites, layers: Sequence[int]) -> None:
        self.layers = list(layers)
        self.rows: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.got: dict[int, torch.Tensor] = {}
        self.active = False  # only the prompt forward is read, never a continuation
        self.handles = [sites.hook_resid(v, partial(self._keep, v)) for v in self.layers]

    def _keep(self, v: int, h: torch.Tensor) -> None:
        if not self.active:
            return
        assert self.rows is not None and self.last is not None
        self.got[v] = h[self.rows.to(h.device), self.last.to(h.device)].float().cpu()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _log_softmax_rows(head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities [rows, vocab] of the head at hidden states ``h`` [rows, hidden],
    in chunks bounded by :data:`LOGITS_BUDGET`."""
    vocab = int(head.weight.shape[0])
    cap = max(1, LOGITS_BUDGET // (4 * vocab))
    return torch.cat([torch.log_softmax(head(h[s : s + cap]).float(), -1) for s in range(0, len(h), cap)])


def _continuation_mask(lengths: Sequence[int], cache_len: int, sees: Sequence[Sequence[Sequence[int]]], q: int, dtype) -> torch.Tensor:
    """Additive mask [B, 1, q, cache_len + q]: query ``j`` of row ``b`` sees the row's real prompt
    positions ``< lengths[b]`` and the new positions ``cache_len + s`` for ``s`` in ``sees[b][j]``;
    query rows beyond ``len(sees[b])`` (padding) see themselves only."""
    B = len(lengths)
    allowed = torch.zeros((B, q, cache_len + q), dtype=torch.bool)
    for b in range(B):
        n_b = len(sees[b])
        allowed[b, :n_b, : lengths[b]] = True
        for j, s in enumerate(sees[b]):
            allowed[b, j, [cache_len + x for x in s]] = True
        pad_q = torch.arange(n_b, q)
        allowed[b, pad_q, cache_len + pad_q] = True
    mask = torch.zeros((B, 1, q, cache_len + q), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return mask


def _ancestors(trie: OptionTrie) -> list[list[int]]:
    """Per inner node (in ``trie.inner`` order): the inner-node slots it sees (its ancestors and itself)."""
    slot = {n: j for j, n in enumerate(trie.inner)}
    out = []
    for n in trie.inner:
        anc, a = [slot[n]], trie.parent[n]
        while a >= 0:
            anc.append(slot[a])
            a = trie.parent[a]
        out.append(sorted(anc))
    return out


@torch.inference_mode()
def prompt_pass(
    model: torch.nn.Module | ModelSites,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    layers: Sequence[int] | None = None,
    final_norm: bool = False,
    options: Sequence[Sequence[Sequence[int]] | None] | None = None,
    generation: Generation | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PassOutput:
    """Run the prompt pass (module docstring) over ``prompts`` and read what is asked for.

    ``layers``: store layers whose ``resid[v]`` last-token state to keep (None or empty: none);
    ``final_norm``: keep the final norm's; ``options[i]``: the continuations (token ids) to score
    behind prompt ``i`` (None: nothing for that prompt); ``generation``: greedy generation for
    every prompt; ``on_batch(n)`` after each batch of ``n`` prompts.
    """
    sites = model if isinstance(model, ModelSites) else ModelSites(model)
    lm = sites.model
    n = len(prompts)
    layer_list = check_layers(layers, sites.n_layers, type(lm).__name__) if layers else []
    if options is not None and len(options) != n:
        raise RotelabError(f"prompt pass: {len(options)} option lists for {n} prompts")
    for p in prompts:
        if not len(p):
            raise RotelabError("prompt pass: a prompt is empty (the tokenizer adds no BOS and the prompt is empty)")
    want_logits = generation is not None or (options is not None and any(o for o in options))
    if want_logits:
        check_head_split(lm)
    head = lm.get_output_embeddings() if want_logits else None
    out = PassOutput(
        hidden=np.empty((len(layer_list), n, sites.hidden), np.float32) if layer_list else None,
        final=np.empty((n, sites.hidden), np.float32) if final_norm else None,
        logprobs=[None] * n,
        generated=[[] for _ in range(n)],
    )
    tries = [build_trie(o) if o else None for o in (options or [None] * n)]
    device = sites.device
    mask_dtype = next(lm.parameters()).dtype
    hooks = _LastTokenHooks(sites, layer_list)
    try:
        for rows in pass_batches(prompts, batch_size).batches():
            batch = pad([prompts[i] for i in rows], pad_id, "right").to(device)
            B, L = batch.input_ids.shape
            hooks.rows, hooks.last, hooks.active = torch.arange(B), batch.last, True
            res = sites.decoder(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=True,
            )
            hooks.active = False
            out.forward_tokens += int(batch.lengths.sum())
            last_h = res.last_hidden_state[torch.arange(B, device=res.last_hidden_state.device), batch.last.to(res.last_hidden_state.device)]
            for li, v in enumerate(layer_list):
                out.hidden[li, rows] = hooks.got[v].numpy()  # type: ignore[index]
            if out.final is not None:
                out.final[rows] = last_h.float().cpu().numpy()
            if want_logits:
                cache = res.past_key_values
                lengths = batch.lengths.tolist()
                logits = head(last_h.to(head.weight.device)).float()  # [B, vocab]: the prompt-final logits
                first = torch.log_softmax(logits, -1)
                batch_tries = [tries[i] for i in rows]
                if any(t is not None for t in batch_tries):
                    _score_batch(sites, head, cache, first, lengths, L, batch_tries, rows, out, mask_dtype)
                if generation is not None:
                    _generate_batch(sites, head, cache, logits, lengths, L, rows, generation, out, mask_dtype)
                del cache
            del res
            if on_batch is not None:
                on_batch(len(rows))
    finally:
        hooks.close()
    return out


#: A trie forward's padded positions may exceed its real inner nodes by this factor: rows of a
#: prompt batch are regrouped by their inner-node count (each group on its rows of the cache).
INNER_PAD_SLACK = 1.25


def inner_groups(counts: Sequence[int], slack: float = INNER_PAD_SLACK) -> list[list[int]]:
    """Rows (indices into ``counts``, those with a count > 0) grouped for the trie forward: sorted
    by count, largest first (ties by index), each group grown while ``len × its largest count ≤
    slack × Σ its counts``."""
    order = sorted((b for b, c in enumerate(counts) if c > 0), key=lambda b: (-counts[b], b))
    groups: list[list[int]] = []
    for b in order:
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * counts[g[0]] <= slack * (sum(counts[x] for x in g) + counts[b]):
            g.append(b)
        else:
            groups.append([b])
    return groups


def _rows_cache(cache, rows: Sequence[int]):
    """A new cache holding rows ``rows`` of ``cache`` (the prompt cache stays as it is)."""
    from transformers import DynamicCache

    sub = DynamicCache()
    for li, layer in enumerate(cache.layers):
        idx = torch.tensor(list(rows), device=layer.keys.device)
        sub.update(layer.keys.index_select(0, idx), layer.values.index_select(0, idx), li)
    return sub


def _score_batch(sites: ModelSites, head, cache, first: torch.Tensor, lengths: list[int], L: int,
                 tries: list[OptionTrie | None], rows: list[int], out: PassOutput, mask_dtype) -> None:
    """Option log-probabilities of one batch: first tokens from ``first`` [B, vocab], the inner
    trie nodes of each group of rows (:func:`inner_groups`) in one forward continuing from those
    rows of the prompt ``cache`` (left unchanged)."""
    device = first.device
    dev = sites.device
    node_lp: dict[int, np.ndarray] = {}  # row -> log-prob of each non-root node's token, by node
    counts = [len(t.inner) if t is not None else 0 for t in tries]
    for group in inner_groups(counts):
        q = counts[group[0]]
        ids = torch.zeros((len(group), q), dtype=torch.long)
        pos = torch.zeros((len(group), q), dtype=torch.long)
        sees: list[list[list[int]]] = []
        for g, b in enumerate(group):
            t = tries[b]
            assert t is not None
            ids[g, : len(t.inner)] = torch.tensor([t.token[nd] for nd in t.inner])
            pos[g] = lengths[b]
            pos[g, : len(t.inner)] = torch.tensor([lengths[b] + t.depth[nd] - 1 for nd in t.inner])
            sees.append(_ancestors(t))
        mask = _continuation_mask([lengths[b] for b in group], L, sees, q, mask_dtype)
        hid = sites.decoder(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
            past_key_values=_rows_cache(cache, group), use_cache=True,
        ).last_hidden_state  # [len(group), q, hidden]
        out.forward_tokens += sum(counts[b] for b in group)
        read_g = [g for g, b in enumerate(group) for _ in range(counts[b])]
        read_j = [j for b in group for j in range(counts[b])]
        lps = _log_softmax_rows(head, hid[torch.tensor(read_g, device=hid.device), torch.tensor(read_j, device=hid.device)].to(device))
        r0 = 0
        for b in group:
            t = tries[b]
            assert t is not None
            slot = {nd: r0 + j for j, nd in enumerate(t.inner)}
            r0 += counts[b]
            rest = [nd for nd in range(len(t.token)) if t.parent[nd] >= 0]
            vals = np.full(len(t.token), np.nan)
            vals[rest] = lps[
                torch.tensor([slot[t.parent[nd]] for nd in rest], device=device), torch.tensor([t.token[nd] for nd in rest], device=device)
            ].cpu().numpy()
            node_lp[b] = vals
        del lps, hid
    for b, t in enumerate(tries):
        if t is None:
            continue
        lp = node_lp.get(b, np.full(len(t.token), np.nan))
        roots = [nd for nd in range(len(t.token)) if t.parent[nd] < 0]
        lp[roots] = first[b, torch.tensor([t.token[nd] for nd in roots], device=device)].cpu().numpy()
        out.logprobs[rows[b]] = [lp[list(path)].astype(np.float32) for path in t.paths]


def _generate_batch(sites: ModelSites, head, cache, first_logits: torch.Tensor, lengths: list[int], L: int,
                    rows: list[int], gen: Generation, out: PassOutput, mask_dtype) -> None:
    """Greedy tokens of one batch continuing from the prompt ``cache`` (length ``L``)."""
    B = len(rows)
    dev = sites.device
    tok = first_logits.argmax(-1)  # [B]
    new: list[list[int]] = [[int(t)] for t in tok.tolist()]
    done = [t in gen.stop_ids for t in tok.tolist()]
    for step in range(1, gen.max_new_tokens):
        if all(done):
            break
        pos = torch.tensor([[lengths[b] + step - 1] for b in range(B)])
        allowed = torch.zeros((B, 1, 1, L + step), dtype=torch.bool)
        for b in range(B):  # the row's real prompt tokens, every generated token so far and itself
            allowed[b, 0, 0, : lengths[b]] = True
        allowed[:, :, :, L:] = True
        mask = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)
        hid = sites.decoder(
            input_ids=tok[:, None].to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), past_key_values=cache, use_cache=True
        ).last_hidden_state[:, -1]
        out.forward_tokens += sum(not d for d in done)
        tok = head(hid.to(head.weight.device)).float().argmax(-1)
        for b, t in enumerate(tok.tolist()):
            if not done[b]:
                new[b].append(int(t))
                done[b] = t in gen.stop_ids
    for b in range(B):
        out.generated[rows[b]] = cut_at_stop(new[b], gen.stop_ids)
