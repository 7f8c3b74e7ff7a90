"""vLLM engine vs the HF reference on the tiny model (slow: one vLLM engine start per module).

Parity: object/option log-probabilities |Δ| ≤ 1e-3 (float32) and identical greedy generations, on
the base checkpoint and after swapping in the next checkpoint's weights (no engine restart)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from fixtures_runs import make_tiny_run
from rotelab.models import load_tokenizer
from rotelab.probe import accuracy as acc
from rotelab.probe import evaluate_run
from rotelab.probe.accuracy_metrics import METRIC_ARRAYS, plan_kind, stop_token_ids
from rotelab.probe.engines import vllm_available
from rotelab.probe.engines.hf import HFEngine
from rotelab.prompts import answer_options
from rotelab.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread"), pytest.mark.skipif(not vllm_available(), reason="vLLM not installed")]
KINDS = ["key", "icl"]
ALL_CHECKPOINTS = {"eval": {"icl_checkpoints": None}}  # ICL at every checkpoint: the swap path for both kinds




@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("vllm"), n_checkpoints=2, config=ALL_CHECKPOINTS)


@pytest.fixture(scope="module")
def vllm_engine(run):
    from rotelab.probe.engines.vllm_engine import VllmEngine

    eng = VllmEngine(run.checkpoint_dir("base"), dtype="float32", batch_size=4, gpu_memory_utilization=0.1)
    yield eng
    eng.close()


@pytest.mark.parametrize("ckpt", ["base", "p1-e01"])
def test_parity_with_hf(run, vllm_engine, ckpt):
    d = run.checkpoint_dir(ckpt)
    tok = load_tokenizer(str(d))
    stops = stop_token_ids(tok)
    hf = HFEngine(batch_size=4)
    hf.load(d)
    vllm_engine.load(d)
    for kind in KINDS:
        items = run.items(kind)
        plan = plan_kind(tok, kind, list(items["text"]), list(items["object"]), answer_options(items, run.facts, kind))
        a, b = vllm_engine.score(plan.requests), hf.score(plan.requests)
        diff = max(float(np.abs(x - y).max()) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        assert diff <= 1e-3, f"{ckpt}/{kind}: max |Δ logprob| = {diff}"
        assert vllm_engine.generate(plan.gen_prompts, 6, stops) == hf.generate(plan.gen_prompts, 6, stops)


def test_evaluate_run_with_vllm_matches_hf(run, vllm_engine, tmp_path, monkeypatch):
    other = make_tiny_run(tmp_path, n_checkpoints=2, config=ALL_CHECKPOINTS)  # same seed: the same weights and items

    class Shared:
        """The module's engine, not closed by evaluate_run."""

        def __getattr__(self, name):
            return getattr(vllm_engine, name)

        def close(self):
            pass

    orig = acc._Engines._make
    monkeypatch.setattr(acc._Engines, "_make", lambda self, name, d: Shared() if name == "vllm" else orig(self, name, d))
    evaluate_run(run, engine="vllm", kinds=KINDS, progress=False)
    evaluate_run(other, engine="hf", kinds=KINDS, progress=False)
    for kind in KINDS:
        kv = Store.open(run.store_path, mode="r").kind(kind)
        kh = Store.open(other.store_path, mode="r").kind(kind)
        assert kv._array("mc_correct").attrs["provenance/p1-e01"]["engine"] == "vllm"
        for m in METRIC_ARRAYS:
            v, h = kv.read_item_array(m), kh.read_item_array(m)
            if m == "gen_text":
                assert (v == h).all()
            elif m == "object_logprob":
                np.testing.assert_allclose(v, h, atol=1e-3)
            elif m in ("object_prob", "mc_mass"):
                np.testing.assert_allclose(v, h, rtol=2e-3, atol=1e-12)
            else:  # decisions; equal unless two options are within float noise of each other
                assert (v == h).mean() >= 0.95, m
    shutil.rmtree(other.root)
