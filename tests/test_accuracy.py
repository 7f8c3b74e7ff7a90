"""Accuracy stage with the HF engine on a tiny model: every metric against a brute-force reference
(plain unpadded forward passes), the MC rules, padding invariance, resumability, sharding, bad input."""

from __future__ import annotations

import math
import re
import shutil
import unicodedata

import numpy as np
import pytest

from fixtures_runs import make_tiny_run
from references import brute_greedy, brute_logprobs
from rotelab.errors import RotelabError
from rotelab.models import load_model, tiny_tokenizer
from rotelab.probe import evaluate_run, item_metrics_table, metrics_table, summary_table
from rotelab.probe import accuracy as acc
from rotelab.probe.accuracy_metrics import (
    METRIC_ARRAYS,
    answer_in_output,
    item_scores,
    mc_stats,
    plan_kind,
    stop_token_ids,
)
from rotelab.probe.engines import resolve_engines
from rotelab.probe.engines.hf import HFEngine
from rotelab.prompts import answer_options
from rotelab.store import Store
from rotelab.tokenization import encode

KINDS = ["key", "icl"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("acc"), n_checkpoints=2)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("acc_eval"), n_checkpoints=2, config={"eval": {"icl_checkpoints": None}})
    evaluate_run(run, engine="hf", kinds=KINDS, progress=False)
    return run


# ---------------------------------------------------------------- brute-force references


def count_scored_checkpoints(monkeypatch) -> list[str]:
    """Spy on the HF engine: the list fills with the checkpoint name of every unit it evaluates
    (``evaluate_plan``, the prompt pass)."""
    calls: list[str] = []
    orig = HFEngine.evaluate_plan

    def counting(self, plan, *a, **k):
        calls.append(self.checkpoint.name)
        return orig(self, plan, *a, **k)

    monkeypatch.setattr(HFEngine, "evaluate_plan", counting)
    return calls


