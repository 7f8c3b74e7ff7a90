"""Driver of tests/test_store_crash.py: kill -9 a store writer at its N-th file write, for every N.

``python tests/store_crash_driver.py WORKDIR`` prints one JSON line per kill point. For each
scenario (``create``: an empty store → two checkpoints written; ``grow``: that store → a third
checkpoint appended) and each N = 1, 2, …, a forked child runs the scenario and sends itself
SIGKILL right before zarr's N-th layout write (``zarr.storage._local._put``: every metadata and chunk
file goes through it; :func:`_create_step` says which count). Then a second forked child checks what a reader sees in the killed store
(every listed kind opens, every committed value is the expected one, every listed table reads
back exactly), runs the scenario again to completion and checks that everything reads back
exactly. The loop ends at the first N the scenario finishes without reaching.

The driver itself never touches zarr (every zarr call happens in a forked child, so no event-loop
thread is forked).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import numpy as np
import pandas as pd

CPS = ["base", "p1-e01", "p1-e02"]
LAYERS = [0, 1, 2]
N_ITEMS, HIDDEN = 5, 8
FP = {"model": "m", "dataset": "d", "config": "c"}
_rng = np.random.default_rng(0)
ACT = _rng.standard_normal((len(CPS), len(LAYERS), N_ITEMS, HIDDEN)).astype(np.float32)
PROB = _rng.random((len(CPS), N_ITEMS)).astype(np.float32)
TEXT = np.array([[f"gen {c} {i}" for i in range(N_ITEMS)] for c in range(len(CPS))])
PROJ = _rng.standard_normal((len(CPS), len(LAYERS), N_ITEMS, 2)).astype(np.float32)
ITEMS = pd.DataFrame(
    {
        "item": np.arange(N_ITEMS),
        "fact_id": [f"f{i}" for i in range(N_ITEMS)],
        "relation": ["capital"] * N_ITEMS,
        "template_id": np.arange(N_ITEMS) % 2,
        "text": [f"text {i}" for i in range(N_ITEMS)],
        "object": [f"obj {i}" for i in range(N_ITEMS)],
        "split": ["train", "heldout", "train", "heldout", "train"],
    }
)


def table(n: int) -> pd.DataFrame:
    return pd.DataFrame({"checkpoint": CPS[:n], "value": np.arange(n, dtype=np.float64) / 7})


def scenario(path: Path, n: int) -> None:
    """Everything a run writes into its store for the first ``n`` checkpoints."""
    from rotelab.store import Store

    st = Store.open(path, fingerprint=FP)
    kg = st.ensure_kind("key", checkpoints=CPS[:n], layers=LAYERS, items=ITEMS, hidden=HIDDEN)
    for ci in range(n):
        kg.write_item_arrays(CPS[ci], {"object_prob": PROB[ci], "gen_text": list(TEXT[ci])})
        for li, layer in enumerate(LAYERS):
            kg.write_slab(CPS[ci], layer, ACT[ci, li])
        kg.write_derived(
            "projection", ("checkpoint", "layer", "item", "component"), PROJ[ci],
            index={"checkpoint": CPS[ci]}, extra_coords={"component": ["pc1", "pc2"]},
        )
    dc = ACT[:n].mean(axis=(2, 3))
    kg.write_derived("delta_cossim", ("checkpoint", "layer"), dc)
    st.write_table("alignment", table(n))


def check(path: Path, complete_n: int | None) -> None:
    """What a reader sees: only complete kinds and tables, only expected values. With
    ``complete_n`` everything of the first ``complete_n`` checkpoints must be there."""
    from rotelab.store import Store

    if not (path / "zarr.json").is_file():
        assert complete_n is None, "no store after a finished scenario"
        return
    st = Store.open(path, fingerprint=FP, mode="r")
    kinds = st.kinds()
    if complete_n is not None:
        assert kinds == ["key"], kinds
    for kind in kinds:
        kg = st.kind(kind)
        cps = kg.checkpoints
        assert cps == CPS[: len(cps)], cps
        pd.testing.assert_frame_equal(kg.items, ITEMS, check_dtype=False)
        assert kg.layers == LAYERS
        names = set(kg.arrays())
        if complete_n is not None:
            assert cps == CPS[:complete_n], cps
            assert {"activations", "final_norm", "object_prob", "gen_text", "projection", "delta_cossim"} <= names, names
        nc = len(cps)
        if "activations" in names:
            got = kg.read_activations()
            want = ACT[:nc].astype(np.float16).astype(np.float32)
            ok = ~np.isnan(got)
            assert np.array_equal(got[ok], want[ok])
            if complete_n is not None:
                assert ok.all()
        for name, want in (("object_prob", PROB), ("gen_text", TEXT)):
            if name in names:
                got = kg.read_item_array(name)
                assert got.shape == (nc, N_ITEMS), (name, got.shape)
                for ci in range(nc):
                    committed = kg.is_committed(name, CPS[ci])
                    if committed:
                        assert np.array_equal(got[ci], want[ci]), (name, ci)
                    assert committed or complete_n is None, (name, ci)
        if "projection" in names:
            got = kg.read_derived("projection")
            assert list(kg.coord("component")) == ["pc1", "pc2"]
            ok = ~np.isnan(got)
            assert np.array_equal(got[ok], PROJ[:nc][ok])
            assert complete_n is None or ok.all()
        if "delta_cossim" in names:
            got = kg.read_derived("delta_cossim")
            ok = ~np.isnan(got)
            assert complete_n is None or ok.all()
            # whole-array writes: either the 2-checkpoint or the 3-checkpoint version (grow)
            assert ok.sum() == 0 or any(
                np.array_equal(got[ok], ACT[:k].mean(axis=(2, 3))[ok[:k]]) for k in (2, 3) if ok[k:].sum() == 0
            )
    for name in st.tables():
        got = st.read_table(name)
        assert any(got.equals(table(k)) for k in (2, 3)), got
    if complete_n is not None:
        assert st.read_table("alignment").equals(table(complete_n))


def _fork(fn) -> int:
    """Run ``fn()`` in a forked child; its wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001 - report anything to the parent
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


