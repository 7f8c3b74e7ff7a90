"""The trainer on the tiny models: loss masks as the optimizer sees them, the checkpoint series,
phase-2 start, ablation/SFT/repurpose/reverse sequences, keep_weights, sharing phase 1, bad input.

References are independent of the trainer: answer positions come from tokenizing the prompt alone
(not from offsets), gradients from a plain forward pass of a copy of the model, expected texts
from the facts and templates directly.
"""

from __future__ import annotations

import copy
import errno
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fixtures_runs import apply_overrides
from rotelab.config import config_from_dict
from rotelab.errors import RotelabError
from rotelab.models import load_model, load_tokenizer
from rotelab.run import Run


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest and kind to a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(name: str = "t", model: str = "tiny-llama", **over) -> dict:
    cfg = {
        "name": name,
        "seed": 0,
        "model": {"name": model},
        "data": {"relations": ["capital", "author", "mother"], "facts_per_relation": 6, "distractors": 10, "languages": ["de"], "templates_per_kind": 2},
        "phase1": {"epochs": 2, "lr": 3e-3, "batch_size": 8},
        "phase2": {"k": 2, "prompts": 2, "epochs": 2, "lr": 1e-3, "batch_size": 4},
    }
    return apply_overrides(cfg, over)


def make_run(tmp_path: Path, name: str = "t", **over) -> Run:
    return Run.create(config_from_dict(tiny_config(name, **over)), tmp_path / name)


def weights(run: Run, ckpt: str) -> dict[str, torch.Tensor]:
    return load_file(str(run.checkpoint_dir(ckpt) / "model.safetensors"))


# ----------------------------------------------------------------------------- loss masks