def ref_normalize(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(" " if unicodedata.category(c)[0] == "P" else c for c in s)
    return " ".join(s.split())


def ref_contains(answer: str, output: str) -> bool:
    a, o = ref_normalize(answer), ref_normalize(output)
    return bool(a) and re.search(rf"(?<![a-z0-9]){re.escape(a)}(?![a-z0-9])", o) is not None


# ---------------------------------------------------------------- metrics vs brute force


def test_every_metric_matches_brute_force(evaluated):
    run = evaluated
    st = Store.open(run.store_path, mode="r")
    for ckpt in ("p1-e01",):
        model, tok = load_model(str(run.checkpoint_dir(ckpt)))
        stops = set(stop_token_ids(tok))
        for kind in KINDS:
            items = run.items(kind)
            options = answer_options(items, run.facts, kind)
            kg = st.kind(kind)
            got = {m: kg.read_item_array(m, checkpoints=[ckpt])[0] for m in METRIC_ARRAYS}
            for i, (text, answer) in enumerate(zip(items["text"], items["object"])):
                joint, mean = [], []
                for opt in options[i]:
                    e = encode(tok, text, opt)
                    lp = brute_logprobs(model, e.prompt_ids, e.answer_ids)
                    joint.append(lp.sum())
                    mean.append(lp.mean())
                joint, mean = np.array(joint), np.array(mean)
                assert got["object_logprob"][i] == pytest.approx(joint[0], abs=1e-3)
                assert got["object_prob"][i] == pytest.approx(math.exp(joint[0]), rel=1e-3, abs=1e-12)
                better = int((joint[1:] >= joint[0]).sum())
                assert got["mc_rank"][i] == 1 + better
                assert got["mc_correct"][i] == float(better == 0)
                assert got["mc_mass"][i] == pytest.approx(np.exp(joint[0]) / np.exp(joint).sum(), rel=1e-3)
                assert got["mc_correct_norm"][i] == float((mean[1:] < mean[0]).all())
                e = encode(tok, text, answer)
                gen = brute_greedy(model, e.prompt_ids, run.config.eval.max_new_tokens, stops)
                text_out = tok.decode(gen, skip_special_tokens=True).split("\n")[0].strip()
                assert got["gen_text"][i] == text_out
                assert got["gen_correct"][i] == float(ref_contains(answer, text_out))
                assert got["gen_prefix"][i] == float(ref_normalize(text_out).startswith(ref_normalize(answer)) and ref_contains(answer, text_out[: len(answer) + 1]))


def test_shared_prefix_scores_equal_full_prompts(tiny):
    model, tok = load_model(str(tiny.checkpoint_dir("p1-e01")))
    items = tiny.items("test")
    plan = plan_kind(tok, "test", list(items["text"]), list(items["object"]), answer_options(items, tiny.facts, "test"))
    eng = HFEngine(batch_size=3)
    eng.load(tiny.checkpoint_dir("p1-e01"))
    got = eng.score(plan.requests)
    for r, req in enumerate(plan.requests):
        for c, cont in enumerate(req.continuations):
            np.testing.assert_allclose(got[r][c], brute_logprobs(model, req.prefix, cont), atol=1e-4)
    naive, shared = plan.token_counts()
    assert shared < naive


def test_padding_invariance(tiny):
    tok = tiny_tokenizer()
    d = tiny.checkpoint_dir("p1-e01")
    items = tiny.items("icl")
    plan = plan_kind(
        load_model(str(d))[1], "icl", list(items["text"]), list(items["object"]), answer_options(items, tiny.facts, "icl")
    )
    stops = stop_token_ids(tok)
    big, one = HFEngine(batch_size=8), HFEngine(batch_size=1)
    big.load(d)
    one.load(d)
    a, b = big.score(plan.requests), one.score(plan.requests)
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            np.testing.assert_allclose(x, y, atol=1e-5)
    assert len({len(p) for p in plan.gen_prompts}) > 1  # padding really happens
    assert big.generate(plan.gen_prompts, 5, stops) == one.generate(plan.gen_prompts, 5, stops)


# ---------------------------------------------------------------- MC rules


def test_mc_ties_and_ranks():
    assert mc_stats(np.array([-1.0, -2.0, -3.0])) == (1.0, 1.0, pytest.approx(np.exp(-1) / np.exp([-1, -2, -3]).sum()))
    correct, rank, mass = mc_stats(np.array([-1.0, -1.0, -3.0]))  # a tie with a distractor is not correct
    assert (correct, rank) == (0.0, 2.0) and mass == pytest.approx(np.exp(-1) / np.exp([-1, -1, -3]).sum())
    assert mc_stats(np.array([-5.0, -1.0, -2.0, -5.0]))[:2] == (0.0, 4.0)


def test_mc_prefix_options_and_duplicates(tiny):
    model, tok = load_model(str(tiny.checkpoint_dir("base")))
    eng = HFEngine(batch_size=4)
    eng.load(tiny.checkpoint_dir("base"))
    texts = ["The capital of Varnholm is"] * 3
    answers = ["New York", "New York City", "Paris"]
    options = [["New York", "New York City", "Oslo"], ["New York City", "New York", "Oslo"], ["Paris", "Oslo", "Paris"]]
    plan = plan_kind(tok, "test", texts, answers, options)
    assert len(plan.requests) == 3  # one shared prefix per item
    s = item_scores(plan, eng.score(plan.requests))
    # an answer that is a prefix of a distractor scores at least as high (its extension adds log-probs ≤ 0)
    assert s["mc_rank"][0] == 1 + int(brute_logprobs(model, *_split(tok, texts[0], "Oslo")).sum() >= s["object_logprob"][0])
    # the longer answer can never beat its own prefix: incorrect, rank ≥ 2
    assert s["mc_correct"][1] == 0.0 and s["mc_rank"][1] >= 2
    # a distractor identical to the answer ties: incorrect
    assert s["mc_correct"][2] == 0.0 and s["mc_rank"][2] >= 2


def _split(tok, text, answer):
    e = encode(tok, text, answer)
    return e.prompt_ids, e.answer_ids


def test_answer_matching_rules():
    assert answer_in_output("Nowy Targ", " nowy targ, a town") == (True, True)
    assert answer_in_output("Rome", "Romeo and Juliet") == (False, False)
    assert answer_in_output("Rome", "是Rome。") == (True, False)
    assert answer_in_output("St. Louis", "it is st louis!") == (True, False)
    assert answer_in_output("Paris", "") == (False, False)


# ---------------------------------------------------------------- store, resumability, shards


def test_tables_and_provenance(evaluated):
    run = evaluated
    items = item_metrics_table(run)
    assert set(items["kind"]) == set(KINDS) and set(items["checkpoint"]) == {"base", "p1-e01"}
    tidy = metrics_table(run)
    assert list(tidy.columns) == ["checkpoint", "phase", "kind", "split", "metric", "value"]
    st = Store.open(run.store_path, mode="r")
    raw = st.kind("icl").read_item_array("mc_correct", checkpoints=["p1-e01"])[0]
    split = np.array(run.items("icl")["split"])
    # heldout = validation ∪ test (rotelab.facts.split_facts)
    for sp, members in (("train", ["train"]), ("validation", ["validation"]), ("test", ["test"]), ("heldout", ["validation", "test"])):
        row = tidy[(tidy.checkpoint == "p1-e01") & (tidy.kind == "icl") & (tidy.split == sp) & (tidy.metric == "mc_correct")]
        assert np.isin(split, members).any() and row["value"].item() == pytest.approx(raw[np.isin(split, members)].mean())
    summ = summary_table(run, "p1-e01")
    assert list(summ.index) == KINDS
    assert [c for c in summ.columns] == [(s, m) for s in ("train", "heldout") for m in ("object prob", "MC acc", "gen acc")]
    attrs = st.kind("key")._array("mc_correct").attrs.asdict()
    prov = attrs["provenance/base"]
    assert prov["engine"] == "hf" and prov["dtype"] == "float32" and prov["batch_size"] == 4 and "prefix_caching" in prov and prov["mc_scoring"] == "trie"
    assert prov["engine_version"].startswith("transformers")
    assert st.read_table("eval_summary") is not None


def test_resume_computes_only_missing_units(tmp_path, monkeypatch):
    run = make_tiny_run(tmp_path, n_checkpoints=3)
    calls = count_scored_checkpoints(monkeypatch)
    evaluate_run(run, engine="hf", kinds=["key"], progress=False, shard="1/2")
    assert calls == ["p1-e01"]  # the shard: series positions ≡ 1 (mod 2)
    kg = Store.open(run.store_path, mode="r").kind("key")
    assert kg.committed("mc_correct").tolist() == [False, True, False]
    evaluate_run(run, engine="hf", kinds=["key"], progress=False)
    assert calls == ["p1-e01", "base", "p1-e02"]
    before = kg.read_item_array("object_logprob")
    calls.clear()
    evaluate_run(run, engine="hf", kinds=["key"], progress=False)
    assert calls == []  # nothing left to do
    # a unit killed half-way: one array's marker missing -> that unit (only) is recomputed
    (run.store_path / "key" / "commit_gen_text" / "c" / "2").unlink()
    evaluate_run(run, engine="hf", kinds=["key"], progress=False)
    assert calls == ["p1-e02"]
    np.testing.assert_array_equal(kg.read_item_array("object_logprob"), before)


def test_icl_kinds_are_evaluated_at_the_configured_checkpoints_only(tmp_path, monkeypatch):
    """eval.icl_checkpoints (default [base], the paper's ICL baseline): with no --checkpoints the
    ICL kinds are scored at base only while the other kinds cover the series; an explicit list is
    evaluated as asked; null means every checkpoint; an unknown id is an error naming the setting."""
    run = make_tiny_run(tmp_path, n_checkpoints=3)
    assert run.config.eval.icl_checkpoints == ["base"]
    calls: list[tuple[str, str]] = []
    orig = HFEngine.evaluate_plan

    def spy(self, plan, *a, **k):
        calls.append((self.checkpoint.name, plan.kind))
        return orig(self, plan, *a, **k)

    monkeypatch.setattr(HFEngine, "evaluate_plan", spy)
    evaluate_run(run, engine="hf", kinds=["key", "icl", "icl-translated-de"], progress=False)
    assert sorted(calls) == sorted([(c, "key") for c in ("base", "p1-e01", "p1-e02")] + [("base", "icl"), ("base", "icl-translated-de")])
    st = Store.open(run.store_path, mode="r")
    assert st.kind("icl").committed("mc_correct").tolist() == [True, False, False]
    tidy = metrics_table(run)
    assert set(tidy[tidy.kind == "icl"]["checkpoint"]) == {"base"}
    calls.clear()
    evaluate_run(run, engine="hf", kinds=["icl"], checkpoints=["p1-e02"], progress=False)
    assert calls == [("p1-e02", "icl")]
    calls.clear()
    run.config.eval.icl_checkpoints = None
    evaluate_run(run, engine="hf", kinds=["key", "icl"], progress=False)
    assert calls == [("p1-e01", "icl")]  # the only unit left
    run.config.eval.icl_checkpoints = ["p9-e99"]
    with pytest.raises(RotelabError, match=r"config\.yaml: eval\.icl_checkpoints names 'p9-e99'"):
        evaluate_run(run, engine="hf", kinds=["icl"], progress=False)


# ---------------------------------------------------------------- bad input


def _snapshot(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*")) if path.exists() else []


def test_bad_input_touches_nothing(tmp_path, monkeypatch):
    run = make_tiny_run(tmp_path, n_checkpoints=2)
    evaluate_run(run, engine="hf", kinds=["key"], checkpoints=["base"], progress=False)
    snap = _snapshot(run.store_path)

    # tokenizer without the key tokens
    ck = run.checkpoint_dir("p1-e01")
    saved = tmp_path / "saved_tok"
    shutil.copytree(ck, saved)
    for f in ck.glob("tok*"):
        f.unlink()
    tiny_tokenizer().save_pretrained(ck)
    with pytest.raises(RotelabError, match="lacks the key token"):
        evaluate_run(run, engine="hf", kinds=["key"], checkpoints=["p1-e01"], progress=False)
    assert _snapshot(run.store_path) == snap

    # checkpoint folder missing
    shutil.rmtree(ck)
    with pytest.raises(RotelabError, match="missing or incomplete"):
        evaluate_run(run, engine="hf", kinds=["key"], progress=False)
    assert _snapshot(run.store_path) == snap
    shutil.copytree(saved, ck)

    # an answer that tokenizes to nothing
    monkeypatch.setattr(acc, "answer_options", lambda items, facts, kind, n_options=100: [[a, " "] for a in items["object"]])
    with pytest.raises(RotelabError, match="empty answer|tokenizes to nothing"):
        evaluate_run(run, engine="hf", kinds=["key"], progress=False)
    assert _snapshot(run.store_path) == snap

    # unknown kind / checkpoint
    with pytest.raises(RotelabError, match="unknown prompt kind"):
        evaluate_run(run, engine="hf", kinds=["nope"], progress=False)
    with pytest.raises(RotelabError, match="no checkpoint 'p9'"):
        evaluate_run(run, engine="hf", checkpoints=["p9"], progress=False)
    assert _snapshot(run.store_path) == snap


def test_engine_selection_without_vllm(monkeypatch, tiny):
    import rotelab.probe.engines as engines

    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    with pytest.raises(RotelabError, match="--engine hf"):
        resolve_engines("vllm")
    assert resolve_engines("auto")[:2] == ("hf", "hf") and "not installed" in resolve_engines("auto")[2]
    with pytest.raises(RotelabError, match="--engine hf"):
        evaluate_run(tiny, engine="vllm", progress=False)
    assert not tiny.store_path.exists()
    with pytest.raises(RotelabError, match="unknown engine"):
        resolve_engines("tgi")
    monkeypatch.setattr(engines, "vllm_available", lambda: True)
    monkeypatch.setattr(engines, "cuda_available", lambda: False)
    assert resolve_engines("auto") == ("hf", "hf", None)  # CPU: measured faster for whole units (bench_eval_engines --part c)
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    assert resolve_engines("auto") == ("vllm", "vllm", None)
    assert resolve_engines("hf") == ("hf", "hf", None)


def test_cli_eval_prints_summary(evaluated, capsys, monkeypatch):
    import sys

    from rotelab.cli import main

    monkeypatch.setattr(sys, "argv", ["rotelab", "eval", str(evaluated.root), "--engine", "hf", "--kinds", "key,icl", "--no-progress"])
    main()
    out = capsys.readouterr().out
    assert "checkpoint base" in out and "checkpoint p1-e01" in out and "MC acc" in out and "heldout" in out
    monkeypatch.setattr(sys, "argv", ["rotelab", "eval", str(evaluated.root), "--shard", "2/2"])
    with pytest.raises(SystemExit) as ex:
        main()
    assert ex.value.code == 2 and "--shard" in capsys.readouterr().err


# ---------------------------------------------------------------- stale results (the vLLM swap defect)


def _age_unit(run, kind: str, checkpoint: str, engine: str) -> None:
    """Rewrite a unit's provenance as eval code version 1 wrote it (no eval_code_version)."""
    import zarr

    for name in METRIC_ARRAYS:
        arr = zarr.open_array(str(run.store_path / kind / name), mode="r+")
        prov = dict(arr.attrs[f"provenance/{checkpoint}"])
        prov.pop("eval_code_version")
        prov["engine"] = engine
        arr.update_attributes({f"provenance/{checkpoint}": prov})


def test_stale_vllm_units_are_recomputed_and_redo_recomputes_all(tmp_path, monkeypatch, capsys):
    run = make_tiny_run(tmp_path, n_checkpoints=3)
    evaluate_run(run, engine="hf", kinds=["key"], progress=False)
    kg = Store.open(run.store_path, mode="r").kind("key")
    good = kg.read_item_array("gen_text")
    prov = kg.array_attrs("gen_text")["provenance/p1-e01"]
    assert prov["eval_code_version"] == acc.EVAL_CODE_VERSION >= 2
    # p1-e01: written by the defective version through vLLM (wrong text stored); p1-e02 by the
    # same old version through HF only, which the defect did not touch
    kg_w = Store.open(run.store_path).kind("key")
    arrays = {m: kg.read_item_array(m, checkpoints=["p1-e01"])[0] for m in METRIC_ARRAYS}
    arrays["gen_text"] = np.array(["wrong head"] * len(arrays["gen_text"]), dtype=object)
    kg_w.write_item_arrays("p1-e01", arrays, attrs={"provenance/p1-e01": prov})
    _age_unit(run, "key", "p1-e01", "hf (scoring), vllm (generation)")
    _age_unit(run, "key", "p1-e02", "hf")
    calls = count_scored_checkpoints(monkeypatch)
    capsys.readouterr()
    evaluate_run(run, engine="hf", kinds=["key"], progress=False)
    err = capsys.readouterr().err
    assert calls == ["p1-e01"] and err.count("rotelab eval:") == 1 and "recomputing 1 unit" in err
    kg = Store.open(run.store_path, mode="r").kind("key")
    np.testing.assert_array_equal(kg.read_item_array("gen_text"), good)
    assert kg.array_attrs("gen_text")["provenance/p1-e01"]["eval_code_version"] == acc.EVAL_CODE_VERSION
    calls.clear()
    evaluate_run(run, engine="hf", kinds=["key"], progress=False)
    assert calls == []
    evaluate_run(run, engine="hf", kinds=["key"], progress=False, redo=True, checkpoints=["base", "p1-e02"])
    assert calls == ["base", "p1-e02"]
    np.testing.assert_array_equal(Store.open(run.store_path, mode="r").kind("key").read_item_array("gen_text"), good)
