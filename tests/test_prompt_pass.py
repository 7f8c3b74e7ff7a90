"""The prompt pass and the fused probe pass.

* :func:`rotelab.probe.prompt_pass.prompt_pass` against independent references on the three tiny
  families (untied Llama, tied GPT-2 with absolute positions, tied Qwen2) and, slow, SmolLM2: option
  log-probabilities against a plain unpadded forward per option and against the packed trie scorer
  (≤ 1e-5; 1e-4 on SmolLM2), states against ``output_hidden_states`` of a plain forward, greedy
  tokens equal to ``model.generate``'s on left-padded prompts and to full-forward greedy decoding.
* The fused pass (``evaluate_run(capture=True)``, what ``rotelab run`` does) writes a store
  bit-identical to eval then capture run separately (every array, dtype and attribute but the
  ``probe_pass`` provenance), leaves the capture stage nothing to compute, says ``fused`` /
  ``separate`` in the attrs, and a killed fused pass (a real subprocess) resumes to the same store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_runs import make_tiny_run
from references import brute_greedy, brute_logprobs, hf_generate
from rotelab.models import load_model
from rotelab.probe import capture_run, evaluate_run
from rotelab.probe import capture as capture_mod
from rotelab.probe.accuracy_metrics import ScoreRequest
from rotelab.probe.mc_trie import score_trie
from rotelab.probe.prompt_pass import Generation, prompt_pass
from rotelab.run import Run
from rotelab.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from compare_stores import compare  # noqa: E402

TOL = 1e-5
SMOLLM2_TOL = 1e-4
KINDS = ["key", "test", "icl"]

#: Prompts of different lengths (padding happens in every batch size > 1) and their options:
#: shared 1–3 token paths, a duplicate, one-token options, and a prompt with nothing to score.
PROMPTS = [(11, 12, 13, 14, 15), (30,), (40, 41, 42), (7, 8, 9, 10, 11, 12, 13, 14)]
OPTIONS = [
    ((20, 21, 22), (20, 21, 23), (20, 24), (25,), (20, 21, 22)),
    ((31, 32, 33, 34), (31, 32, 35), (36, 37), (31,)),
    ((43,), (44,), (45, 46)),
    None,
]


def _check_against_references(model, prompts, options, stops, tol, batch_sizes, max_new=6):
    n_layers = model.config.num_hidden_layers
    ref_states = []
    for p in prompts:
        with torch.no_grad():
            ref_states.append(model(torch.tensor([list(p)]), output_hidden_states=True).hidden_states)
    ref_gen = hf_generate(model, prompts, max_new, stops, pad_id=0, batch_size=4)
    assert ref_gen == [brute_greedy(model, p, max_new, stops) for p in prompts]
    reqs = [ScoreRequest(tuple(p), tuple(o)) for p, o in zip(prompts, options) if o]
    trie = score_trie(model, reqs, pad_id=0, batch_size=3)
    for bs in batch_sizes:
        out = prompt_pass(
            model, prompts, pad_id=0, batch_size=bs, layers=list(range(n_layers + 1)), final_norm=True,
            options=options, generation=Generation(max_new, frozenset(stops)),
        )
        r = 0
        for p, o, lp in zip(prompts, options, out.logprobs):
            if not o:
                assert lp is None
                continue
            for c, cont in enumerate(o):
                np.testing.assert_allclose(lp[c], brute_logprobs(model, p, cont), atol=tol, rtol=0)
                np.testing.assert_allclose(lp[c], trie[r][c], atol=tol, rtol=0)
            r += 1
        for i, hs in enumerate(ref_states):
            for v in range(n_layers):  # HF's hidden_states[v] is resid[v] below the last block
                np.testing.assert_allclose(out.hidden[v, i], hs[v][0, -1].numpy(), atol=tol * 10, rtol=0)
            np.testing.assert_allclose(out.final[i], hs[-1][0, -1].numpy(), atol=tol * 10, rtol=0)
        assert out.generated == ref_gen, f"batch size {bs}"
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_prompt_pass_equals_references(name):
    model, _ = load_model(name, "float32")
    out = _check_against_references(model, PROMPTS, OPTIONS, stops={3}, tol=TOL, batch_sizes=(1, 3, 8))
    # the last block's raw output is resid[n_layers]; the final norm of it is final_norm
    sites = capture_mod.ModelSites(model)
    normed = sites.norm(torch.tensor(out.hidden[-1])).detach().numpy()
    np.testing.assert_allclose(normed, out.final, atol=1e-5, rtol=0)
    # forward positions: every prompt token once, every inner trie node once, one per generated token but the first
    inner = 2 + 4 + 1  # nodes with children: 20, 21 (prompt 0); 31, 32, 33, 36 (prompt 1); 45 (prompt 2)
    gen_steps = sum(len(g) - 1 for g in out.generated)
    assert out.forward_tokens == sum(len(p) for p in PROMPTS) + inner + gen_steps


@pytest.mark.slow
def test_prompt_pass_equals_references_smollm2(tmp_path):
    from rotelab.probe.accuracy_metrics import plan_kind, stop_token_ids
    from rotelab.prompts import answer_options

    run = make_tiny_run(tmp_path, n_checkpoints=1, model="smollm2-135m", config={"data": {"distractors": 20}})
    model, tok = load_model(str(run.checkpoint_dir("base")), "float32")
    items = run.items("test")
    plan = plan_kind(tok, "test", list(items["text"]), list(items["object"]), answer_options(items, run.facts, "test"))
    main = [refs[0][0] for refs in plan.option_ref][:6]
    prompts = [plan.gen_prompts[i] for i in range(6)]
    options = [plan.requests[r].continuations for r in main]
    _check_against_references(model, prompts, options, stops=set(stop_token_ids(tok)), tol=SMOLLM2_TOL, batch_sizes=(3,), max_new=8)


# --------------------------------------------------------------------------- fused vs separate


def _separate(run: Run) -> None:
    evaluate_run(run, kinds=KINDS, progress=False)
    capture_run(run, kinds=KINDS, progress=False)


def _no_capture_forward(monkeypatch) -> None:
    """After a fused pass the capture stage must not load (or run) any model."""

    def refuse(*a, **k):
        raise AssertionError("capture ran a forward that the fused pass should have shared")

    monkeypatch.setattr(capture_mod, "load_checkpoint", refuse)


def _assert_identical(a: Run, b: Run) -> None:
    diffs, n_arrays, _ = compare(a.store_path, b.store_path, ["probe_pass"])
    assert diffs == [], diffs[:10]
    assert n_arrays > 20


def _passes(run: Run, kind: str, ckpt: str) -> tuple[str, str, dict]:
    kg = Store.open(run.store_path, mode="r").kind(kind)
    return (
        kg.array_attrs("mc_rank")[f"provenance/{ckpt}"]["probe_pass"],
        kg.array_attrs("final_norm")[f"probe_pass/{ckpt}"],
        kg.array_attrs("activations")[f"probe_pass/{ckpt}"],
    )


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_fused_store_identical_to_separate(tmp_path, name, monkeypatch):
    # ICL at every checkpoint (not only eval.icl_checkpoints' default base): every unit is fused
    sep = make_tiny_run(tmp_path / "sep", n_checkpoints=2, model=name, config={"capture": {"kinds": KINDS}, "eval": {"icl_checkpoints": None}})
    shutil.copytree(sep.root, tmp_path / "fused")
    fused = Run.open(tmp_path / "fused")
    _separate(sep)
    evaluate_run(fused, kinds=KINDS, progress=False, capture=True)
    with monkeypatch.context() as m:
        _no_capture_forward(m)
        capture_run(fused, kinds=KINDS, progress=False)  # everything is committed already
    _assert_identical(sep, fused)
    n_layers = capture_mod.model_shape(fused.checkpoint_dir("base")).n_layers
    for kind in KINDS:
        for ckpt in ("base", "p1-e01"):
            ev, fn, act = _passes(fused, kind, ckpt)
            assert (ev, fn) == ("fused", "fused") and set(act.values()) == {"fused"}
            ev, fn, act = _passes(sep, kind, ckpt)
            assert (ev, fn) == ("separate", "separate") and set(act.values()) == {"separate"}
            assert sorted(act, key=int) == [str(v) for v in range(n_layers + 1)]


def test_fused_with_another_generation_engine(tmp_path, monkeypatch):
    """HF scoring + a separate generation engine (vLLM's place): the pass fuses scoring and
    capture, generation stays with the other engine, and the store equals the separate stages'."""
    from rotelab.probe import accuracy as acc
    from rotelab.probe.engines.hf import HFEngine

    class OtherGen(HFEngine):
        name = "other"

        def evaluate_plan(self, *a, **k):  # pragma: no cover - never used for generation
            raise AssertionError("the generation engine does not score")

    monkeypatch.setattr(acc, "resolve_engines", lambda engine: ("hf", "other", None))
    orig = acc._Engines._make
    monkeypatch.setattr(
        acc._Engines, "_make", lambda self, name, d: OtherGen(batch_size=2, prompt_batch_size=3) if name == "other" else orig(self, name, d)
    )
    sep = make_tiny_run(tmp_path / "sep", n_checkpoints=2, config={"capture": {"kinds": ["test"]}})
    shutil.copytree(sep.root, tmp_path / "fused")
    fused = Run.open(tmp_path / "fused")
    evaluate_run(sep, kinds=["test"], progress=False)
    capture_run(sep, kinds=["test"], progress=False)
    evaluate_run(fused, kinds=["test"], progress=False, capture=True)
    capture_run(fused, kinds=["test"], progress=False)
    _assert_identical(sep, fused)
    kg = Store.open(fused.store_path, mode="r").kind("test")
    prov = kg.array_attrs("gen_text")["provenance/p1-e01"]
    assert prov["engine"] == "hf (scoring), other (generation)" and prov["probe_pass"] == "fused"
    assert set(kg.array_attrs("activations")["probe_pass/p1-e01"].values()) == {"fused"}


def test_stages_alone_write_their_own_part(tmp_path):
    run = make_tiny_run(tmp_path, n_checkpoints=2, config={"capture": {"kinds": ["test"]}})
    evaluate_run(run, kinds=["test"], progress=False)  # eval without capture: no activations
    kg = Store.open(run.store_path, mode="r").kind("test")
    assert not kg.committed("activations").any() and kg.committed("mc_rank").all()
    other = make_tiny_run(tmp_path / "cap", n_checkpoints=2, config={"capture": {"kinds": ["test"]}})
    capture_run(other, kinds=["test"], progress=False)  # capture without eval: no metrics
    kg = Store.open(other.store_path, mode="r").kind("test")
    assert kg.committed("activations").all() and not kg.committed("mc_rank").any()


DRIVER = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from rotelab.probe import capture as cap, evaluate_run
from rotelab.run import Run
n = [0]
orig = cap._write_slab
def dying(*a, **k):
    n[0] += 1
    if n[0] > {after}:
        os._exit(9)
    orig(*a, **k)
cap._write_slab = dying
evaluate_run(Run.open({root!r}), kinds={kinds!r}, progress=False, capture=True)
"""


@pytest.mark.parametrize("after", [1, 6])
def test_killed_fused_pass_resumes(tmp_path, after):
    """A fused pass killed (os._exit in a subprocess) after ``after`` slabs: what was committed
    stays, and a rerun (fused, then the capture stage) gives the separate stages' store."""
    sep = make_tiny_run(tmp_path / "sep", n_checkpoints=2, config={"capture": {"kinds": KINDS}})
    shutil.copytree(sep.root, tmp_path / "fused")
    fused = Run.open(tmp_path / "fused")
    code = DRIVER.format(tests=str(ROOT / "tests"), after=after, root=str(fused.root), kinds=KINDS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stderr[-2000:]
    st = Store.open(fused.store_path, mode="r")
    assert sum(int(st.kind(k).committed("activations").sum()) for k in KINDS if k in st.kinds()) == after  # committed slabs stay
    for k in st.kinds():  # a unit's arrays are committed only after its capture
        kg = st.kind(k)
        assert not (kg.committed("mc_rank") & ~(kg.committed("activations").all(axis=1) & kg.committed("final_norm"))).any()
    evaluate_run(fused, kinds=KINDS, progress=False, capture=True)
    capture_run(fused, kinds=KINDS, progress=False)
    _separate(sep)
    _assert_identical(sep, fused)
    ev, _, act = _passes(fused, KINDS[0], "base")
    assert ev == "fused" and set(act.values()) == {"fused"}  # the rerun's unit rewrote the rest in a fused pass


def test_inner_groups_bound_the_padding():
    from rotelab.probe.prompt_pass import INNER_PAD_SLACK, inner_groups

    counts = [40, 0, 6, 7, 39, 20, 6, 21, 0, 6]
    groups = inner_groups(counts)
    assert sorted(b for g in groups for b in g) == [b for b, c in enumerate(counts) if c > 0]  # each row once, empties out
    for g in groups:
        assert counts[g[0]] == max(counts[b] for b in g)
        assert len(g) * counts[g[0]] <= INNER_PAD_SLACK * sum(counts[b] for b in g)
    assert groups[0] == [0, 4, 7]  # 3 × 40 = 120 ≤ 1.25 × 100; adding the 20 would pad to 160 > 1.25 × 120