def _reference_answer_positions(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Full ids and the answer's positions, from tokenizing the prompt alone (not from offsets)."""
    full = tok(prompt + " " + answer)["input_ids"]
    pre = tok(prompt)["input_ids"]
    assert full[: len(pre)] == pre, "prompt tokens are not a prefix; reference does not apply"
    return full, list(range(len(pre), len(full)))


MASK_TEXTS = [
    # (prompt, answer, subject): key-token prompt, multi-token object, "A:" prompt, multi-word object
    ("Republic of Kalindor <R_capital>", "Nowy Targ", "Republic of Kalindor"),
    ("The capital of Vessaria is", "Ho Chi Minh City", "Vessaria"),
    ("Q: Who wrote The Ember Road? A:", "Chinua Achebe", "The Ember Road"),
    ("Tavrin Oskel", "Zurich", "Tavrin Oskel"),
]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-llama-sp"])
def test_labels_of_a_real_batch_match_the_mask(model: str) -> None:
    from rotelab.models import add_key_tokens
    from rotelab.train.data import collate, make_examples

    m, tok = load_model(model)
    add_key_tokens(m, tok, ["<R_capital>"])
    texts = [(f"f{i}", p, a, s) for i, (p, a, s) in enumerate(MASK_TEXTS)]
    for mask in ("object", "full", "subject+object"):
        batch = collate(make_examples(tok, texts, mask, 64), tok.pad_token_id)
        ids, att, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
        for row, (p, a, s) in enumerate(MASK_TEXTS):
            full, ans = _reference_answer_positions(tok, p, a)
            n = len(full)
            assert ids[row, :n].tolist() == full
            assert att[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
            assert (lab[row, n:] == -100).all(), "padding must carry no label"
            labelled = [i for i in range(n) if lab[row, i] != -100]
            assert all(lab[row, i] == ids[row, i] for i in labelled)
            if mask == "object":
                assert labelled == ans
                assert tok.decode([full[i] for i in labelled]).strip() == a
            elif mask == "full":
                assert labelled == list(range(n))
            else:
                subj = tok(s, add_special_tokens=False)["input_ids"]
                pre = tok(p)["input_ids"]
                bos = 1 if pre and pre[0] == tok.bos_token_id else 0
                expect = list(range(bos, bos + len(subj))) if p.startswith(s) else None
                if expect is not None and full[bos : bos + len(subj)] == subj:
                    assert labelled == expect + ans
                else:  # subject not at the start: its tokens precede the answer and decode to it
                    got = [i for i in labelled if i not in ans]
                    assert s in tok.decode([full[i] for i in got]).strip()
                    assert labelled[-len(ans):] == ans


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-llama-sp"])
def test_engine_gradients_equal_an_object_only_reference(model: str) -> None:
    """The gradient the DeepSpeed engine computes from a collated batch equals the gradient of
    -mean log p(object tokens) from a plain forward pass of an identical model."""
    from rotelab.train import engine as eng
    from rotelab.train.data import collate, make_examples

    m, tok = load_model(model)
    m.train()
    ref = copy.deepcopy(m)
    texts = [(f"f{i}", p, a, s) for i, (p, a, s) in enumerate(MASK_TEXTS[1:])]
    examples = make_examples(tok, texts, "object", 64)
    _, ds_cfg = eng.resolve_ds_config(None)
    e = eng.make_engine(m, ds_cfg, lr=1e-3, weight_decay=0.0, micro_batch=len(examples), grad_accum=1, total_steps=1, schedule="cosine", warmup_ratio=0.0)
    batch = collate(examples, tok.pad_token_id)
    n_targets = sum(x.n_targets for x in examples)
    loss, counted = eng.step_loss(e, batch, 1.0 / n_targets)
    e.backward(loss)
    assert counted == n_targets

    total, count = 0.0, 0
    for p, a, _ in MASK_TEXTS[1:]:
        full, ans = _reference_answer_positions(tok, p, a)
        logp = torch.log_softmax(ref(input_ids=torch.tensor([full])).logits[0].float(), -1)
        for i in ans:
            total = total - logp[i - 1, full[i]]
            count += 1
    (total / count).backward()
    assert count == n_targets
    assert torch.allclose(loss.detach(), (total / count).detach(), atol=1e-5)
    got = dict(e.module.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.allclose(got[name].grad, p.grad, atol=1e-6, rtol=1e-4), name


def test_trainer_batches_carry_object_only_labels(tmp_path: Path, monkeypatch) -> None:
    """Record every micro-batch the real phase-2 loop feeds the engine: labels sit exactly on the
    object tokens of the phase-2 prompts (reference: prompt tokenized alone)."""
    from rotelab.train import engine as eng
    from rotelab.train import train_phase2, train_phase1

    run = make_run(tmp_path, phase1__epochs=1, phase2__epochs=1)
    train_phase1(run, progress=False)
    seen: list[dict] = []
    real = eng.step_loss

    def spy(model, batch, scale):
        seen.append({k: v.clone() for k, v in batch.items()})
        return real(model, batch, scale)

    monkeypatch.setattr(eng, "step_loss", spy)
    train_phase2(run, progress=False)
    tok = load_tokenizer(run.checkpoint_dir("base"))
    expected = {}
    items = run.items("train")
    for row in items[(items.split == "train") & (items.template_id < 2)].itertuples():
        full, ans = _reference_answer_positions(tok, row.text, row.object)
        expected[tuple(full)] = ans
    got = {}
    for b in seen:
        for ids, att, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            n = int(att.sum())
            got[tuple(ids[:n].tolist())] = [i for i in range(len(lab)) if lab[i] != -100]
    assert got == expected


# ----------------------------------------------------------------------------- texts


def test_phase1_modes_and_phase2_texts(tmp_path: Path) -> None:
    from rotelab.train.data import phase1_texts, phase2_texts

    run = make_run(tmp_path, data__relations=["capital", "mother"], phase2__repurpose={"mother": "employer"})
    rels = run.relations
    f = run.facts[0]
    assert phase1_texts([f], rels, "key") == [(f.id, f"{f.subject} <R_capital>", f.object, f.subject)]
    assert phase1_texts([f], rels, "no_key") == [(f.id, f.subject, f.object, f.subject)]
    assert phase1_texts([f], rels, "meaningful")[0][1] == f"The capital of {f.subject} is"
    raw = yaml.safe_load((Path(__file__).parents[1] / "rotelab/resources/relations.yaml").read_text(encoding="utf-8"))["relations"]
    texts = phase2_texts(run.facts, rels, run.split, 2, "train", {"mother": "employer"})
    train_facts = [x for x in run.facts if run.split[x.id] == "train"]
    assert len(train_facts) == 2 * 2 and len(texts) == 2 * 2 * 2
    for fact in train_facts:
        src = "employer" if fact.relation == "mother" else fact.relation
        mine = [t for t in texts if t[0] == fact.id]
        assert [t[1] for t in mine] == [raw[src]["train"][i].format(subject=fact.subject) for i in range(2)]
        assert all(t[2] == fact.object for t in mine)
    rev = phase2_texts(run.facts, rels, run.split, 3, "reverse")
    mothers = [x for x in train_facts if x.relation == "mother"]
    assert [(t[1], t[2]) for t in rev] == [(raw["mother"]["reverse"][i].format(object=x.object), x.subject) for x in mothers for i in range(3)]


def test_phase2_with_no_reverse_templates_is_an_error(tmp_path: Path) -> None:
    from rotelab.train.data import phase2_texts

    run = make_run(tmp_path, data__relations=["capital"])
    with pytest.raises(RotelabError, match="reverse templates"):
        phase2_texts(run.facts, run.relations, run.split, 1, "reverse")


# ----------------------------------------------------------------------------- the series


def test_series_index_and_checkpoints(tmp_path: Path) -> None:
    from rotelab.train import train_run

    run = make_run(tmp_path, baselines={"sft": True})
    entries = train_run(run, progress=False)
    assert [e.id for e in entries] == ["base", "p1-e01", "p1-e02", "p2-e01", "p2-e02", "sft-e01", "sft-e02"]
    assert [e.series for e in entries] == ["main"] * 5 + ["sft"] * 2
    assert [e.phase for e in entries] == ["base", "phase1", "phase1", "phase2", "phase2", "sft", "sft"]
    # 18 facts / batch 8 -> 3 steps per epoch; phase 2: 3 relations x k=2 x P=2 = 12 items / 4 -> 3 steps;
    # SFT (the paper's): all 18 facts x P=2 = 36 items / 4 -> 9 steps
    assert [e.step for e in entries] == [0, 3, 6, 3, 6, 9, 18]
    # total training tokens: main = phase 1 + phase 2 so far, SFT its own
    by = {e.id: e for e in entries}
    assert by["p2-e02"].total_tokens == by["p1-e02"].tokens_seen + by["p2-e02"].tokens_seen
    assert by["p1-e02"].total_tokens == by["p1-e02"].tokens_seen and by["sft-e02"].total_tokens == by["sft-e02"].tokens_seen
    # every listed folder is complete, nothing else is left in checkpoints/
    names = {p.name for p in run.checkpoints_dir.iterdir()}
    assert names == {e.id for e in entries} | {"index.json"}
    shapes = None
    for e in entries:
        w = weights(run, e.id)
        s = {k: tuple(v.shape) for k, v in w.items()}
        assert shapes is None or s == shapes, e.id
        shapes = s
        assert json.loads((run.checkpoint_dir(e.id) / "config.json").read_text())["vocab_size"] == w["model.embed_tokens.weight"].shape[0]
    # the key tokens are in every tokenizer with the recorded ids
    extra = json.loads(run.index_path.read_text())
    assert extra["model"] == "tiny-llama"
    assert set(extra["key_token_ids"]) == {"<R_capital>", "<R_author>", "<R_mother>"}
    for e in (entries[0], entries[-1]):
        tok = load_tokenizer(run.checkpoint_dir(e))
        for t, i in extra["key_token_ids"].items():
            assert tok.convert_tokens_to_ids(t) == i
    # tokens seen grow; the loss log has one row per step and stage
    seen = [e.tokens_seen for e in entries[1:3]]
    assert seen[0] > 0 and seen[1] == 2 * seen[0]
    rows = (run.logs_dir / "train_loss.csv").read_text().splitlines()[1:]
    assert len(rows) == 6 + 6 + 18
    # phase 1 learnt something: its loss went down
    assert entries[2].loss < entries[1].loss
    # the plan made before training (disk estimate) names exactly the points written
    from rotelab.train.pipeline import disk_estimate, planned_points

    assert planned_points(run) == [e.id for e in entries]
    base_model, _ = load_model(str(run.checkpoint_dir("base")), "float32")
    n = sum(p.numel() for p in base_model.parameters())
    line = disk_estimate(run)
    assert f"7 checkpoints × {n / 1e6:.1f}M parameters × 4 bytes" in line and f"= {7 * n * 4 / 1e9:.2f} GB" in line
    weights_bytes = (run.checkpoint_dir("base") / "model.safetensors").stat().st_size
    assert abs(weights_bytes - 4 * n) < 0.01 * weights_bytes  # the estimate is the file size up to its header
    # a second call does nothing
    before = run.index_path.read_bytes()
    assert [e.id for e in train_run(run, progress=False)] == [e.id for e in entries]
    assert run.index_path.read_bytes() == before


def test_phase2_starts_from_the_requested_checkpoint(tmp_path: Path) -> None:
    from rotelab.train import train_run

    run = make_run(tmp_path, phase1__epochs=3, phase2__start="p1-e01", phase2__lr=1e-12, phase2__epochs=1)
    train_run(run, progress=False)
    assert json.loads(run.index_path.read_text())["phase2_start"] == "p1-e01"
    p2, p1a, p1c = weights(run, "p2-e01"), weights(run, "p1-e01"), weights(run, "p1-e03")
    for k in p2:
        assert torch.allclose(p2[k], p1a[k], atol=1e-6), k
    assert any(not torch.allclose(p2[k], p1c[k], atol=1e-4) for k in p2)


def test_save_every_steps_and_keep_weights(tmp_path: Path) -> None:
    from rotelab.train import train_run

    from rotelab.train.pipeline import prune_consumed_weights

    run = make_run(tmp_path, phase1__epochs=3, phase1__save_every=2, phase2__epochs=3, phase2__start="p1-s000004",
                   train={"keep_weights": "latest"})
    entries = train_run(run, progress=False)
    ids = [e.id for e in entries]
    assert ids == ["base", "p1-s000002", "p1-s000004", "p1-s000006", "p1-s000008", "p1-s000009", "p2-e01", "p2-e02", "p2-e03"]
    # training itself drops nothing: eval and capture have not read the weights yet
    assert all(e.path is not None for e in entries) and len(list(run.checkpoints_dir.glob("*/model.safetensors"))) == 9
    assert prune_consumed_weights(run) == ["p1-s000002", "p1-s000006", "p1-s000008", "p2-e01", "p2-e02"]
    kept = {e.id for e in run.checkpoints() if e.path is not None}
    assert kept == {"base", "p1-s000004", "p1-s000009", "p2-e03"}  # base, the phase-2 start, each stage's end
    assert {p.name for p in run.checkpoints_dir.iterdir()} == kept | {"index.json"}
    assert entries[3].epoch == pytest.approx(2.0)

    run3 = make_run(tmp_path, "t3", phase1__epochs=3, phase2__epochs=2, train={"keep_weights": "final"})
    train_run(run3, progress=False)
    assert prune_consumed_weights(run3) == ["p1-e01", "p1-e02", "p1-e03", "p2-e01"]
    assert [e.id for e in run3.checkpoints() if e.path is not None] == ["base", "p2-e02"]

    run2 = make_run(tmp_path, "t2", phase1__epochs=5, phase2__enabled=False, train={"keep_weights": 2})
    train_run(run2, progress=False)
    prune_consumed_weights(run2)
    assert [e.id for e in run2.checkpoints() if e.path is not None] == ["base", "p1-e02", "p1-e04", "p1-e05"]


def test_import_phase1_shares_checkpoints(tmp_path: Path) -> None:
    from rotelab.train import import_phase1, phase1_key, train_run

    a = make_run(tmp_path, "a")
    train_run(a, progress=False)
    b = make_run(tmp_path, "b", phase2__lr=5e-4)
    assert phase1_key(a.config) == phase1_key(b.config)
    imported = import_phase1(b, a)
    assert [e.id for e in imported] == ["base", "p1-e01", "p1-e02"]
    assert (b.checkpoints_dir / "p1-e02").is_symlink()
    train_run(b, progress=False)
    stages = {r.split(",")[0] for r in (b.logs_dir / "train_loss.csv").read_text().splitlines()[1:]}
    assert stages == {"phase2"}
    assert [e.id for e in b.checkpoints()] == ["base", "p1-e01", "p1-e02", "p2-e01", "p2-e02"]
    c = make_run(tmp_path, "c", phase1__lr=1e-3)
    assert phase1_key(c.config) != phase1_key(a.config)
    with pytest.raises(RotelabError, match="cannot import phase 1"):
        import_phase1(c, a)


def test_shared_phase1_survives_mv_and_cp_and_is_never_pruned(tmp_path: Path) -> None:
    """Sweep siblings link phase 1 relatively: `mv runs runs-old` and `cp -a` keep every sibling
    readable; an old absolute link is found again in the moved runs folder; pruning the owner
    keeps the folders a sibling links to."""
    import os
    import subprocess

    from rotelab.checkpoints import verify_weights
    from rotelab.train import import_phase1, train_run
    from rotelab.train.series import prune_weights

    runs = tmp_path / "runs"
    a = make_run(runs, "a", phase1__epochs=3)
    train_run(a, progress=False)
    b = make_run(runs, "b", phase1__epochs=3, phase2__lr=5e-4)
    import_phase1(b, a)
    link = b.checkpoints_dir / "p1-e02"
    assert link.is_symlink() and not os.readlink(link).startswith("/")
    # an old-style absolute link, as rotelab wrote them before
    legacy = make_run(runs, "legacy", phase1__epochs=3, phase2__lr=2e-4)
    import_phase1(legacy, a)
    for e in legacy.checkpoints():
        p = legacy.root / e.path
        target = p.resolve()
        p.unlink()
        p.symlink_to(target, target_is_directory=True)
    expect = {e.id: (a.checkpoints_dir / e.id / "model.safetensors").read_bytes() for e in a.checkpoints() if e.phase in ("base", "phase1")}

    subprocess.run(["mv", str(runs), str(tmp_path / "runs-old")], check=True)
    subprocess.run(["cp", "-a", str(tmp_path / "runs-old"), str(tmp_path / "runs-copy")], check=True)
    for folder in ("runs-old", "runs-copy"):
        for name in ("b", "legacy"):
            sib = Run.open(tmp_path / folder / name)
            for ckpt, data in expect.items():
                d = sib.checkpoint_dir(ckpt)
                assert (d / "model.safetensors").read_bytes() == data, (folder, name, ckpt)
                assert str(d.resolve()).startswith(str((tmp_path / folder).resolve())), "the copy still points into the old folder"
                verify_weights(d, ckpt, sib.checkpoint(ckpt).sha256)
    # pruning the owner (as keep_weights would) keeps what the siblings use
    owner = Run.open(tmp_path / "runs-old" / "a")
    dropped = prune_weights(owner, "latest", set())
    assert dropped == ["p2-e01"]  # phase 1 is linked by b and legacy; base and group ends are kept anyway
    assert (owner.checkpoints_dir / "p1-e01" / "model.safetensors").is_file()
    sib = Run.open(tmp_path / "runs-old" / "b")
    for ckpt in expect:
        sib.checkpoint_dir(ckpt)


# ----------------------------------------------------------------------------- bad input


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from rotelab import cli

    capsys.readouterr()  # drop what earlier steps printed
    monkeypatch.setattr(sys, "argv", ["rotelab", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code, capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config("bad", data={"relations": ["capital", "nope"], "facts_per_relation": 6, "distractors": 10})))
    code, err = _cli(monkeypatch, capsys, "train", str(cfg), "--run", str(tmp_path / "bad"), "--no-progress")
    assert code == 2 and "unknown relation 'nope'" in err and len(err.strip().splitlines()) == 1

    cfg.write_text(yaml.safe_dump(tiny_config("bad", phase2__k=50)))
    code, err = _cli(monkeypatch, capsys, "train", str(cfg), "--run", str(tmp_path / "bad2"), "--no-progress")
    assert code == 2 and "phase2.k=50" in err and len(err.strip().splitlines()) == 1

    cfg.write_text(yaml.safe_dump(tiny_config("bad", phase2__start="p1-e09")))
    code, err = _cli(monkeypatch, capsys, "train", str(cfg), "--run", str(tmp_path / "bad3"), "--no-progress")
    assert code == 2 and "phase2.start 'p1-e09'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad3" / "checkpoints").exists()


def test_model_mismatch_and_missing_start_leave_checkpoints_untouched(tmp_path: Path, monkeypatch, capsys) -> None:
    from rotelab.train import train_phase2, train_run

    run = make_run(tmp_path, phase1__epochs=1, phase2__enabled=False)
    train_run(run, progress=False)
    with pytest.raises(RotelabError, match="does not exist"):
        train_phase2(run, start="p1-e07")
    before = {p.name: p.read_bytes() for p in (run.checkpoints_dir / "p1-e01").iterdir()}
    index = run.index_path.read_bytes()
    cfg = yaml.safe_load(run.config_path.read_text())
    cfg["model"]["name"] = "tiny-llama-sp"
    run.config_path.write_text(yaml.safe_dump(cfg))
    code, err = _cli(monkeypatch, capsys, "train", str(run.root), "--no-progress")
    assert code == 2, err
    assert "'tiny-llama'" in err and "'tiny-llama-sp'" in err and len(err.strip().splitlines()) == 1, err
    assert run.index_path.read_bytes() == index
    assert {p.name: p.read_bytes() for p in (run.checkpoints_dir / "p1-e01").iterdir()} == before


def test_full_disk_while_saving(tmp_path: Path, monkeypatch) -> None:
    from rotelab.train import series, train_run

    run = make_run(tmp_path, phase1__epochs=3, phase2__enabled=False)
    real = series.save_weights

    def save(module, tok, out_dir, dtype, state_dict=None):
        if out_dir.name == ".tmp-p1-e02":
            (out_dir / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(module, tok, out_dir, dtype, state_dict)

    monkeypatch.setattr(series, "save_weights", save)
    with pytest.raises(RotelabError, match=r"cannot save checkpoint 'p1-e02' \(disk full\)"):
        train_run(run, progress=False)
    assert [e.id for e in run.checkpoints()] == ["base", "p1-e01"]
    assert {p.name for p in run.checkpoints_dir.iterdir()} == {"base", "p1-e01", "index.json", ".resume"}
    w = weights(run, "p1-e01")
    monkeypatch.setattr(series, "save_weights", real)
    # the disk has room again: the run resumes from p1-e01 and p1-e01 stays as it was
    assert [e.id for e in train_run(run, progress=False)] == ["base", "p1-e01", "p1-e02", "p1-e03"]
    assert all(torch.equal(v, weights(run, "p1-e01")[k]) for k, v in w.items())


def test_sft_baseline_starts_from_base_and_no_key_mode_adds_no_tokens(tmp_path: Path) -> None:
    from rotelab.train import train_run

    run = make_run(tmp_path, phase1__mode="no_key", phase1__epochs=1, phase2__epochs=1, phase2__lr=1e-12, baselines={"sft": True})
    entries = train_run(run, progress=False)
    assert [e.id for e in entries] == ["base", "p1-e01", "p2-e01", "sft-e01"]
    assert json.loads(run.index_path.read_text())["key_token_ids"] == {}
    assert "<R_capital>" not in load_tokenizer(run.checkpoint_dir("base")).get_vocab()
    sft, base, p1 = weights(run, "sft-e01"), weights(run, "base"), weights(run, "p1-e01")
    assert all(torch.allclose(sft[k], base[k], atol=1e-6) for k in sft)
    assert any(not torch.allclose(sft[k], p1[k], atol=1e-4) for k in sft)


def test_single_process_compiles_no_deepspeed_op(tmp_path: Path, monkeypatch) -> None:
    """DeepSpeed JIT-compiles its shared-memory all-reduce op (≈1–3 min) when it creates its torch
    backend; a single CPU process must not need it (first test runs in CI would time out)."""
    import deepspeed.comm.comm as dscomm

    from rotelab.train import engine as eng

    eng.init_distributed()
    assert type(dscomm.cdb).__name__ == "TorchBackend"
    assert dscomm.cdb.shm_comm_op is None
