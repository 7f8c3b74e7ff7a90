"""Two writers on one run, as real processes: a second ``rotelab train`` (or ``analyze``) on a run
being trained is refused with one line naming the holder; the lock of a killed holder is taken
over; two processes replacing one store table while a third reads it never break it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cli_helpers import cli_env, error_line, popen, rotelab
from rotelab.checkpoints import read_index

LONG = {
    "name": "long",
    "model": {"name": "tiny-llama"},
    "data": {"relations": ["capital"], "facts_per_relation": 4, "distractors": 5, "languages": ["de"]},
    # one step per epoch, a checkpoint every 3 steps: points are written while the test runs
    "phase1": {"epochs": 3000, "batch_size": 4, "save_every": 3},
    "phase2": {"enabled": False},
}


def _wait_training(proc: subprocess.Popen[str], run: Path, min_rows: int) -> None:
    log = run / "logs" / "train_loss.csv"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) > min_rows):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.1)


def _lock_pid(run: Path) -> int | None:
    try:
        return int(json.loads((run / ".rotelab.lock").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def test_second_writer_is_refused_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(LONG))
    run = tmp_path / "r"
    first = popen("train", "long.yaml", "--run", "r", "--no-progress", cwd=tmp_path)
    try:
        _wait_training(first, run, 3)
        for stage in ("train", "analyze"):
            line = error_line(rotelab(stage, run, "--no-progress", cwd=tmp_path))
            assert f"run {run} is being written by pid {first.pid} on host {socket.gethostname()} since " in line, line
            assert "(rotelab train)" in line, line
        assert first.poll() is None, "the first writer was disturbed"
        _wait_training(first, run, 8)
        os.kill(first.pid, signal.SIGKILL)  # leaves its lock file behind
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    rows_at_kill = len((run / "logs" / "train_loss.csv").read_text().splitlines())
    third = popen("train", run, "--no-progress", cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while _lock_pid(run) != third.pid:
            assert third.poll() is None, third.communicate()[1][-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        _wait_training(third, run, rows_at_kill + 2)  # it resumed and trains on
        third.send_signal(signal.SIGINT)
        third.communicate(timeout=120)
        assert third.returncode == 130
    finally:
        if third.poll() is None:
            third.kill()
    # one writer at a time: the index is the planned series in order, the loss log each step once
    ids = [e.id for e in read_index(run / "checkpoints" / "index.json")]
    # one step per epoch (4 facts, batch 4): the saved points are epochs 3, 6, 9, … in order, nothing interleaved
    assert ids[0] == "base", ids
    points = [re.fullmatch(r"p1-[es](\d+)", i) for i in ids[1:]]
    assert all(points) and [int(m.group(1)) for m in points] == [3 * i for i in range(1, len(ids))], ids
    steps = [int(r.split(",")[1]) for r in (run / "logs" / "train_loss.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, len(steps) + 1))


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, pandas as pd
    from rotelab.store import Store
    st = Store.open(sys.argv[1], fingerprint={"m": "1"})
    tag = int(sys.argv[2])
    for i in range(int(sys.argv[3])):
        n = 50 + (7 * i + tag) % 40
        st.write_table("alignment", pd.DataFrame({"writer": [tag] * n, "i": [i] * n, "x": np.arange(n) * 0.5}))
    """
)

READER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rotelab.store import Store
    st = Store.open(sys.argv[1], mode="r")
    stop, reads, bad = Path(sys.argv[2]), 0, 0
    while not stop.exists():
        df = st.read_table("alignment")  # raises if the table broke
        if df is not None:
            n = len(df)
            ok = n == 50 + (7 * int(df["i"][0]) + int(df["writer"][0])) % 40 and df["writer"].nunique() == 1
            bad += not ok
            reads += 1
    print(reads, bad)
    """
)


def test_concurrent_table_writers_and_a_reader_never_break_the_table(tmp_path: Path) -> None:
    from rotelab.store import Store

    store = tmp_path / "store.zarr"
    Store.open(store, fingerprint={"m": "1"})
    stop = tmp_path / "stop"
    env = cli_env()
    reader = subprocess.Popen([sys.executable, "-c", READER, str(store), str(stop)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(store), str(t), "25"], env=env,
                                stderr=subprocess.PIPE, text=True) for t in (1, 2)]
    try:
        for w in writers:
            _, err = w.communicate(timeout=300)
            assert w.returncode == 0, err[-3000:]
    finally:
        stop.touch()
        for w in writers:
            if w.poll() is None:
                w.kill()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err[-3000:]
    reads, bad = map(int, out.split())
    assert reads > 0 and bad == 0, (reads, bad)
    st = Store.open(store, mode="r")
    df = st.read_table("alignment")
    assert df is not None and df["i"].iloc[0] == 24  # the last write of one of the writers
    versions = [d for d in (store / "tables" / "alignment").iterdir() if d.is_dir()]
    assert len(versions) <= 2, versions


# ----------------------------------------------------------------------------- sharded eval and capture


def _store_arrays(run_dir: Path) -> dict[tuple[str, str], "object"]:
    """Every kind's activations, final_norm and per-item eval arrays, read through the store API,
    and each eval array's committed-checkpoint mask (``(kind, "<name>/committed")``)."""
    import numpy as np

    from rotelab.run import Run
    from rotelab.store import Store

    store = Store.open(Run.open(run_dir).store_path, mode="r")
    out = {}
    for kind in store.kinds():
        g = store.kind(kind)
        out[(kind, "activations")] = np.asarray(g.read_activations())
        out[(kind, "final_norm")] = np.asarray(g.read_final_norm())
        out[(kind, "checkpoint")] = np.asarray(list(g.checkpoints))
        for name in g.item_arrays():
            out[(kind, name)] = np.asarray(g.read_item_array(name))
            out[(kind, f"{name}/committed")] = np.asarray(g.committed(name))
    return out


