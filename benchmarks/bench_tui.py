"""Browser latency: time from a layer/checkpoint key press to repainted panels.

Store: 25 checkpoints × 31 layers × 5,000 items (kind ``test``: 5 relations × 100 facts × 10
templates) with ``proj_pca`` [checkpoint, layer, item, 2], ΔCosSim, metrics and the alignment and
patching tables (no activations: the browser never reads them). The app runs headless
(``App.run_test``); a press counts as done when the scatter shows the new slab and every panel has
been re-rendered by the compositor (headless skips only the terminal write).

Baseline in the same invocation: the raw store read of the same slab (``KindGroup.read_derived``
of one [item, 2] slab, fresh handle, no cache) — the floor any browser pays per step.

    .venv/bin/python benchmarks/bench_tui.py [--presses 80] [--keep DIR]

Target: p95 ≤ 100 ms for cold slabs (each press lands on a slab not read before), on the machine as
it is and again while ``--competitors`` CPU-bound processes that the benchmark starts itself run
(so the loaded figure does not depend on who else is on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from textual import events
from textual.worker import WorkerCancelled

from rotelab.store import Store
from rotelab.tui import RotelabApp
from rotelab.tui.demo import DemoSpec, make_demo_run
from rotelab.tui.main_screen import MainScreen
from rotelab.tui.widgets import LayerBar, LinePlot, ScatterPlot, Timeline

SPEC = DemoSpec(
    relations=("author", "capital", "educated_at", "genre", "mother"),
    facts_per_relation=100,
    templates_per_kind=None,
    languages=("de",),
    phase1_epochs=20,
    phase2_epochs=4,
    k=20,
    layers=30,
    kinds=("test",),  # 10 templates per relation: 5,000 items (the train kind holds only the P trained ones)
    methods=("pca",),
    joint=False,
    cellwise=False,
)


def build(root: Path) -> float:
    t = time.perf_counter()
    make_demo_run(root, SPEC)
    return time.perf_counter() - t


def snake(n_ckpt: int, n_layer: int, start: tuple[int, int], presses: int) -> list[str]:
    """Keys that walk up/down the layers and step checkpoints at the ends: every press lands on a
    slab not visited before."""
    keys, (c, l), d = [], start, 1
    while len(keys) < presses:
        if 0 <= l + d < n_layer:
            keys.append("up" if d > 0 else "down")
            l += d
        else:
            if c - 1 < 0:
                break
            keys.append("left")
            c -= 1
            d = -d
    return keys


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


async def drive(root: Path, presses: int, prefetch: bool) -> tuple[list[float], list[float], list[float], list[tuple[str, int]]]:
    """(wall s per press on new slabs, wall s per press on cached slabs, process CPU s per press, slabs)."""
    MainScreen.PREFETCH = prefetch
    app = RotelabApp(root, export_dir=root / "figs")
    cold: list[float] = []
    warm: list[float] = []
    cpu: list[float] = []
    visited: list[tuple[str, int]] = []
    async with app.run_test(size=(160, 50)) as pilot:
        for _ in range(3):
            await app.workers.wait_for_complete()
            await pilot.pause()
        s = app.screen
        assert isinstance(s, MainScreen)
        panels = [s.query_one(ScatterPlot), s.query_one(Timeline), s.query_one(LayerBar), *s.query(LinePlot)]

        async def press(key: str, out: list[float]) -> None:
            before = [s.slab_request()]
            t0, c0 = time.perf_counter(), time.process_time()
            # the path a terminal key takes: driver -> app queue -> bindings (Pilot.press would
            # add its own idle waits to the measurement)
            ev = events.Key(key, None)
            ev.set_sender(app)
            app._driver.send_message(ev)
            while s.slab_request() == before[0]:
                await asyncio.sleep(0.0005)
            req = s.slab_request()
            want = (req.checkpoint, req.layer)
            sc = panels[0]
            while not (sc.view_key is not None and sc.view_key[:2] == want and all(p.painted_version == p.version for p in panels)):
                await asyncio.sleep(0.0005)
            out.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            visited.append(want)
            try:  # prefetch (if any) finishes before the next press
                await app.workers.wait_for_complete()
            except WorkerCancelled:  # a prefetch the next one replaced: done as well
                pass

        keys = snake(len(s.positions()), len(s.snap.layers), (s.ckpt, s.layer_index), presses)
        for k in keys:
            await press(k, cold)
        back = {"up": "down", "down": "up", "left": "right"}
        for k in reversed(keys[-20:]):  # revisit: slabs now in the cache
            await press(back[k], warm)
    return cold, warm, cpu[: len(cold)], visited


def raw_reads(root: Path, slabs: list[tuple[str, int]]) -> list[float]:
    out = []
    for c, layer in slabs:
        t0 = time.perf_counter()
        g = Store.open(root / "store.zarr", mode="r").kind("test")
        g.read_derived("proj_pca", checkpoints=[c], layers=[layer])
        out.append(time.perf_counter() - t0)
    return out


def fast_reads(root: Path, slabs: list[tuple[str, int]]) -> list[float]:
    from rotelab.tui.data import RunData

    data = RunData.open(root)
    data.load()
    data.projection("test", "proj_pca", slabs[-1][0], slabs[-1][1])  # warm-up
    out = []
    for c, layer in slabs:
        t0 = time.perf_counter()
        data._read_projection("test", "proj_pca", c, layer)
        out.append(time.perf_counter() - t0)
    return out


COMPETITOR = "import numpy as np\na = np.random.rand(512, 512)\nwhile True:\n    a = (a @ a) / 512.0\n"
"""A CPU-bound process: float matmuls forever (numpy's threads, as a competing job would use)."""


def start_competitors(n: int) -> list[subprocess.Popen]:
    """``n`` competing CPU-bound processes (killed by the caller)."""
    return [subprocess.Popen([sys.executable, "-c", COMPETITOR], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presses", type=int, default=80)
    ap.add_argument("--keep", type=Path, default=None, help="build/reuse the store here instead of a temp dir")
    ap.add_argument("--competitors", type=int, default=1,
                    help="CPU-bound processes started for the loaded pass (0: idle pass only)")
    args = ap.parse_args()
    tmp = None
    if args.keep is not None:
        root = args.keep
        built = 0.0 if (root / "store.zarr").is_dir() else build(root)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-tui-"))
        root = tmp / "bench"
        built = build(root)
    try:
        g = Store.open(root / "store.zarr", mode="r").kind("test")
        print(f"store: {len(g.checkpoints)} checkpoints × {len(g.layers)} layers × {g.n_items} items (built in {built:.1f} s)")
        cold, warm, cpu, visited = asyncio.run(drive(root, args.presses, prefetch=False))
        pre, _, cpu_pre, _ = asyncio.run(drive(root, args.presses, prefetch=True))
        raw = raw_reads(root, visited[: len(cold)])
        fast = fast_reads(root, visited[: len(cold)])

        def line(what: str, xs: list[float]) -> None:
            print(f"{what:<52} median {pct(xs, 50):6.1f} ms  p95 {pct(xs, 95):6.1f} ms  (n={len(xs)})")

        line("baseline: raw store read of the slab (read_derived)", raw)
        line("browser's slab read (RunData, open handle, no cache)", fast)
        line("key press → repainted, every slab new (no prefetch)", cold)
        line("  process CPU per press (app + workers)", cpu)
        line("key press → repainted, revisited (cached) slabs", warm)
        line("key press → repainted, with neighbour prefetch", pre)
        line("  process CPU per press (app + workers + prefetch)", cpu_pre)
        print(f"ratio p95 press (no prefetch) / p95 raw read: {pct(cold, 95) / pct(raw, 95):.2f}×")
        print(f"target p95 ≤ 100 ms: no prefetch {'met' if pct(cold, 95) <= 100 else 'NOT met'}, "
              f"with prefetch {'met' if pct(pre, 95) <= 100 else 'NOT met'}")
        try:
            print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        except OSError:
            pass
        if args.competitors:
            procs = start_competitors(args.competitors)
            try:
                time.sleep(2.0)  # let them reach full speed
                cold_l, _, cpu_l, _ = asyncio.run(drive(root, args.presses, prefetch=False))
                pre_l, _, _, _ = asyncio.run(drive(root, args.presses, prefetch=True))
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            print(f"with {args.competitors} competing CPU-bound process(es) (started by this benchmark):")
            line("key press → repainted, every slab new (no prefetch)", cold_l)
            line("  process CPU per press (app + workers)", cpu_l)
            line("key press → repainted, with neighbour prefetch", pre_l)
            print(f"loaded / idle p95 (no prefetch): {pct(cold_l, 95) / pct(cold, 95):.2f}×; target p95 ≤ 100 ms loaded: "
                  f"no prefetch {'met' if pct(cold_l, 95) <= 100 else 'NOT met'}, "
                  f"with prefetch {'met' if pct(pre_l, 95) <= 100 else 'NOT met'}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
