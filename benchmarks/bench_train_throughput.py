"""Training throughput: the DeepSpeed engine (ZeRO-0, CPU, as rotelab trains) vs a plain PyTorch
loop — same model, batch, optimizer (AdamW), clipping and schedule — in one invocation; peak
memory of each (separate child processes); and phase-1 time vs facts per relation on the tiny model.

    .venv/bin/python benchmarks/bench_train_throughput.py [--model tiny-llama] [--steps 20] [--threads 1]

Blocks of steps alternate between the two loops so that load from other processes hits both alike;
the ratio is the median of the per-block tokens/s ratios (target ≥ 0.9).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _batch(tok, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tok) - 1, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _loops(model_name: str, batch: int, seq: int, build_plain: bool = True):
    from rotelab.train import engine as eng

    model, tok = eng.load_for_training(model_name)  # what the trainer does: aligned, float32
    plain = copy.deepcopy(model) if build_plain else None
    _, ds_cfg = eng.resolve_ds_config(None)
    total = 10**6
    ds = eng.make_engine(model, ds_cfg, lr=1e-4, weight_decay=0.0, micro_batch=batch, grad_accum=1, total_steps=total, schedule="cosine", warmup_ratio=0.0)
    if plain is not None:
        opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, eng.lr_lambda("cosine", total, 0.0))
    clip = float(ds_cfg.get("gradient_clipping", 0.0))

    def ds_step(b):
        loss, n = eng.step_loss(ds, b, 1.0 / max(1, int((b["labels"][:, 1:] != -100).sum())))
        ds.backward(loss)
        ds.step()

    def plain_step(b):
        loss, n = eng.step_loss(plain, b, 1.0 / max(1, int((b["labels"][:, 1:] != -100).sum())))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return tok, ds_step, plain_step


def throughput(model_name: str, steps: int, batch: int, seq: int, blocks: int) -> dict:
    tok, ds_step, plain_step = _loops(model_name, batch, seq)
    batches = [_batch(tok, batch, seq, i) for i in range(steps)]
    for b in batches[:2]:
        ds_step(b)
        plain_step(b)
    rates: dict[str, list[float]] = {"deepspeed": [], "plain": []}
    ratios = []
    for k in range(blocks):
        block = {}
        for name, fn in (("deepspeed", ds_step), ("plain", plain_step)) if k % 2 == 0 else (("plain", plain_step), ("deepspeed", ds_step)):
            t = time.perf_counter()
            for b in batches:
                fn(b)
            block[name] = steps * batch * seq / (time.perf_counter() - t)
            rates[name].append(block[name])
        ratios.append(block["deepspeed"] / block["plain"])
    return {
        "deepspeed_tok_s": statistics.median(rates["deepspeed"]),
        "plain_tok_s": statistics.median(rates["plain"]),
        "ratio": statistics.median(ratios),
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_child(which: str, model_name: str, batch: int, seq: int) -> None:
    """In a child process: a few steps of one loop; print the peak RSS while training (sampled
    every 2 ms; MiB) — the process-lifetime maximum would be dominated by model loading."""
    import threading

    tok, ds_step, plain_step = _loops(model_name, batch, seq, build_plain=False) if which == "deepspeed" else _plain_only(model_name)
    fn = ds_step if which == "deepspeed" else plain_step
    peak, stop = [_rss_mib()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for i in range(3):
        fn(_batch(tok, batch, seq, i))
    stop.set()
    th.join()
    print(json.dumps({"peak_rss_mib": peak[0]}))


def _plain_only(model_name: str):
    from rotelab.train import engine as eng

    model, tok = eng.load_for_training(model_name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def plain_step(b):
        loss, _ = eng.step_loss(model, b, 1.0 / int((b["labels"][:, 1:] != -100).sum()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return tok, None, plain_step


def peak_memory(model_name: str, batch: int, seq: int, threads: int) -> dict:
    import os

    # a fresh single process: not the rank/port variables this process set for itself
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = {}
    for which in ("deepspeed", "plain"):
        r = subprocess.run([sys.executable, __file__, "--child", which, "--model", model_name, "--batch", str(batch), "--seq", str(seq), "--threads", str(threads)],
                           capture_output=True, text=True, check=True, env=env)
        out[which] = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    return out


def phase1_scaling(sizes: list[int], epochs: int) -> list[dict]:
    from rotelab.config import config_from_dict
    from rotelab.run import Run
    from rotelab.train import ensure_base_checkpoint, train_phase1

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            cfg = config_from_dict({
                "name": f"scale{n}", "model": {"name": "tiny-llama"},
                "data": {"relations": ["capital", "author", "mother"], "facts_per_relation": n, "distractors": 10},
                "phase1": {"epochs": epochs, "lr": 3e-3, "batch_size": 16}, "phase2": {"enabled": False},
            }, "bench")
            run = Run.create(cfg, Path(tmp) / cfg.name)
            ensure_base_checkpoint(run)
            t = time.perf_counter()
            train_phase1(run, progress=False)
            dt = time.perf_counter() - t
            steps = epochs * math.ceil(3 * n / 16)
            rows.append({"facts_per_relation": n, "facts": 3 * n, "epochs": epochs, "steps": steps, "seconds": dt, "s_per_step": dt / steps})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--child", choices=["deepspeed", "plain"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        _peak_child(args.child, args.model, args.batch, args.seq)
        return
    tp = throughput(args.model, args.steps, args.batch, args.seq, args.blocks)
    print(f"throughput ({args.model}, batch {args.batch} x {args.seq} tokens, {args.steps} steps x {args.blocks} alternating blocks, {args.threads} thread(s)):")
    print(f"  deepspeed {tp['deepspeed_tok_s']:.0f} tok/s   plain {tp['plain_tok_s']:.0f} tok/s   ratio deepspeed/plain = {tp['ratio']:.3f}")
    mem = peak_memory(args.model, args.batch, args.seq, args.threads)
    print(f"peak RSS while training (3 steps, own process): deepspeed {mem['deepspeed']:.0f} MiB   plain {mem['plain']:.0f} MiB   ratio {mem['deepspeed'] / mem['plain']:.2f}")
    rows = phase1_scaling([50, 100, 200], args.epochs)
    base = rows[0]["seconds"]
    print(f"phase-1 time vs facts per relation (tiny-llama, 3 relations, {args.epochs} epochs, batch 16):")
    for r in rows:
        print(f"  {r['facts_per_relation']:>4} facts/rel  {r['steps']:>4} steps  {r['seconds']:7.2f} s  {r['s_per_step'] * 1000:6.1f} ms/step  x{r['seconds'] / base:.2f} vs 50")


if __name__ == "__main__":
    main()
