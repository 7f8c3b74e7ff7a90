"""Accuracy engines: (a) a 5-checkpoint series with one reused vLLM engine (weights swapped in
place, every swap verified against transformers) vs a fresh engine per checkpoint, with the swap
check's own cost and result; (b) vLLM vs HF throughput on SmolLM2-135M (CPU here) for MC scoring
and for greedy generation; (c) whole evaluation units of an existing run (what `rotelab eval`
does: the prompt pass with scoring, and generation) with ``--engine hf`` against ``auto`` on CPU
(HF scoring + vLLM generation) with vLLM's default CPU binding (it reserves one core for its
scheduler: on 2 cores it computes with one thread) and with ``VLLM_CPU_OMP_THREADS_BIND`` set to
every core. Prints times and ratios measured in this invocation.

    .venv/bin/python benchmarks/bench_eval_engines.py [--part a|b|c|all] [--series 5] [--model tiny-qwen2]
    .venv/bin/python benchmarks/bench_eval_engines.py --part c --run runs/smollm2-demo --checkpoints base,p2-e04
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _plans(run, tok, kinds):
    from rotelab.probe.accuracy import plan_run

    return plan_run(run, tok, kinds)


def part_a(tmp: Path, n: int, model: str) -> None:
    from fixtures_runs import make_tiny_run

    from rotelab.models import load_tokenizer
    from rotelab.probe.accuracy_metrics import stop_token_ids
    from rotelab.probe.engines.vllm_engine import VllmEngine

    run = make_tiny_run(tmp / "a", n_checkpoints=n, model=model, noise=0.2)
    dirs = [run.checkpoint_dir(e) for e in run.checkpoints()]
    tok = load_tokenizer(str(dirs[0]))
    plans = _plans(run, tok, ["train", "icl"])
    stops = stop_token_ids(tok)

    def work(eng):
        for p in plans.values():
            eng.score(p.requests)
            eng.generate(p.gen_prompts, 8, stops)

    t0 = time.perf_counter()
    eng = VllmEngine(dirs[0], gpu_memory_utilization=0.1)
    swap_s, diffs = [], []
    for d in dirs:
        t1 = time.perf_counter()
        eng.load(d)
        swap_s.append(time.perf_counter() - t1)
        diffs.append(eng.check_diff)
        work(eng)
    restarts = eng.restarts
    eng.close()
    reused = time.perf_counter() - t0
    t1 = time.perf_counter()
    eng_check = dirs[1:]
    from rotelab.probe.engines.vllm_engine import probe_ids, reference_logprobs

    for d in eng_check:
        reference_logprobs(d, probe_ids(d))
    ref_s = (time.perf_counter() - t1) / max(1, len(eng_check))
    print(f"(a) {model}: verified swaps {', '.join(f'{x:.2f}' for x in swap_s[1:])} s each (reference forward alone "
          f"{ref_s:.2f} s), swap-check max |Δ logprob| {max(x for x in diffs if x is not None):.1e}, restarts {restarts}", flush=True)
    t0 = time.perf_counter()
    for d in dirs:
        eng = VllmEngine(d, gpu_memory_utilization=0.1)
        work(eng)
        eng.close()
    fresh = time.perf_counter() - t0
    print(f"(a) series of {n} checkpoints ({model}, kinds train+icl): reused engine {reused:.1f} s, "
          f"fresh engine per checkpoint {fresh:.1f} s -> {fresh / reused:.1f}x", flush=True)


def part_b(tmp: Path, facts: int) -> None:
    from fixtures_runs import make_tiny_run

    from rotelab.models import load_tokenizer
    from rotelab.probe.accuracy_metrics import stop_token_ids
    from rotelab.probe.engines.hf import HFEngine
    from rotelab.probe.engines.vllm_engine import VllmEngine

    cfg = {"data": {"relations": ["capital", "author"], "facts_per_relation": facts, "distractors": 99, "templates_per_kind": 1},
           "phase2": {"k": 1}}
    run = make_tiny_run(tmp / "b", n_checkpoints=1, model="smollm2-135m", config=cfg)
    d = run.checkpoint_dir("base")
    tok = load_tokenizer(str(d))
    plans = _plans(run, tok, run.kinds())
    stops = stop_token_ids(tok)
    reqs = [r for k in ("train", "test") for r in plans[k].requests]
    prompts = [g for p in plans.values() for g in p.gen_prompts]
    n_opts = sum(len(r.continuations) for r in reqs)
    results = {}
    for name in ("hf", "vllm"):
        t0 = time.perf_counter()
        eng = HFEngine(batch_size=32) if name == "hf" else VllmEngine(d, gpu_memory_utilization=0.2)
        eng.load(d)
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.score(reqs)
        score = time.perf_counter() - t0
        t0 = time.perf_counter()
        eng.generate(prompts, 12, stops)
        gen = time.perf_counter() - t0
        eng.close()
        results[name] = (start, score, gen)
        print(f"(b) {name}: start/load {start:.1f} s, scoring {len(reqs)} prompts (train+test) x 100 options ({n_opts} options) "
              f"{score:.1f} s = {n_opts / score:.0f} options/s, greedy generation {len(prompts)} prompts (all kinds) x <=12 tokens "
              f"{gen:.1f} s = {len(prompts) / gen:.1f} prompts/s", flush=True)
    h, v = results["hf"], results["vllm"]
    print(f"(b) scoring: vLLM/HF time {v[1] / h[1]:.2f} ({'HF' if h[1] < v[1] else 'vLLM'} faster); "
          f"generation: vLLM/HF time {v[2] / h[2]:.2f} ({'HF' if h[2] < v[2] else 'vLLM'} faster)", flush=True)


def part_c(tmp: Path, run_dir: Path, checkpoints: list[str], settings: list[str]) -> None:
    import os
    import shutil

    import numpy as np

    from rotelab.probe import evaluate_run
    from rotelab.probe.accuracy_metrics import METRIC_ARRAYS
    from rotelab.run import Run
    from rotelab.store import Store

    src = Run.open(run_dir)
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    times, stores = {}, {}
    for name in settings:
        root = tmp / f"c-{name}"
        shutil.copytree(src.root, root, symlinks=True, ignore=shutil.ignore_patterns("store.zarr", "tensorboard", "figures"))
        run = Run.open(root)
        engine = "hf" if name == "hf" else "auto"
        old = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        if name == "auto-allcores":
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        t0 = time.perf_counter()
        try:
            evaluate_run(run, engine=engine, checkpoints=checkpoints, progress=False)
        finally:
            if old is None:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = old
        times[name] = time.perf_counter() - t0
        stores[name] = Store.open(run.store_path, mode="r")
        n_units = sum(len(checkpoints) for _ in stores[name].kinds())
        print(f"(c) {name}: {len(checkpoints)} checkpoints × {len(stores[name].kinds())} kinds in {times[name]:.1f} s "
              f"(engine start included; ≤ {n_units} units)", flush=True)
    base = settings[0]
    for name in settings[1:]:
        same_gen, n = 0, 0
        lp = 0.0
        for kind in stores[base].kinds():
            a, b = stores[base].kind(kind), stores[name].kind(kind)
            ga, gb = a.read_item_array("gen_text", checkpoints=checkpoints), b.read_item_array("gen_text", checkpoints=checkpoints)
            same_gen += int((ga == gb).sum())
            n += ga.size
            la, lb = a.read_item_array("object_logprob", checkpoints=checkpoints), b.read_item_array("object_logprob", checkpoints=checkpoints)
            ok = np.isfinite(la) & np.isfinite(lb)
            lp = max(lp, float(np.abs(la[ok] - lb[ok]).max()) if ok.any() else 0.0)
        print(f"(c) {name} / {base} time: {times[name] / times[base]:.2f}; identical generations {same_gen}/{n}; "
              f"max |Δ object logprob| {lp:.1e} ({len(METRIC_ARRAYS)} arrays per unit)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["a", "b", "c", "all"], default="all")
    ap.add_argument("--run", type=Path, default=None, help="(c): an existing run with the checkpoints' weights")
    ap.add_argument("--checkpoints", default="base", help="(c): comma-separated checkpoint ids")
    ap.add_argument("--settings", default="hf,auto,auto-allcores", help="(c): hf, auto, auto-allcores, in this order")
    ap.add_argument("--series", type=int, default=5)
    ap.add_argument("--facts", type=int, default=3, help="(b): facts per relation (2 relations, 1 template per kind)")
    ap.add_argument("--model", default="tiny-qwen2", help="(a): tiny model of the series (tiny-qwen2 ties its embeddings)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("b", "all"):
            part_b(Path(tmp), args.facts)
        if args.part in ("a", "all"):
            part_a(Path(tmp), args.series, args.model)
        if args.part == "c" or (args.part == "all" and args.run is not None):
            if args.run is None:
                ap.error("--part c needs --run")
            part_c(Path(tmp), args.run, args.checkpoints.split(","), args.settings.split(","))


if __name__ == "__main__":
    main()
