"""Capture throughput and store size (issue 5).

1. Throughput on SmolLM2-135M (CPU, float32): ``capture_run`` (checkpoint load, prompt pass, float16
   zarr slabs + commit markers) versus a bare HF forward with ``output_hidden_states=True`` (also
   loading the checkpoint) over the same batches, in the same invocation. Target ≥ 0.8×.
2. Store size on disk per checkpoint for ``configs/smollm2-demo.yaml``: computed from its item
   counts (items × 31 layers × 576 × 2 bytes + the final norm), and checked against the bytes the
   captured kind really takes.

Usage: ``.venv/bin/python benchmarks/bench_capture.py [--kind train] [--items N] [--repeat 2]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _make_run(tmp: Path, kinds: list[str]):
    from rotelab.checkpoints import CheckpointEntry, write_index
    from rotelab.config import load_config
    from rotelab.models import add_key_tokens, load_model
    from rotelab.run import Run

    cfg = load_config(ROOT / "configs" / "smollm2-demo.yaml")
    cfg = cfg.model_copy(update={"capture": cfg.capture.model_copy(update={"kinds": kinds})})
    run = Run.create(cfg, tmp / "run")
    model, tok = load_model(cfg.model.name, "float32")
    add_key_tokens(model, tok, list(run.key_tokens().values()), cfg.model.key_token_init, cfg.seed)
    out = run.checkpoints_dir / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_index(run.index_path, [CheckpointEntry("base", "base", 0.0, 0, 0, None, "checkpoints/base")])
    return run


def _baseline(run, kind: str, batch_size: int) -> float:
    """Seconds for: load the checkpoint, HF forward with output_hidden_states on the same batches,
    and take the last token of every layer to the CPU (what capture keeps)."""
    from rotelab.batching import pad, pad_id
    from rotelab.probe.capture import load_checkpoint
    from rotelab.probe.prompt_pass import pass_batches
    from rotelab.tokenization import encode_prompt

    t0 = time.perf_counter()
    model, tok = load_checkpoint(run.checkpoint_dir("base"), "float32", "cpu")
    ids = [encode_prompt(tok, t) for t in run.items(kind)["text"]]
    keep = []
    with torch.no_grad():
        for rows_ in pass_batches(ids, batch_size).batches():  # the prompt pass's batches
            p = pad([ids[i] for i in rows_], pad_id(tok), "right")
            out = model(input_ids=p.input_ids, attention_mask=p.attention_mask, position_ids=p.position_ids, output_hidden_states=True)
            rows = torch.arange(len(rows_))
            keep.append(torch.stack([h[rows, p.last] for h in out.hidden_states]).numpy())
    return time.perf_counter() - t0


def _capture(run, kind: str) -> float:
    from rotelab.probe import capture_run

    shutil.rmtree(run.store_path, ignore_errors=True)
    t0 = time.perf_counter()
    capture_run(run, kinds=[kind], progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="train")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_capture."))
    try:
        run = _make_run(tmp, [args.kind])
        n = len(run.items(args.kind))
        bs = run.config.capture.batch_size
        print(f"SmolLM2-135M float32 CPU ({torch.get_num_threads()} threads), kind {args.kind!r}: {n} items, batch {bs}")
        _baseline(run, args.kind, bs)  # warm-up (page cache, kernels)
        base_t, cap_t = [], []
        for _ in range(args.repeat):  # interleaved, best of N
            base_t.append(_baseline(run, args.kind, bs))
            cap_t.append(_capture(run, args.kind))
        b, c = min(base_t), min(cap_t)
        print(f"bare HF forward (output_hidden_states=True): {n / b:7.1f} items/s  ({b:.2f} s incl. load)")
        print(f"capture_run (prompt pass + zarr writes):     {n / c:7.1f} items/s  ({c:.2f} s incl. load)")
        print(f"ratio capture / bare forward: {b / c:.2f}x   (target >= 0.8x)")

        # store size
        kind_bytes = _du(run.store_path / args.kind)
        layers = 31
        hidden = 576
        nominal = n * (layers + 1) * hidden * 2  # activations + final norm, float16
        print(f"store for kind {args.kind!r}, 1 checkpoint: {kind_bytes / 2**20:.2f} MiB on disk, nominal {nominal / 2**20:.2f} MiB")
        counts = {k: len(run.items(k)) for k in run.kinds()}
        total_items = sum(counts.values())
        per_ckpt = total_items * (layers + 1) * hidden * 2
        scale = kind_bytes / nominal
        print(
            f"demo config items per kind: {counts} (total {total_items});"
            f" per checkpoint ≈ {per_ckpt / 2**20:.1f} MiB nominal (items × 31 layers × 576 × 2 B + final norm),"
            f" ≈ {per_ckpt * scale / 2**20:.1f} MiB on disk at the measured ratio {scale:.3f}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
