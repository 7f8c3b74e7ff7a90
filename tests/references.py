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



#: Upper bound on the float32 logits one continuation forward of the flat scheme may hold (bytes).
_FLAT_LOGITS_BUDGET = 2**28


def flat_shared_prefix_scores(model, requests, pad_id: int, batch_size: int = 32) -> list[list[np.ndarray]]:
    """The HF engine's MC scoring before the trie (2026-11 to 2026-12), unchanged: each batch of
    prefixes run once, left-padded with explicit positions; every option's tokens but the last run
    on top of its prefix's gathered key/value cache, one forward per option length. Kept as the
    reference the trie scorer must equal within 1e-5, and as the "flat" side of
    ``benchmarks/bench_eval_mc.py``. ``[request][continuation] -> float32 [len]``."""
    from transformers import DynamicCache

    device = model.device
    out: list[list[np.ndarray]] = [[] for _ in requests]
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prefix))
    vocab = int(model.get_output_embeddings().weight.shape[0])
    with torch.inference_mode():
        for b0 in range(0, len(order), batch_size):
            chunk = order[b0 : b0 + batch_size]
            prefixes = [requests[i].prefix for i in chunk]
            n = max(len(s) for s in prefixes)
            ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for i, s in enumerate(prefixes):
                ids[i, n - len(s) :] = torch.tensor(list(s))
                mask[i, n - len(s) :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            last_lp = torch.log_softmax(res.logits[:, -1].float(), dim=-1)
            kv = [(layer.keys, layer.values) for layer in res.past_key_values.layers]
            plen = mask.sum(-1)
            rows = [(b, c) for b, i in enumerate(chunk) for c in range(len(requests[i].continuations))]
            conts = {(b, c): requests[chunk[b]].continuations[c] for b, c in rows}
            results = {}
            rows.sort(key=lambda r: len(conts[r]))
            longest = max(len(c) for c in conts.values())
            cap = max(1, _FLAT_LOGITS_BUDGET // (4 * vocab * max(1, longest - 1)))
            r0 = 0
            while r0 < len(rows):
                n0 = len(conts[rows[r0]])
                part = [r for r in rows[r0 : r0 + cap] if len(conts[r]) == n0]
                r0 += len(part)
                L = n0
                tok = torch.tensor([list(conts[r]) for r in part], dtype=torch.long, device=device)
                bidx = torch.tensor([b for b, _ in part], dtype=torch.long, device=device)
                lp = torch.zeros((len(part), L), dtype=torch.float32, device=device)
                lp[:, 0] = last_lp[bidx, tok[:, 0]]
                if L > 1:
                    cache = DynamicCache([(k.index_select(0, bidx), v.index_select(0, bidx)) for k, v in kv], config=model.config)
                    attn = torch.cat([mask.index_select(0, bidx), torch.ones_like(tok[:, :-1])], dim=1)
                    cpos = plen.index_select(0, bidx)[:, None] + torch.arange(L - 1, device=device)[None, :]
                    logits = model(
                        input_ids=tok[:, :-1], attention_mask=attn, position_ids=cpos, past_key_values=cache, use_cache=True
                    ).logits
                    lp[:, 1:] = torch.log_softmax(logits.float(), dim=-1).gather(-1, tok[:, 1:, None])[..., 0]
                lp_np = lp.cpu().numpy()
                for j, r in enumerate(part):
                    results[r] = lp_np[j].copy()
            for b, i in enumerate(chunk):
                out[i] = [results[(b, c)] for c in range(len(requests[i].continuations))]
    return out


def hf_generate(model, prompts, max_new_tokens: int, stops, pad_id: int, batch_size: int = 4) -> list[list[int]]:
    """``model.generate`` (greedy) on left-padded batches of ``prompts`` in the given order, each
    row's new tokens cut after its first stop id: the HF engine's generation before the prompt pass."""
    stops = set(int(s) for s in stops)
    out: list[list[int]] = []
    for b0 in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[b0 : b0 + batch_size]]
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, n - len(p) :] = torch.tensor(p)
            mask[i, n - len(p) :] = 1
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                eos_token_id=sorted(stops), pad_token_id=pad_id, temperature=None, top_p=None, top_k=None,
            )
        for row in gen[:, n:].tolist():
            cut: list[int] = []
            for t in row:
                cut.append(int(t))
                if t in stops:
                    break
            out.append(cut)
    return out
