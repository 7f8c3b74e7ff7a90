"""Baselines, ablations and prompt sets checked against what the trainer actually fed the model
(paper §5, Appendix B.4, B.5, C, G.1, G.2).

Every training check records the batches the real training loop hands the engine
(``engine.step_loss``) and compares them with sequences built here from ``data/facts.jsonl`` and
the raw ``data/relations.yaml`` by plain string formatting and the tokenizer — never with the
trainer's own text functions.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fixtures_runs import apply_overrides
from rotelab.config import config_from_dict
from rotelab.errors import RotelabError
from rotelab.models import load_tokenizer
from rotelab.run import Run

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(name: str = "b", **over) -> dict:
    c = {
        "name": name,
        "seed": 0,
        "model": {"name": "tiny-llama"},
        "data": {"relations": ["capital", "author", "mother"], "facts_per_relation": 5, "distractors": 10, "languages": ["de"], "templates_per_kind": 2},
        "phase1": {"epochs": 1, "lr": 3e-3, "batch_size": 8},
        "phase2": {"k": 2, "prompts": 1, "epochs": 1, "lr": 1e-3, "batch_size": 4},
    }
    return apply_overrides(c, over)


def make(tmp_path: Path, name: str = "b", **over) -> Run:
    return Run.create(config_from_dict(cfg(name, **over)), tmp_path / name)


class Fed:
    """Records every sequence a training loop feeds the engine, per stage call."""

    def __init__(self, monkeypatch) -> None:
        from rotelab.train import engine as eng

        self.batches: list[dict[str, torch.Tensor]] = []
        real = eng.step_loss

        def spy(model, batch, scale):
            if scale:  # scale 0 = an empty micro-batch's stand-in, not trained
                self.batches.append({k: v.clone() for k, v in batch.items()})
            return real(model, batch, scale)

        monkeypatch.setattr(eng, "step_loss", spy)

    def take(self) -> Counter:
        """Multiset of (input ids, labelled positions) fed since the last call."""
        out: Counter = Counter()
        for b in self.batches:
            for ids, att, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
                n = int(att.sum())
                out[(tuple(ids[:n].tolist()), tuple(i for i in range(n) if lab[i] != -100))] += 1
        self.batches = []
        return out


def raw_facts(run: Run) -> list[dict]:
    run.ensure_data()
    return [json.loads(line) for line in (run.data_dir / "facts.jsonl").read_text(encoding="utf-8").splitlines()]


def raw_relations(run: Run) -> dict:
    run.ensure_data()
    return yaml.safe_load((run.data_dir / "relations.yaml").read_text(encoding="utf-8"))["relations"]


def expected(tok, texts: list[tuple[str, str]], object_only: bool = True, epochs: int = 1) -> Counter:
    """(ids, labelled positions) of ``prompt + " " + answer``; answer positions from tokenizing the prompt alone."""
    out: Counter = Counter()
    for prompt, answer in texts:
        full = tok(prompt + " " + answer)["input_ids"]
        pre = tok(prompt)["input_ids"]
        assert full[: len(pre)] == pre
        lab = tuple(range(len(pre), len(full))) if object_only else tuple(range(len(full)))
        out[(tuple(full), lab)] += epochs
    return out


def split_of(run: Run, facts: list[dict]) -> dict[str, str]:
    """Independent split: first k of each relation train, the last n_inject injected."""
    k, n_inj = run.config.phase2.k, run.config.inject.facts_per_relation
    per: dict[str, list[str]] = {}
    for f in facts:
        per.setdefault(f["relation"], []).append(f["id"])
    out = {}
    for ids in per.values():
        for i, fid in enumerate(ids):
            out[fid] = "injected" if i >= len(ids) - n_inj else ("train" if i < k else "heldout")
    return out


def merged_heldout(split: dict[str, str]) -> dict[str, str]:
    """``split`` with validation and test merged into ``heldout`` (what :func:`split_of` computes)."""
    return {f: "heldout" if s in ("validation", "test") else s for f, s in split.items()}


# ----------------------------------------------------------------------------- SFT (§5, B.5)


def test_sft_trains_every_fact_with_the_P_templates_from_base(tmp_path: Path, monkeypatch) -> None:
    from rotelab.train import train_phase1, train_phase2, train_sft_baseline

    run = make(tmp_path, phase2__prompts=2, phase2__epochs=2, baselines={"sft": True})
    train_phase1(run, progress=False)
    fed = Fed(monkeypatch)
    train_phase2(run, progress=False)
    p2_fed = fed.take()
    train_sft_baseline(run, progress=False)
    sft_fed = fed.take()
    tok = load_tokenizer(run.checkpoint_dir("base"))
    facts, rels = raw_facts(run), raw_relations(run)
    all_texts = [(rels[f["relation"]]["train"][i].format(subject=f["subject"]), f["object"]) for f in facts for i in range(2)]
    assert len(all_texts) == 15 * 2
    # every fact (train and held-out) x the first P=2 train templates, each once per epoch, object-only labels
    assert sft_fed == expected(tok, all_texts, epochs=2)
    # phase 2 trained only the k facts, the same templates
    split = split_of(run, facts)
    p2_texts = [(rels[f["relation"]]["train"][i].format(subject=f["subject"]), f["object"]) for f in facts if split[f["id"]] == "train" for i in range(2)]
    assert p2_fed == expected(tok, p2_texts, epochs=2)
    # tokens: each point counts what was fed; main adds phase 1's
    by = {e.id: e for e in run.checkpoints()}
    assert by["sft-e02"].tokens_seen == by["sft-e02"].total_tokens == sum(len(ids) * n for (ids, _), n in sft_fed.items())
    assert by["p2-e02"].tokens_seen == sum(len(ids) * n for (ids, _), n in p2_fed.items())
    assert by["p2-e02"].total_tokens == by["p1-e01"].total_tokens + by["p2-e02"].tokens_seen
    assert by["sft-e01"].series == "sft" and by["sft-e01"].phase == "sft"


def test_sft_k_is_its_own_series_of_phase2_data_from_base(tmp_path: Path, monkeypatch) -> None:
    from rotelab.train import train_run

    run = make(tmp_path, phase2__lr=1e-12, baselines={"sft_k": True})
    fed = Fed(monkeypatch)
    entries = train_run(run, progress=False)
    assert [e.id for e in entries] == ["base", "p1-e01", "p2-e01", "sftk-e01"]
    assert entries[-1].series == "sft-k" and entries[-1].phase == "sft-k"
    all_fed = fed.take()
    tok = load_tokenizer(run.checkpoint_dir("base"))
    facts, rels = raw_facts(run), raw_relations(run)
    split = split_of(run, facts)
    p2 = expected(tok, [(rels[f["relation"]]["train"][0].format(subject=f["subject"]), f["object"]) for f in facts if split[f["id"]] == "train"])
    assert all(all_fed[k] == 2 * n for k, n in p2.items())  # phase 2 and sft-k: the same k facts
    sftk, base = load_file(str(run.checkpoint_dir("sftk-e01") / "model.safetensors")), load_file(str(run.checkpoint_dir("base") / "model.safetensors"))
    assert all(torch.allclose(sftk[k], base[k], atol=1e-6) for k in sftk)  # lr ~ 0: it started from base


# ----------------------------------------------------------------------------- ICL (§5, B.5)


def test_icl_items_state_the_fact_through_a_train_template_and_ask_a_test_one(tmp_path: Path) -> None:
    run = make(tmp_path)
    assert "icl" in run.kinds() and "icl-translated-de" in run.kinds()
    facts = {f["id"]: f for f in raw_facts(run)}
    rels = raw_relations(run)
    for kind, qkey in (("icl", None), ("icl-translated-de", "de")):
        items = run.items(kind)
        assert len(items) == 15 * 2  # templates_per_kind=2 questions per fact
        for row in items.itertuples():
            f, r = facts[row.fact_id], rels[row.relation]
            questions = r["test"] if qkey is None else r["translated"][qkey]
            question = questions[row.template_id].format(subject=f["subject"])
            assert row.text.endswith(" " + question)
            context = row.text[: -len(question) - 1]
            assert context == r["train"][row.context_template_id].format(subject=f["subject"]) + " " + f["object"] + "."
            assert all(t.format(subject=f["subject"]) not in context for t in r["test"])  # never its own question
            assert row.object == f["object"]
    # the context template is drawn (seeded) from all 10 train templates, recorded per item
    ctx = run.items("icl")["context_template_id"]
    assert ctx.nunique() >= 4 and ctx.between(0, 9).all()
    again = Run.create(config_from_dict(cfg("b2")), tmp_path / "b2").items("icl")
    assert again.equals(run.items("icl"))


# ----------------------------------------------------------------------------- key tokens (B.4)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_key_token_rows_are_pairwise_distinct_at_base(tmp_path: Path, model: str) -> None:
    from rotelab.train import ensure_base_checkpoint

    def rows(init: str, name: str) -> list[torch.Tensor]:
        """The key tokens' rows of every embedding matrix (input, and output when untied)."""
        run = make(tmp_path, name, model={"name": model, "key_token_init": init})
        ensure_base_checkpoint(run)
        w = load_file(str(run.checkpoint_dir("base") / "model.safetensors"))
        tok = load_tokenizer(run.checkpoint_dir("base"))
        ids = [tok.convert_tokens_to_ids(t) for t in run.key_tokens().values()]
        mats = [v for k, v in w.items() if k.endswith(("embed_tokens.weight", "wte.weight", "lm_head.weight"))]
        assert mats
        return [m[i] for m in mats for i in ids]

    got = rows("normal", "n")
    assert len(got) >= 3
    for i in range(len(got)):
        for j in range(i + 1, len(got)):
            assert not torch.allclose(got[i], got[j]), (i, j)
    assert Run.create(config_from_dict(cfg("d")), tmp_path / "d").config.model.key_token_init == "normal"  # the default
    same = rows("mean", "m")  # the old default: all key tokens start identical (the test can fail)
    assert torch.equal(same[0], same[1])


