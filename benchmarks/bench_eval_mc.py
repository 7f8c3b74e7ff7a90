"""MC scoring of 100 options per fact: shared-prefix scoring (the HF engine: the prompt once, its
key/value cache reused by all options) vs naive scoring of 100 full ``prompt + option`` sequences
per fact (what the paper's code does), same model, same batching, same invocation. Also prints the
token-count limit of the speed-up (naive tokens / shared-prefix tokens) and how close we get.

    .venv/bin/python benchmarks/bench_eval_mc.py [--model smollm2-135m] [--facts 6] [--kinds train,icl]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


@torch.inference_mode()
def naive_score(model, requests, batch_size: int, pad_id: int) -> list[list[np.ndarray]]:
    """Every option as its own full sequence, right-padded, one forward per batch of sequences."""
    flat = [(r, c) for r, req in enumerate(requests) for c in range(len(req.continuations))]
    out: list[list[np.ndarray]] = [[None] * len(req.continuations) for req in requests]  # type: ignore[list-item]
    for b0 in range(0, len(flat), batch_size):
        part = flat[b0 : b0 + batch_size]
        seqs = [list(requests[r].prefix) + list(requests[r].continuations[c]) for r, c in part]
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for i, (r, c) in enumerate(part):
            p, cont = len(requests[r].prefix), requests[r].continuations[c]
            pos = torch.arange(p - 1, p - 1 + len(cont))
            out[r][c] = lp[i, pos, torch.tensor(cont)].numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=6, help="facts per relation (2 relations)")
    ap.add_argument("--kinds", default="train,icl")
    ap.add_argument("--batch-size", type=int, default=100, help="sequences per naive forward; prefixes per shared forward")
    ap.add_argument("--repeats", type=int, default=3, help="timings per method (best is reported)")
    args = ap.parse_args()
    from fixtures_runs import make_tiny_run

    from rotelab.models import load_model
    from rotelab.probe.accuracy import plan_run
    from rotelab.probe.engines.hf import HFEngine

    cfg = {"data": {"relations": ["capital", "author"], "facts_per_relation": args.facts, "distractors": 99,
                    "templates_per_kind": 1}, "phase2": {"k": 1}}
    with tempfile.TemporaryDirectory() as tmp:
        run = make_tiny_run(Path(tmp), n_checkpoints=1, model=args.model, config=cfg)
        d = run.checkpoint_dir("base")
        model, tok = load_model(str(d))
        eng = HFEngine(batch_size=max(1, args.batch_size // 100))
        eng.load(d)
        for kind in args.kinds.split(","):
            plan = plan_run(run, tok, [kind])[kind]
            naive_tok, shared_tok = plan.token_counts()
            eng.score(plan.requests[:1])  # warm-up
            t_shared = t_naive = float("inf")
            for _ in range(args.repeats):  # alternate and keep the best: the shared machine is noisy
                t0 = time.perf_counter()
                shared = eng.score(plan.requests)
                t_shared = min(t_shared, time.perf_counter() - t0)
                t0 = time.perf_counter()
                naive = naive_score(model, plan.requests, args.batch_size, eng.pad_id)
                t_naive = min(t_naive, time.perf_counter() - t0)
            diff = max(float(np.abs(a - b).max()) for ra, rb in zip(shared, naive) for a, b in zip(ra, rb))
            limit = naive_tok / shared_tok
            speed = t_naive / t_shared
            print(f"{args.model} kind={kind}: {plan.n_items} facts x 100 options; naive {t_naive:.2f} s, "
                  f"shared-prefix {t_shared:.2f} s (best of {args.repeats}) -> {speed:.1f}x; token-count limit {limit:.1f}x "
                  f"({naive_tok} vs {shared_tok} tokens), reached {100 * speed / limit:.0f}% of it; "
                  f"max |Δ logprob| {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
