"""Benchmark of rotelab.store: slab write throughput and slab read latency.

Builds a store of C checkpoints x L layers x N items x H hidden (float16; default the paper-size
25 x 31 x 5,000 x 576 = 4.46 GB uncompressed) in a temp dir, then measures

* write throughput of ``KindGroup.write_slab`` (chunk + commit marker),
* latency of ``KindGroup.read_slab`` (marker check + one chunk, float32 out) over random slabs,
  median and p95, against the same-run baseline ``np.load`` of one slab saved as ``.npy``,
* ``committed("activations")`` (marker scan) and ``read_activations(layers=[l])`` (one layer,
  all checkpoints: what the TUI reads for a layer view),
* single-cell reads (``read_derived`` of one projection slab [item, 2] of a derived array with
  every cell committed, ``read_activations`` of one slab) on the fast path — only that cell's
  marker file is opened — against the same reads with the previous rule, a scan of every marker
  of the array (``--no-cells`` skips this part).

Usage: python benchmarks/bench_store.py [--checkpoints 25] [--layers 31] [--items 5000]
       [--hidden 576] [--write-checkpoints C] [--reads 200] [--dir DIR]
``--write-checkpoints`` writes only the first C checkpoints (all layers): every slab is one
chunk file of identical size, so read latency does not depend on how many others exist.
Reads hit the OS page cache (the files were just written), as do the np.load baseline reads.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rotelab.store import Store
from rotelab.store import cells as store_cells


def _items(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item": np.arange(n),
            "fact_id": [f"f{i // 10}" for i in range(n)],
            "relation": [f"r{i % 7}" for i in range(n)],
            "template_id": np.arange(n) % 10,
            "text": [f"The capital of Subject{i} is" for i in range(n)],
            "object": [f"Object{i % 97}" for i in range(n)],
            "split": np.where(np.arange(n) % 5 == 0, "heldout", "train"),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=int, default=25)
    ap.add_argument("--layers", type=int, default=31)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--write-checkpoints", type=int, default=None)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--dir", type=str, default=None)
    ap.add_argument("--no-cells", action="store_true", help="skip the single-cell fast-path comparison")
    a = ap.parse_args()
    wc = a.write_checkpoints or a.checkpoints
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_", dir=a.dir))
    try:
        cps = [f"ckpt{i:03d}" for i in range(a.checkpoints)]
        st = Store.open(tmp / "store.zarr", fingerprint={"model": "bench"})
        t0 = time.perf_counter()
        kg = st.ensure_kind("key", checkpoints=cps, layers=range(a.layers), items=_items(a.items), hidden=a.hidden)
        t_create = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        # activation-like data: mostly small values, a few large dims
        base = (rng.standard_normal((a.items, a.hidden)) * 0.5).astype(np.float32)
        slab_bytes = a.items * a.hidden * 2
        t0 = time.perf_counter()
        for ci in range(wc):
            for li in range(a.layers):
                kg.write_slab(cps[ci], li, base + np.float32(ci * 0.01 + li * 0.001))
        t_write = time.perf_counter() - t0
        n_slabs = wc * a.layers
        print(
            f"store: {a.checkpoints} checkpoints x {a.layers} layers x {a.items} items x {a.hidden} hidden float16; "
            f"written {wc} x {a.layers} = {n_slabs} slabs ({n_slabs * slab_bytes / 1e9:.2f} GB), "
            f"slab = {slab_bytes / 1e6:.2f} MB, no compression"
        )
        print(f"ensure_kind (create group, coordinates, item table): {t_create * 1e3:.1f} ms")
        print(
            f"write_slab: {t_write / n_slabs * 1e3:.1f} ms/slab, "
            f"{n_slabs * slab_bytes / t_write / 1e6:.0f} MB/s ({n_slabs} slabs in {t_write:.1f} s)"
        )

        # slab reads over random slabs
        r = Store.open(st.path, mode="r").kind("key")
        picks = [(int(rng.integers(wc)), int(rng.integers(a.layers))) for _ in range(a.reads)]
        r.read_slab(cps[0], 0)  # warm-up
        lat = []
        for ci, li in picks:
            t0 = time.perf_counter()
            x = r.read_slab(cps[ci], li)
            lat.append(time.perf_counter() - t0)
        assert x.shape == (a.items, a.hidden) and x.dtype == np.float32
        npy = tmp / "slab.npy"
        np.save(npy, (base).astype(np.float16))
        np.load(npy)
        lat_np = []
        for _ in range(a.reads):
            t0 = time.perf_counter()
            y = np.load(npy)
            lat_np.append(time.perf_counter() - t0)
        lat_np32 = []
        for _ in range(a.reads):
            t0 = time.perf_counter()
            y = np.load(npy).astype(np.float32)
            lat_np32.append(time.perf_counter() - t0)
        med, p95 = np.median(lat) * 1e3, np.percentile(lat, 95) * 1e3
        med_np, p95_np = np.median(lat_np) * 1e3, np.percentile(lat_np, 95) * 1e3
        med_np32 = np.median(lat_np32) * 1e3
        print(f"read_slab (float32 out), {a.reads} random slabs: median {med:.2f} ms, p95 {p95:.2f} ms")
        print(f"baseline np.load of one .npy slab (float16): median {med_np:.2f} ms, p95 {p95_np:.2f} ms")
        print(f"baseline np.load + astype(float32): median {med_np32:.2f} ms")
        print(f"ratio read_slab / np.load: {med / med_np:.1f}x ; vs np.load+astype(float32): {med / med_np32:.1f}x")

        t0 = time.perf_counter()
        for _ in range(20):
            m = r.committed("activations")
        print(f"committed('activations') marker scan ({m.size} cells): {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms")
        t0 = time.perf_counter()
        la = r.read_activations(layers=[a.layers // 2])
        t_layer = time.perf_counter() - t0
        print(
            f"read_activations(layers=[{a.layers // 2}]) -> {la.shape} float32 "
            f"({wc} committed slabs): {t_layer * 1e3:.0f} ms"
        )
        item_sel = list(range(0, a.items, 50))
        t0 = time.perf_counter()
        r.read_activations(items=item_sel)
        print(
            f"read_activations(items=every 50th -> {len(item_sel)} items, all checkpoints and layers): "
            f"{(time.perf_counter() - t0) * 1e3:.0f} ms"
        )
        if not a.no_cells:
            _single_cell_reads(st, cps[:wc], a.layers, a.items, a.reads, rng)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _scan_all(marker_dir: Path, shape: tuple[int, ...], cell_pos: list[np.ndarray]) -> np.ndarray:
    """The rule before the fast path: scan every marker of the array, then pick the cells."""
    full = store_cells.scan_markers(marker_dir, shape)
    return full[np.ix_(*[np.asarray(p) for p in cell_pos])] if cell_pos else full


def _single_cell_reads(st: Store, cps: list[str], n_layers: int, n_items: int, reads: int, rng: np.random.Generator) -> None:
    kg = st.kind("key")
    xy = rng.standard_normal((n_items, 2)).astype(np.float32)
    t0 = time.perf_counter()
    for c in cps:
        for v in range(n_layers):
            kg.write_derived("proj_pca", ("checkpoint", "layer", "item", "component"), xy, index={"checkpoint": c, "layer": v},
                             extra_coords={"component": [0, 1]})
    t_write = time.perf_counter() - t0
    print(f"write_derived of {len(cps) * n_layers} projection cells [item, 2]: {t_write / (len(cps) * n_layers) * 1e3:.1f} ms/cell")
    r = Store.open(st.path, mode="r").kind("key")
    fast_rule = store_cells.committed_cells
    picks = [(cps[int(rng.integers(len(cps)))], int(rng.integers(n_layers))) for _ in range(reads)]
    for what, read in (
        ("read_derived (one projection slab)", lambda c, v: r.read_derived("proj_pca", checkpoints=[c], layers=[v])),
        ("read_activations (one slab)", lambda c, v: r.read_activations(checkpoints=[c], layers=[v])),
    ):
        read(*picks[0])  # warm-up
        lat = {"scan": [], "fast": []}
        for c, v in picks:  # interleaved, so load changes hit both alike
            for rule in ("scan", "fast"):
                store_cells.committed_cells = _scan_all if rule == "scan" else fast_rule  # type: ignore[assignment]
                try:
                    t0 = time.perf_counter()
                    out = read(c, v)
                    lat[rule].append(time.perf_counter() - t0)
                finally:
                    store_cells.committed_cells = fast_rule  # type: ignore[assignment]
                assert np.isfinite(out).all()
        med = {k: float(np.median(x)) * 1e3 for k, x in lat.items()}
        p95 = {k: float(np.percentile(x, 95)) * 1e3 for k, x in lat.items()}
        print(
            f"{what}, {reads} random cells: before (scan all markers) median {med['scan']:.2f} ms, p95 {p95['scan']:.2f} ms; "
            f"after (this cell's marker) median {med['fast']:.2f} ms, p95 {p95['fast']:.2f} ms; "
            f"ratio before/after {med['scan'] / med['fast']:.1f}x"
        )


if __name__ == "__main__":
    main()