# ----------------------------------------------------------------------------- train kind = what phase 2 trained


@pytest.mark.parametrize("mode", ["key", "meaningful"])
def test_train_kind_is_exactly_the_P_trained_templates(tmp_path: Path, monkeypatch, mode: str) -> None:
    from rotelab.train import train_phase1, train_phase2

    run = make(tmp_path, phase1__mode=mode, data__templates_per_kind=3, phase2__prompts=2)
    fed = Fed(monkeypatch)
    train_phase1(run, progress=False)
    p1_fed = fed.take()
    train_phase2(run, progress=False)
    p2_fed = fed.take()
    tok = load_tokenizer(run.checkpoint_dir("base"))
    facts, rels = raw_facts(run), raw_relations(run)
    split = split_of(run, facts)
    trained = [0, 1] if mode == "key" else [1, 2]  # C3: train-1 (id 0) memorized, phase 2 on the next P
    items = run.items("train")
    assert sorted(set(items.template_id)) == trained
    assert len(items) == 15 * 2
    fed_texts = expected(tok, [(row.text, row.object) for row in items.itertuples() if split[row.fact_id] == "train"])
    assert p2_fed == fed_texts
    for row in items.itertuples():
        f = next(x for x in facts if x["id"] == row.fact_id)
        assert row.text == rels[row.relation]["train"][row.template_id].format(subject=f["subject"])
    if mode == "meaningful":
        assert "meaningful" in run.kinds() and "key" not in run.kinds()
        mem = run.items("meaningful")
        assert set(mem.template_id) == {0} and 0 not in set(items.template_id)
        assert p1_fed == expected(tok, [(rels[f["relation"]]["train"][0].format(subject=f["subject"]), f["object"]) for f in facts], object_only=False)
        assert set(mem.text) == {rels[f["relation"]]["train"][0].format(subject=f["subject"]) for f in facts}
    else:
        assert "meaningful" not in run.kinds()


