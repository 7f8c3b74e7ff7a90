"""Does phase 1 really memorize? Trains the demo config (embedded SmolLM2-135M, float32, CPU) with
the real trainer and checks greedy retrieval on the key-token prompts with plain HF ``generate``,
against the base checkpoint in the same invocation; then times phase 2.

    .venv/bin/python benchmarks/bench_train_memorization.py [--config configs/smollm2-demo.yaml] [--run DIR] [--threads 1]

A fact counts as retrieved when the greedy continuation of ``"{subject} <R_rel>"`` starts with the
object (case-sensitive, after stripping the leading space). Target: ≥ 95% after phase 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def greedy_accuracy(model_dir: Path, items, batch: int = 40, max_new_tokens: int = 10) -> float:
    from rotelab.models import load_model
    from rotelab.tokenization import encode_prompt

    model, tok = load_model(model_dir)
    ok = 0
    rows = list(items.itertuples())
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            ids = [encode_prompt(tok, r.text) for r in chunk]
            n = max(map(len, ids))
            inp = torch.tensor([[tok.pad_token_id] * (n - len(x)) + x for x in ids])
            att = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids])
            out = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            for r, row in zip(chunk, out[:, n:]):
                ok += tok.decode(row, skip_special_tokens=True).strip().startswith(r.object)
    return ok / len(rows)


def main() -> None:
    from rotelab.config import load_config
    from rotelab.run import Run
    from rotelab.train import ensure_base_checkpoint, train_phase1, train_phase2

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" / "smollm2-demo.yaml"))
    ap.add_argument("--run", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--last", type=int, default=4, help="check the last N phase-1 points")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="rotelab-memo-"))
    run = Run.create(load_config(args.config), root)
    c = run.config
    items = run.items("key")
    print(f"{c.model.name} {c.model.dtype}: {len(run.config.data.relations)} relations x {c.data.facts_per_relation} facts = {len(items)} key prompts; "
          f"phase 1: {c.phase1.epochs} epochs, lr {c.phase1.lr:g}, batch {c.phase1.batch_size}, {torch.get_num_threads()} thread(s)")
    ensure_base_checkpoint(run)
    t = time.perf_counter()
    p1 = train_phase1(run, progress=True)
    t1 = time.perf_counter() - t
    steps = p1[-1].step if p1 else 0
    print(f"phase 1: {t1:.0f} s ({steps} steps, {t1 / max(1, steps):.2f} s/step, final epoch loss {p1[-1].loss:.3f})")
    base_acc = greedy_accuracy(run.checkpoint_dir("base"), items)
    print(f"  base       greedy key-prompt retrieval {base_acc:6.1%}")
    for e in p1[-args.last :]:
        if e.path is None:
            continue
        acc = greedy_accuracy(run.checkpoint_dir(e), items)
        print(f"  {e.id:10s} greedy key-prompt retrieval {acc:6.1%}   (vs base: +{acc - base_acc:.1%})")
    if c.phase2.enabled:
        t = time.perf_counter()
        p2 = train_phase2(run, progress=True)
        t2 = time.perf_counter() - t
        print(f"phase 2: {t2:.0f} s ({p2[-1].step} steps); phase 1 + phase 2 training: {t1 + t2:.0f} s")
    print(f"run directory: {root}")


if __name__ == "__main__":
    main()
