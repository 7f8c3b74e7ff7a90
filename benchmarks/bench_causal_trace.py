"""Causal tracing cost per (checkpoint, fact): the batched trace of one item (every ``resid[v]`` ×
position cell a row of a batched forward, ``analyses.causal_trace.trace_item``) against one plain
forward per restored cell (``model(ids)`` of the same one-row sequence, no hooks at all: a lower
bound of tracing cell by cell), in the same invocation, interleaved, best of N.

    .venv/bin/python benchmarks/bench_causal_trace.py [--model smollm2-135m] [--items 4] [--kind test] [--repeats 2]

Prints per item the cells, both times and the ratio (plain ÷ batched: > 1 means batching wins).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--kind", default="test")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", type=int, default=64, help="rows per batched forward")
    args = ap.parse_args()
    from fixtures_runs import make_tiny_run

    from rotelab.analyses.causal_trace import TraceItem, item_noise, item_positions, subject_noise_std, trace_item
    from rotelab.models import load_model
    from rotelab.probe.sites import ModelSites
    from rotelab.tokenization import encode

    with tempfile.TemporaryDirectory() as tmp:
        run = make_tiny_run(Path(tmp), n_checkpoints=1, model=args.model, config={"data": {"facts_per_relation": 4}})
        model, tok = load_model(str(run.checkpoint_dir("base")), "float32")
        sites = ModelSites(model)
        facts = {f.id: f for f in run.facts}
        rows = run.items(args.kind).head(args.items)
        items = []
        for _, r in rows.iterrows():
            enc = encode(tok, r["text"], r["object"], facts[r["fact_id"]].subject)
            key = tok.convert_tokens_to_ids(run.key_tokens()[r["relation"]])
            items.append((r, TraceItem(enc, tuple(enc.subject_tokens), item_positions(enc, key, ["subject_last", "key", "last"], "b"))))
        nu = 3.0 * subject_noise_std(model, [t for _, t in items])
        layers = list(range(sites.n_layers + 1))
        tot_b = tot_p = 0.0
        for r, item in items:
            z = nu * item_noise(0, r["fact_id"], int(r["template_id"]), len(item.subject), sites.hidden, 1)
            cells = len(layers) * len(item.positions)
            ids = torch.tensor([item.enc.input_ids])
            trace_item(sites, item, layers[:2], z)  # warm-up
            best_b = best_p = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                trace_item(sites, item, layers, z, rows_per_forward=args.rows)
                best_b = min(best_b, time.perf_counter() - t0)
                t0 = time.perf_counter()
                with torch.no_grad():
                    for _ in range(cells + 2):  # clean + corrupted + one per cell
                        model(ids)
                best_p = min(best_p, time.perf_counter() - t0)
            tot_b, tot_p = tot_b + best_b, tot_p + best_p
            print(f"{args.model} {args.kind} item {int(r['item'])}: {len(item.enc.input_ids)} tokens, {cells} cells; "
                  f"batched {best_b:.2f} s, one plain forward per cell {best_p:.2f} s -> {best_p / best_b:.1f}x", flush=True)
        print(f"total: batched {tot_b:.2f} s, plain per cell {tot_p:.2f} s -> {tot_p / tot_b:.1f}x "
              f"({tot_b / len(items):.2f} s per (checkpoint, fact))", flush=True)


if __name__ == "__main__":
    main()
