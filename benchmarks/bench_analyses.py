"""Benchmarks of rotelab.analyses (numbers go to BENCHMARKS.md).

1. ΔCosSim over every slab of a demo-sized store (default 15 checkpoints × 31 layers × 1,000
   items × 576 hidden, random float16 activations written through the Store API), timed end to end
   (reads + compute + commits), against a naive per-pair Python loop (the paper's formula) on a
   subsample of one slab, extrapolated per slab.
2. A 31-layer (0 = embeddings … 30) patching sweep on SmolLM2-135M (key-style prompt → question
   prompt, last position, a few items): time per layer, against one plain forward of the same batch.

    python benchmarks/bench_analyses.py [--checkpoints 15 --layers 31 --items 1000] [--skip-patching]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def naive_delta_cossim(X: np.ndarray, rels: list[str]) -> float:
    def cos(a, b):
        return float(np.dot(a, b) / (math.sqrt(float(np.dot(a, a))) * math.sqrt(float(np.dot(b, b)))))

    names = sorted(set(rels))
    si, so = [], []
    for r in names:
        inside = [i for i, x in enumerate(rels) if x == r]
        outside = [i for i, x in enumerate(rels) if x != r]
        si.append(np.mean([cos(X[i], X[j]) for i in inside for j in inside if i != j]))
        so.append(np.mean([cos(X[i], X[j]) for i in inside for j in outside]))
    return float(np.mean(si) - np.mean(so))


def bench_delta_cossim(n_ckpt: int, n_layers: int, n_items: int, hidden: int, sub: int) -> None:
    from rotelab.analyses import delta_cossim
    from rotelab.analyses.analyze import delta_cossim_kind
    from rotelab.store import Store

    rels = [f"rel{i % 5}" for i in range(n_items)]
    items = pd.DataFrame({"item": range(n_items), "fact_id": [f"f{i}" for i in range(n_items)], "relation": rels,
                          "template_id": 0, "text": "x", "object": "y", "split": "heldout"})
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        st = Store.open(Path(tmp) / "bench.zarr", fingerprint={"model": "bench"})
        cps = [f"c{i:02d}" for i in range(n_ckpt)]
        g = st.ensure_kind("key", checkpoints=cps, layers=range(n_layers), items=items, hidden=hidden)
        t0 = time.perf_counter()
        base = rng.normal(size=(n_items, hidden)).astype(np.float16)
        for ci, c in enumerate(cps):
            for v in range(n_layers):
                g.write_slab(c, v, base + np.float16(0.01 * (ci + v)))
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        delta_cossim_kind(g, progress=False)
        t_all = time.perf_counter() - t0
        n_slabs = n_ckpt * n_layers
        X = g.read_slab(cps[-1], n_layers - 1)
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        delta_cossim(X, rels)
    t_vec = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    naive_delta_cossim(X[:sub].astype(np.float64), rels[:sub])
    t_naive_sub = time.perf_counter() - t0
    t_naive = t_naive_sub * (n_items / sub) ** 2  # pairs grow quadratically
    print(f"ΔCosSim store: {n_ckpt} checkpoints × {n_layers} layers × {n_items} items × {hidden} hidden "
          f"({n_slabs} slabs; writing them took {t_write:.1f} s)")
    print(f"  all slabs (read + compute + commit): {t_all:.2f} s = {1e3 * t_all / n_slabs:.1f} ms/slab")
    print(f"  compute only, vectorized:            {1e3 * t_vec:.2f} ms/slab")
    print(f"  naive per-pair loop on {sub} items:  {t_naive_sub:.2f} s → ≈{t_naive:.1f} s/slab extrapolated to {n_items} items")
    print(f"  ratio naive / vectorized (per slab): ≈{t_naive / t_vec:,.0f}×")


def bench_patching(n_items: int) -> None:
    import torch

    from rotelab.analyses.patching import hidden_states_at, patched_forward
    from rotelab.batching import pad, pad_id
    from rotelab.models import load_model
    from rotelab.probe.sites import ModelSites
    from rotelab.tokenization import encode

    model, tok = load_model("smollm2-135m", "float32")
    sites = ModelSites(model)  # wrapped for nnsight once, as the sweep does per checkpoint
    L = sites.n_layers
    subjects = ["Kalindor", "Merivale", "Ostrava Lenn", "Tobrin Hale", "Quenby", "Arvast", "Selmir", "Dunhollow"][:n_items]
    src = [encode(tok, f"{s} capital:", "Nowy Targ") for s in subjects]
    tgt = [encode(tok, f"The capital of {s} is", "Nowy Targ") for s in subjects]
    s_b = pad([e.input_ids for e in src], pad_id(tok))
    t_b = pad([e.input_ids for e in tgt], pad_id(tok))
    s_ids, s_mask, t_ids, t_mask = s_b.input_ids, s_b.attention_mask, t_b.input_ids, t_b.attention_mask
    s_pos = torch.tensor([[e.answer_start - 1] for e in src])
    t_pos = torch.tensor([e.answer_start - 1 for e in tgt])
    with torch.no_grad():
        model(input_ids=t_ids, attention_mask=t_mask)  # warm-up
        t0 = time.perf_counter()
        for _ in range(3):
            model(input_ids=t_ids, attention_mask=t_mask)
        t_plain = (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    states, _ = hidden_states_at(sites, s_ids, s_mask, range(L + 1), s_pos)
    t_states = time.perf_counter() - t0
    times = []
    for v in range(L + 1):
        t0 = time.perf_counter()
        patched_forward(sites, t_ids, t_mask, v, t_pos, states[v][:, 0])
        times.append(time.perf_counter() - t0)
    per = float(np.median(times))
    print(f"patching sweep SmolLM2-135M (float32, CPU threads {torch.get_num_threads()}): {L + 1} layers × {n_items} items, "
          f"seq ≤ {t_ids.shape[1]} tokens")
    print(f"  source states, all layers (1 traced forward): {t_states:.3f} s")
    print(f"  per layer (patched traced forward): median {1e3 * per:.0f} ms, total sweep {sum(times):.2f} s")
    print(f"  plain forward (baseline, no nnsight): {1e3 * t_plain:.0f} ms → ratio patched/plain {per / t_plain:.2f}×")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=15)
    ap.add_argument("--layers", type=int, default=31)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--subsample", type=int, default=200)
    ap.add_argument("--patch-items", type=int, default=4)
    ap.add_argument("--skip-patching", action="store_true")
    a = ap.parse_args()
    bench_delta_cossim(a.checkpoints, a.layers, a.items, a.hidden, a.subsample)
    if not a.skip_patching:
        bench_patching(a.patch_items)


if __name__ == "__main__":
    main()
