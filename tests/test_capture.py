"""Hidden-state capture: layer indexing against a plain HF forward, padding invariance on two
tokenizer/position families, the stage against per-prompt references, subsets, shards, kill -9 and
resume, and bad input."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rotelab.errors import RotelabError
from rotelab.models import load_model
from rotelab.probe import capture_hidden, capture_run
from rotelab.run import Run
from rotelab.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_runs import make_tiny_run  # noqa: E402

TEXTS = [
    "Kalindor",
    "The capital of Kalindor is",
    "Which city is the capital of the old kingdom of Mereth, far in the north",
    "Who wrote",
    "Ossian <R_capital>",
    "x",
    "In what city does the government of Tarsk sit today",
]


def _reference(model, tok, text: str) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A plain HF forward of one unpadded prompt: (hidden_states at the last token, raw output of the
    last block at the last token (forward hook), the final norm's input → output check value)."""
    from rotelab.tokenization import encode_prompt

    ids = torch.tensor([encode_prompt(tok, text)])
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, _i, out):
        seen["last_block"] = (out[0] if isinstance(out, tuple) else out)[0, -1].detach().clone()

    handle = blocks[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    return [h[0, -1] for h in out.hidden_states], seen["last_block"], out.logits[0, -1]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_layer_indexing_matches_a_plain_forward(name: str) -> None:
    model, tok = load_model(name)
    n = model.config.num_hidden_layers
    hidden, final = capture_hidden(model, tok, TEXTS, batch_size=3)
    assert hidden.shape == (n + 1, len(TEXTS), model.config.hidden_size) and hidden.dtype == np.float32
    assert final.shape == (len(TEXTS), model.config.hidden_size)
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    head = model.get_output_embeddings()
    for i, text in enumerate(TEXTS):
        hs, last_block, logits = _reference(model, tok, text)
        # layer 0 = embedding output, layer i < n = output of block i (HF's hidden_states[i])
        for layer in range(n):
            np.testing.assert_allclose(hidden[layer, i], hs[layer].numpy(), atol=2e-5, rtol=1e-5)
        # layer n = the raw output of the last block, NOT HF's hidden_states[-1] (which is normed)
        np.testing.assert_allclose(hidden[n, i], last_block.numpy(), atol=2e-5, rtol=1e-5)
        assert not np.allclose(hidden[n, i], hs[n].numpy(), atol=1e-3)
        # final_norm = HF's hidden_states[-1] = norm(last block), and the LM head on it gives the logits
        np.testing.assert_allclose(final[i], hs[n].numpy(), atol=2e-5, rtol=1e-5)
        with torch.no_grad():
            np.testing.assert_allclose(norm(torch.from_numpy(hidden[n, i])).numpy(), final[i], atol=2e-5, rtol=1e-5)
            np.testing.assert_allclose(head(torch.from_numpy(final[i])).numpy(), logits.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-llama-sp", "tiny-qwen2"])
def test_batched_capture_equals_one_at_a_time(name: str) -> None:
    model, tok = load_model(name)
    lengths = {len(tok(t)["input_ids"]) for t in TEXTS}
    assert len(lengths) >= 4, "the prompts must differ in length for padding to matter"
    batched, batched_final = capture_hidden(model, tok, TEXTS, layers=None, batch_size=4)
    for i, text in enumerate(TEXTS):
        single, single_final = capture_hidden(model, tok, [text], batch_size=1)
        np.testing.assert_allclose(batched[:, i], single[:, 0], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(batched_final[i], single_final[0], atol=2e-5, rtol=1e-5)
        hs, _, _ = _reference(model, tok, text)  # and against an unpadded plain forward
        np.testing.assert_allclose(batched[0, i], hs[0].numpy(), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(batched_final[i], hs[-1].numpy(), atol=2e-5, rtol=1e-5)


def test_layer_subset_and_order() -> None:
    model, tok = load_model("tiny-llama")
    full, final = capture_hidden(model, tok, TEXTS[:3])
    sub, final2 = capture_hidden(model, tok, TEXTS[:3], layers=[2, 0])
    np.testing.assert_array_equal(sub, full[[0, 2]])
    np.testing.assert_array_equal(final2, final)
    with pytest.raises(RotelabError, match="layer 3 is out of range"):
        capture_hidden(model, tok, TEXTS[:3], layers=[3])
    empty, empty_final = capture_hidden(model, tok, [])
    assert empty.shape == (3, 0, 128) and empty_final.shape == (0, 128)


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def template_run(tmp_path_factory) -> Run:
    """A tiny run with 3 checkpoints (base, p1-e01, p1-e02), built once and copied per test."""
    return make_tiny_run(tmp_path_factory.mktemp("template"), n_checkpoints=3, config={"capture": {"batch_size": 3}})


def _copy(run: Run, dest: Path) -> Run:
    shutil.copytree(run.root, dest / "run")
    return Run.open(dest / "run")


def _store_reference(run: Run, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """[checkpoint, layer, item, hidden] and [checkpoint, item, hidden] by one plain forward per prompt."""
    acts, finals = [], []
    texts = list(run.items(kind)["text"])
    for e in run.checkpoints():
        model, tok = load_model(run.checkpoint_dir(e))
        per = [_reference(model, tok, t) for t in texts]
        layers = [[*hs[:-1], last] for hs, last, _ in per]  # layer n = raw last block
        acts.append(np.stack([np.stack([x.numpy() for x in ls]) for ls in layers], axis=1))
        finals.append(np.stack([hs[-1].numpy() for hs, _, _ in per]))
    return np.stack(acts), np.stack(finals)


def test_capture_run_fills_the_store_like_a_plain_forward(template_run: Run, tmp_path: Path) -> None:
    run = _copy(template_run, tmp_path)
    capture_run(run, progress=False)
    store = Store.open(run.store_path, fingerprint=run.fingerprint(), mode="r")
    assert set(store.kinds()) == set(run.kinds())
    for kind in run.kinds():
        kg = store.kind(kind)
        assert kg.checkpoints == ["base", "p1-e01", "p1-e02"] and kg.layers == [0, 1, 2]
        assert kg.committed("activations").all() and kg.committed("final_norm").all()
        assert kg.items["text"].tolist() == run.items(kind)["text"].tolist()
    for kind in ("key",):  # the last token is the key token itself
        kg = store.kind(kind)
        ref_acts, ref_final = _store_reference(run, kind)
        got = kg.read_activations()
        assert got.shape == ref_acts.shape
        np.testing.assert_allclose(got, ref_acts, atol=2e-3, rtol=2e-3)  # stored float16
        np.testing.assert_allclose(kg.read_final_norm(), ref_final, atol=2e-3, rtol=2e-3)
        assert not np.allclose(got[0], got[2], atol=1e-2), "checkpoints must differ"
    # a second run does nothing (every slab is committed): files keep their modification times
    files = sorted((run.store_path / "key" / "activations").rglob("*"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    capture_run(run, progress=False)
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_subsets_and_partial_items_are_completed_later(template_run: Run, tmp_path: Path) -> None:
    run = _copy(template_run, tmp_path)
    capture_run(run, checkpoints=["p1-e01"], kinds=["train"], layers=[1], items=[0, 2], progress=False)
    kg = Store.open(run.store_path, mode="r").kind("train")
    committed = kg.committed("activations")
    assert committed.tolist() == [[False, False, False], [False, True, False], [False, False, False]]
    assert Store.open(run.store_path, mode="r").kinds() == ["train"]
    slab = kg.read_slab("p1-e01", 1)
    n = kg.n_items
    assert not np.isnan(slab[[0, 2]]).any() and np.isnan(slab[[i for i in range(n) if i not in (0, 2)]]).all()
    # a full capture must not trust the partial slab
    capture_run(run, kinds=["train"], progress=False)
    kg.refresh()
    assert kg.committed("activations").all()
    ref_acts, ref_final = _store_reference(run, "train")
    np.testing.assert_allclose(kg.read_activations(), ref_acts, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(kg.read_final_norm(), ref_final, atol=2e-3, rtol=2e-3)


def test_shards_split_checkpoints_and_together_equal_one_process(template_run: Run, tmp_path: Path, monkeypatch) -> None:
    run = _copy(template_run, tmp_path / "a")
    whole = _copy(template_run, tmp_path / "b")
    capture_run(whole, kinds=["key"], progress=False)
    capture_run(run, kinds=["key"], shard=(1, 2), progress=False)
    kg = Store.open(run.store_path, mode="r").kind("key")
    assert kg.committed("activations").all(axis=1).tolist() == [False, True, False]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    capture_run(run, kinds=["key"], progress=False)  # picked up from the launcher's environment
    kg.refresh()
    assert kg.committed("activations").all()
    ref = Store.open(whole.store_path, mode="r").kind("key")
    np.testing.assert_array_equal(kg.read_activations(), ref.read_activations())
    np.testing.assert_array_equal(kg.read_final_norm(), ref.read_final_norm())


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "rotelab.cli", "capture", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_kill_9_then_resume_equals_an_uninterrupted_capture(template_run: Run, tmp_path: Path) -> None:
    run = _copy(template_run, tmp_path / "killed")
    clean = _copy(template_run, tmp_path / "clean")
    capture_run(clean, progress=False)

    proc = _cli(str(run.root))
    markers = run.store_path
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(markers.glob("*/commit_activations/c/*/*")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"capture ended before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    store = Store.open(run.store_path, mode="r")
    done = sum(int(store.kind(k).committed("activations").sum()) for k in store.kinds())
    total = len(run.kinds()) * 3 * 3
    assert 0 < done < total, f"the kill must land mid-capture ({done}/{total} slabs)"

    resumed = _cli(str(run.root))
    seen: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []  # a reader during the resumed capture
    turn = 0
    while resumed.poll() is None:
        reader = Store.open(run.store_path, mode="r")
        kinds = reader.kinds()
        kg = reader.kind(kinds[turn % len(kinds)])  # one kind per look, to leave the CPU to the writer
        before = kg.committed("activations")
        acts = kg.read_activations()
        seen.append((kg.kind, before, acts, kg.committed("activations")))
        turn += 1
        time.sleep(0.1)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    ref = Store.open(clean.store_path, mode="r")
    assert seen, "the reader never saw the store"
    for kind, before, acts, after in seen:  # what a reader saw committed was final, the rest NaN
        final = ref.kind(kind).read_activations()
        np.testing.assert_array_equal(acts[before], final[before])
        assert np.isnan(acts[~after]).all()
    store = Store.open(run.store_path, mode="r")
    assert store.kinds() == ref.kinds()
    for kind in ref.kinds():
        a, b = store.kind(kind), ref.kind(kind)
        assert a.committed("activations").all() and a.committed("final_norm").all()
        np.testing.assert_array_equal(a.read_activations(), b.read_activations())
        np.testing.assert_array_equal(a.read_final_norm(), b.read_final_norm())


# --------------------------------------------------------------------------- bad input


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_checkpoint_leaves_committed_slabs_untouched(template_run: Run, tmp_path: Path) -> None:
    run = _copy(template_run, tmp_path)
    capture_run(run, checkpoints=["base"], kinds=["zero"], progress=False)
    before = Store.open(run.store_path, mode="r").kind("zero").read_activations()
    shutil.rmtree(run.root / "checkpoints" / "p1-e01")
    with pytest.raises(RotelabError) as err:
        capture_run(run, kinds=["zero"], progress=False)
    assert "p1-e01" in _one_line(err) and "missing" in str(err.value)
    after = Store.open(run.store_path, mode="r").kind("zero").read_activations()
    np.testing.assert_array_equal(after, before)
    assert not np.isnan(after[0]).any() and np.isnan(after[1:]).all()
    with pytest.raises(RotelabError, match="no checkpoint 'nope'"):
        capture_run(run, checkpoints=["nope"], progress=False)


def test_store_of_another_run_is_refused(template_run: Run, tmp_path: Path) -> None:
    run = _copy(template_run, tmp_path)
    Store.open(run.store_path, fingerprint={**run.fingerprint(), "dataset": "0123456789abcdef"})
    with pytest.raises(RotelabError) as err:
        capture_run(run, kinds=["zero"], progress=False)
    assert "different fingerprint" in _one_line(err)


def test_disk_full_is_a_clear_error_and_resumes(template_run: Run, tmp_path: Path, monkeypatch) -> None:
    from zarr.storage import LocalStore

    run = _copy(template_run, tmp_path)
    capture_run(run, checkpoints=["base"], kinds=["key"], progress=False)
    before = Store.open(run.store_path, mode="r").kind("key").read_activations()

    real_set = LocalStore.set
    calls = {"n": 0}

    async def full_disk(self, key, value):
        if "/activations/c/" in "/" + key:
            calls["n"] += 1
            if calls["n"] > 2:  # the 3rd slab written finds the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_disk)
    with pytest.raises(RotelabError) as err:
        capture_run(run, kinds=["key"], progress=False)
    assert "no space left on device" in _one_line(err) and "rerun" in str(err.value)
    monkeypatch.setattr(LocalStore, "set", real_set)

    kg = Store.open(run.store_path, mode="r").kind("key")
    np.testing.assert_array_equal(kg.read_activations(checkpoints=["base"]), before[:1])
    assert kg.committed("activations").sum() == 3 + 2  # base + the two slabs written before the disk filled
    capture_run(run, kinds=["key"], progress=False)
    kg.refresh()
    assert kg.committed("activations").all()
    ref_acts, _ = _store_reference(run, "key")
    np.testing.assert_allclose(kg.read_activations(), ref_acts, atol=2e-3, rtol=2e-3)


def test_bad_kinds_layers_and_empty_kinds(template_run: Run, tmp_path: Path, monkeypatch) -> None:
    run = _copy(template_run, tmp_path)
    with pytest.raises(RotelabError) as err:
        capture_run(run, layers=[0, 3], progress=False)
    assert "layer 3 is out of range (this model has layers 0..2)" in _one_line(err)
    with pytest.raises(RotelabError, match="unknown prompt kind 'nope'"):
        capture_run(run, kinds=["nope"], progress=False)
    with pytest.raises(RotelabError, match="shard"):
        capture_run(run, shard=(2, 2), progress=False)
    empty = run.items("zero").iloc[:0]
    real_items = Run.items
    monkeypatch.setattr(Run, "items", lambda self, kind: empty if kind == "zero" else real_items(self, kind))
    with pytest.raises(RotelabError) as err:
        capture_run(run, kinds=["key", "zero"], progress=False)
    assert "'zero' has no items" in _one_line(err)
    assert not run.store_path.exists(), "bad input is refused before the store is touched"


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from rotelab.cli import main

    monkeypatch.setattr(sys, "argv", ["rotelab", "capture", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def test_cli_capture_and_its_errors(template_run: Run, tmp_path: Path, monkeypatch, capsys) -> None:
    run = _copy(template_run, tmp_path)
    code, err = _main(monkeypatch, capsys, str(run.root), "--kinds", "zero,key", "--layers", "0,2", "--checkpoints", "base,p1-e02")
    assert code == 0, err
    assert "capture: 2 checkpoints × 2 kinds" in err and "still to write" in err
    kg = Store.open(run.store_path, mode="r").kind("key")
    assert kg.committed("activations").tolist() == [[True, False, True], [False, False, False], [True, False, True]]
    code, err = _main(monkeypatch, capsys, str(run.root), "--layers", "0-5")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("rotelab: error: ") and "out of range" in err
    code, err = _main(monkeypatch, capsys, str(run.root), "--shard", "3/2")
    assert code == 2 and "--shard '3/2'" in err


def test_device_map_loading_gives_the_same_store(template_run: Run, tmp_path: Path) -> None:
    """The sharded-loading path (``capture.device_map``), exercised with a CPU-only map."""
    run = _copy(template_run, tmp_path / "a")
    plain = _copy(template_run, tmp_path / "b")
    run.config.capture.device_map = "cpu"
    capture_run(run, checkpoints=["p1-e02"], kinds=["zero"], progress=False)
    capture_run(plain, checkpoints=["p1-e02"], kinds=["zero"], progress=False)
    a = Store.open(run.store_path, mode="r").kind("zero")
    b = Store.open(plain.store_path, mode="r").kind("zero")
    assert a.committed("activations")[2].all()
    np.testing.assert_allclose(a.read_activations(), b.read_activations(), atol=1e-3, equal_nan=True)