#: 1-D coordinate / item-table arrays: their one chunk is part of creating a group.
COORDS = {"layer", "item", "fact_id", "relation", "template_id", "text", "object", "split", "checkpoint", "component"}


def _create_step(path: str) -> bool:
    """Whether a file write is a step of creating or changing the store's layout: any metadata
    file, or the chunk of a coordinate. Data and marker chunks are left out (their crash safety is
    the commit-marker protocol, tested in test_store.py). zarr's exclusive puts of parent groups
    that exist are no-ops and not counted either."""
    return path.endswith("zarr.json") or Path(path.split("/c/")[0]).name in COORDS


def _killed_at(path: Path, n: int, k: int) -> None:
    import zarr.storage._local as local

    put = local._put
    count = [0]

    def counting_put(path, value, exclusive=False):
        if _create_step(str(path)) and not (exclusive and os.path.exists(path)):
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
        return put(path, value, exclusive=exclusive)

    local._put = counting_put
    scenario(path, n)


def main(work: Path) -> None:
    base = work / "base"
    assert os.WEXITSTATUS(_fork(lambda: scenario(base / "store.zarr", 2))) == 0
    for name, pre, n in (("create", None, 2), ("grow", base, 3)):
        for k in range(1, 400):
            d = work / f"{name}-{k}"
            if pre is not None:
                shutil.copytree(pre, d)
            else:
                d.mkdir()
            st = d / "store.zarr"
            status = _fork(lambda: _killed_at(st, n, k))
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            if not killed:
                print(json.dumps({"scenario": name, "k": k, "killed": False, "ok": os.WEXITSTATUS(status) == 0}), flush=True)
                shutil.rmtree(d)
                break

            def after() -> None:
                check(st, None)  # a reader of the killed store
                scenario(st, n)  # the same command again
                check(st, n)

            ok = os.WEXITSTATUS(_fork(after)) == 0
            print(json.dumps({"scenario": name, "k": k, "killed": True, "ok": ok}), flush=True)
            shutil.rmtree(d)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