def _assert_same_store(a: Path, b: Path) -> None:
    """Store ``a`` holds exactly ``b``'s arrays, every cell written: activations at every
    checkpoint, eval arrays at every checkpoint except the ICL kinds' (eval.icl_checkpoints
    default: base only, the paper's ICL baseline)."""
    import numpy as np

    from rotelab.prompts import is_icl_kind

    sa, sb = _store_arrays(a), _store_arrays(b)
    assert set(sa) == set(sb) and any(k[1] == "object_prob" for k in sa) and any(k[1] == "activations" for k in sa)
    for key, va in sa.items():
        vb = sb[key]
        assert va.shape == vb.shape, key
        if key[1].endswith("/committed"):
            continue
        written = np.ones(va.shape[0], dtype=bool)
        if key[1] not in ("activations", "final_norm", "checkpoint"):
            written = sa[(key[0], f"{key[1]}/committed")]
            ids = sa[(key[0], "checkpoint")].tolist()
            expected = [c == "base" for c in ids] if is_icl_kind(key[0]) else [True] * len(ids)
            assert written.tolist() == expected, (key, written)
            assert (sb[(key[0], f"{key[1]}/committed")] == written).all(), key
        if va.dtype.kind in "fc":
            assert np.isfinite(va[written]).all(), (key, "a cell was left unwritten")
            assert np.array_equal(va, vb, equal_nan=True), key
        else:
            assert (va[written] == vb[written]).all(), key


def _tiny_series(tmp_path: Path, names: list[str]) -> list[Path]:
    """Copies of one 4-checkpoint tiny run (fixtures_runs), no store yet."""
    import shutil

    from fixtures_runs import make_tiny_run

    src = make_tiny_run(tmp_path / "src", n_checkpoints=4).root
    out = []
    for n in names:
        shutil.copytree(src, tmp_path / n, symlinks=True)
        out.append(tmp_path / n)
    return out


@pytest.mark.slow  # several real rotelab processes (~20 s start each on 2 cores)
def test_sharded_eval_and_capture_started_together_equal_one_process(tmp_path: Path) -> None:
    """`--shard 0/2` and `--shard 1/2` started at the same moment on a fresh store (both create the
    layout), and the torchrun form (RANK/WORLD_SIZE), give exactly the unsharded run's arrays."""
    import shutil

    whole, pair, launched = _tiny_series(tmp_path, ["whole", "pair", "launched"])
    for stage in ("eval", "capture"):
        assert rotelab(stage, whole, "--no-progress").returncode == 0
        procs = [popen(stage, pair, "--shard", f"{i}/2", "--no-progress") for i in (0, 1)]
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun if torchrun.is_file() else shutil.which("torchrun")), "--nproc_per_node", "2", "-m", "rotelab.cli", stage, str(launched), "--no-progress"]
        out = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_store(pair, whole)
    _assert_same_store(launched, whole)


@pytest.mark.slow  # several real rotelab processes (~20 s start each on 2 cores)
def test_a_third_process_beside_shards_is_refused_at_once(tmp_path: Path) -> None:
    """While shard 0/2 of a run is held by a live process: the same shard again, a shard of another
    count, an unsharded capture and a whole-run writer (analyze) each fail at once with one line;
    the other shard runs; once the holder is gone everything works again."""
    (run,) = _tiny_series(tmp_path, ["run"])
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from rotelab.runlock import shard_lock
            with shard_lock({str(run)!r}, "rotelab capture --shard 0/2", 0, 2):
                print("held", flush=True)
                time.sleep(600)
        """)], env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert re.search(r"shard 0/2 is already being written by pid \d+", error_line(rotelab("capture", run, "--shard", "0/2", "--no-progress")))
        assert "another count" in error_line(rotelab("capture", run, "--shard", "1/3", "--no-progress"))
        for args in (("capture", run), ("eval", run), ("analyze", run)):
            line = error_line(rotelab(*args, "--no-progress"))
            assert f"run {run} is being written by shards pid {holder.pid}" in line, (args, line)
        ok = rotelab("capture", run, "--shard", "1/2", "--no-progress")
        assert ok.returncode == 0, ok.stderr[-3000:]
    finally:
        holder.kill()
        holder.wait()
    ok = rotelab("capture", run, "--no-progress")
    assert ok.returncode == 0, ok.stderr[-3000:]