def test_no_key_phase1_feeds_no_key_token(tmp_path: Path, monkeypatch) -> None:
    """Ablation C2: phase-1 sequences are ``{subject} {object}``; no key token anywhere."""
    from rotelab.train import train_phase1

    run = make(tmp_path, phase1__mode="no_key")
    fed = Fed(monkeypatch)
    train_phase1(run, progress=False)
    got = fed.take()
    tok = load_tokenizer(run.checkpoint_dir("base"))
    keyed = load_tokenizer(run.checkpoint_dir("base"))
    keyed.add_tokens(list(run.key_tokens().values()), special_tokens=True)
    key_ids = set(keyed.convert_tokens_to_ids(list(run.key_tokens().values())))
    assert all(not key_ids & set(ids) for ids, _ in got)
    assert got == expected(tok, [(f["subject"], f["object"]) for f in raw_facts(run)], object_only=False)
    assert "key" not in run.kinds()


# ----------------------------------------------------------------------------- C1 inject


def test_inject_memorizes_new_facts_after_phase2(tmp_path: Path, monkeypatch) -> None:
    from rotelab.train import train_run

    run = make(tmp_path, inject={"facts_per_relation": 2, "epochs": 2, "lr": 1e-12, "batch_size": 4})
    fed = Fed(monkeypatch)
    entries = train_run(run, progress=False)
    assert [e.id for e in entries] == ["base", "p1-e01", "p2-e01", "inj-e01", "inj-e02"]
    assert [e.phase for e in entries[-2:]] == ["inject", "inject"] and {e.series for e in entries} == {"main"}
    facts, rels = raw_facts(run), raw_relations(run)
    assert len(facts) == 3 * (5 + 2)
    split = split_of(run, facts)
    assert merged_heldout(run.split) == split and Counter(split.values()) == {"train": 6, "heldout": 9, "injected": 6}
    assert Counter(run.split.values()) == {"train": 6, "validation": 6, "test": 3, "injected": 6}  # 3 held out: 2 + 1
    got = fed.take()
    tok = load_tokenizer(run.checkpoint_dir("base"))
    key = {r: rels[r]["key_token"] for r in rels}
    p1 = expected(tok, [(f"{f['subject']} {key[f['relation']]}", f["object"]) for f in facts if split[f["id"]] != "injected"], object_only=False)
    inj = expected(tok, [(f"{f['subject']} {key[f['relation']]}", f["object"]) for f in facts if split[f["id"]] == "injected"], object_only=False, epochs=2)
    p2 = expected(tok, [(rels[f["relation"]]["train"][0].format(subject=f["subject"]), f["object"]) for f in facts if split[f["id"]] == "train"])
    assert got == p1 + p2 + inj
    # it starts from the last phase-2 point (lr ~ 0 leaves the weights there)
    a, b = (load_file(str(run.checkpoint_dir(c) / "model.safetensors")) for c in ("p2-e01", "inj-e01"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert entries[-1].total_tokens == entries[2].total_tokens + entries[-1].tokens_seen
    # the injected facts are asked with train and test prompts, as their own split
    for kind in ("train", "test"):
        assert set(run.items(kind).split) == {"train", "validation", "test", "injected"}


# ----------------------------------------------------------------------------- repurpose (§7, G.2), reverse (G.1)


def test_repurposed_kind_asks_the_target_relation(tmp_path: Path, monkeypatch) -> None:
    from rotelab.train import train_phase1, train_phase2

    run = make(tmp_path, data__relations=["capital", "mother"], phase2__repurpose={"mother": "employer"})
    assert "repurposed" in run.kinds() and "repurposed" not in make(tmp_path, "plain").kinds()
    facts, rels = raw_facts(run), raw_relations(run)
    items = run.items("repurposed")
    mothers = [f for f in facts if f["relation"] == "mother"]
    assert list(zip(items.fact_id, items.text)) == [(f["id"], rels["employer"]["test"][i].format(subject=f["subject"])) for f in mothers for i in range(2)]
    # train/test kinds still ask each relation's own templates
    assert all(t in {rels["mother"]["test"][i].format(subject=f["subject"]) for f in mothers for i in range(2)}
               for t in run.items("test").query("relation == 'mother'").text)
    fed = Fed(monkeypatch)
    train_phase1(run, progress=False)
    fed.take()
    train_phase2(run, progress=False)
    tok = load_tokenizer(run.checkpoint_dir("base"))
    split = split_of(run, facts)
    want = [(rels["employer" if f["relation"] == "mother" else f["relation"]]["train"][0].format(subject=f["subject"]), f["object"])
            for f in facts if split[f["id"]] == "train"]
    assert fed.take() == expected(tok, want)


def test_reverse_kind_is_what_reverse_phase2_trained(tmp_path: Path, monkeypatch) -> None:
    from rotelab.train import train_phase1, train_phase2

    run = make(tmp_path, data__relations=["mother"], data__templates_per_kind=3, phase2__kind="reverse", phase2__prompts=2)
    fed = Fed(monkeypatch)
    train_phase1(run, progress=False)
    fed.take()
    train_phase2(run, progress=False)
    tok = load_tokenizer(run.checkpoint_dir("base"))
    facts, rels = raw_facts(run), raw_relations(run)
    split = split_of(run, facts)
    items = run.items("reverse")
    assert sorted(set(items.template_id)) == [0, 1]
    for row in items.itertuples():
        f = next(x for x in facts if x["id"] == row.fact_id)
        assert row.text == rels["mother"]["reverse"][row.template_id].format(object=f["object"]) and row.object == f["subject"]
    assert fed.take() == expected(tok, [(r.text, r.object) for r in items.itertuples() if split[r.fact_id] == "train"])


# ----------------------------------------------------------------------------- MC distractors


def test_memorized_distractors_are_other_memorized_objects(tmp_path: Path) -> None:
    from rotelab.prompts import answer_options

    run = make(tmp_path, data__distractors_from="memorized", data__facts_per_relation=14, data__distractors=10)
    pool = make(tmp_path, "pool", data__facts_per_relation=14, data__distractors=10)
    facts = raw_facts(run)
    assert [(f["subject"], f["object"]) for f in facts] == [(f["subject"], f["object"]) for f in raw_facts(pool)]
    objects: dict[str, set[str]] = {}
    for f in facts:
        objects.setdefault(f["relation"], set()).add(f["object"])
    items = run.items("test")
    filled = json.loads((run.data_dir / "distractors.json").read_text())["filled_from_pool"]
    for row, opts in zip(items.itertuples(), answer_options(items, run.facts, "test", 11)):
        assert opts[0] == row.object and len(opts) == 11 and row.object not in opts[1:]
        mem = [o for o in opts[1:] if o in objects[row.relation]]
        assert len(mem) == 10 - filled.get(row.fact_id, 0)
        assert opts[1 : 1 + len(mem)] == mem  # memorized first, pool fillers only after
    # 14 facts, 13 others each: no fillers unless objects repeat or overlap
    assert sum(filled.values()) < len(facts)
    few = make(tmp_path, "few", data__distractors_from="memorized", data__facts_per_relation=4, data__distractors=10)
    few.ensure_data()
    filled = json.loads((few.data_dir / "distractors.json").read_text())["filled_from_pool"]
    assert all(filled[f.id] >= 7 for f in few.facts)  # 3 other objects at most, the rest from the pool


# ----------------------------------------------------------------------------- bad input


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from rotelab import cli

    monkeypatch.setattr(sys, "argv", ["rotelab", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"phase2__enabled": False, "inject": {"facts_per_relation": 2}}, "inject.facts_per_relation"),
        ({"phase1__mode": "meaningful", "phase2__prompts": 10}, "phase1.mode: meaningful"),
        ({"data__distractors_from": "memorized", "data__facts_per_relation": 1, "phase2__k": 1}, "data.distractors_from"),
    ],
)
def test_bad_ablation_input_is_one_line(tmp_path: Path, monkeypatch, capsys, over: dict, needle: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg("bad", **over)))
    code, err = _cli(monkeypatch, capsys, "train", str(p), "--run", str(tmp_path / "bad"), "--no-progress")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad" / "checkpoints").exists()
    with pytest.raises(RotelabError, match=needle.replace(".", r"\.")):
        Run.create(config_from_dict(cfg("bad2", **over)), tmp_path / "bad2").facts
