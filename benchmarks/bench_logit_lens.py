"""Benchmark of the logit lens stage step against a plain matmul of the same shapes (numbers go
to BENCHMARKS.md).

A store of demo-like shapes — SmolLM2-135M: 31 layers (0 = embeddings … 30) × 576 hidden, vocab
49,152 — with ``--checkpoints`` × ``--items`` random float16 slabs written through the Store API.
The lens needs only a checkpoint's final norm and output head (no decoder block runs), so a
stand-in with SmolLM2's shapes — transformers' ``LlamaRMSNorm(576)`` and an untied
``Linear(576, 49152)``, random weights — costs exactly what the real checkpoint costs once it is
loaded; loading a checkpoint (≈2 s for SmolLM2 as a HF folder) is outside both sides.

* lens: :func:`rotelab.analyses.logit_lens.logit_lens_checkpoint` for every checkpoint — reading
  each committed slab, norm + head + log-softmax + rank of the target token, writing and committing
  the two cells;
* baseline: ``torch.matmul(slab, W.T)`` of every slab, already in float32 memory (no norm, no
  scoring, no store).

Ratio = baseline time / lens time (goal ≥ 0.8×). Both on one torch thread (the machine is shared),
interleaved checkpoint by checkpoint, best of ``--repeats`` for each.

    python benchmarks/bench_logit_lens.py [--checkpoints 2 --items 200 --threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=int, default=2)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--layers", type=int, default=31)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rotelab.analyses.logit_lens import logit_lens_checkpoint
    from rotelab.store import Store

    rng = np.random.default_rng(0)
    items = pd.DataFrame({"item": range(a.items), "fact_id": [f"f{i}" for i in range(a.items)],
                          "relation": [f"r{i % 3}" for i in range(a.items)], "template_id": 0, "text": "x",
                          "object": "y", "split": "heldout"})
    norm = LlamaRMSNorm(a.hidden, eps=1e-5)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(a.hidden) + 0.5)
        head.weight.normal_(0, 0.05)
    targets = rng.integers(0, a.vocab, size=a.items)
    cps = [f"c{i:02d}" for i in range(a.checkpoints)]
    layers = list(range(a.layers))
    with tempfile.TemporaryDirectory() as tmp:
        st = Store.open(Path(tmp) / "bench.zarr", fingerprint={"model": "bench"})
        g = st.ensure_kind("test", checkpoints=cps, layers=layers, items=items, hidden=a.hidden)
        slabs = {}
        for c in cps:
            for v in layers:
                X = (rng.normal(size=(a.items, a.hidden)) * (1 + v)).astype(np.float16)
                g.write_slab(c, v, X)
                slabs[c, v] = torch.from_numpy(X.astype(np.float32))
        W = head.weight.detach()
        # interleaved per checkpoint (matmul of its slabs, then its lens), best of the repeats per
        # checkpoint: a shared machine's load drifts, and both sides then see the same drift
        best_mm = {c: np.inf for c in cps}
        best_lens = {c: np.inf for c in cps}
        for _ in range(a.repeats):
            for c in cps:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    for v in layers:
                        torch.matmul(slabs[c, v], W.T)
                best_mm[c] = min(best_mm[c], time.perf_counter() - t0)
                t0 = time.perf_counter()
                logit_lens_checkpoint(g, c, layers, targets, norm, head)
                best_lens[c] = min(best_lens[c], time.perf_counter() - t0)
        rows = a.checkpoints * a.layers * a.items
        flop = 2.0 * rows * a.hidden * a.vocab
        lens, mm = sum(best_lens.values()), sum(best_mm.values())
        print(f"shapes: {a.checkpoints} checkpoints × {a.layers} layers × {a.items} items × {a.hidden} hidden, vocab {a.vocab};"
              f" {rows} states, {flop / 1e12:.2f} TFLOP per pass; {a.threads} thread(s), best of {a.repeats} per checkpoint, interleaved")
        print(f"plain matmul: {mm:.2f} s ({flop / mm / 1e9:.1f} GFLOP/s)")
        print(f"logit lens (store reads + norm + head + scores + commits): {lens:.2f} s ({flop / lens / 1e9:.1f} GFLOP/s,"
              f" {1e3 * lens / (a.checkpoints * a.layers):.1f} ms per slab)")
        print(f"ratio matmul / lens: {mm / lens:.2f}×  (goal ≥ 0.8×)")
        lp = g.read_derived("logit_lens_logprob")
        assert np.isfinite(lp).all()


if __name__ == "__main__":
    main()
