"""Fused probe pass vs separate eval + capture on the demo's checkpoints, in one invocation.

Both sides run the real stages on a scratch run that links the demo run's checkpoint folders
(default ``runs/smollm2-demo``; a subset of checkpoints and kinds keeps it under ~10 minutes on
2 cores) with the HF engine:

* **separate** — ``evaluate_run`` then ``capture_run`` (each runs the prompt pass over the kind's
  prompts: eval's with scoring and generation, capture's for the states);
* **fused** — ``evaluate_run(capture=True)`` then ``capture_run`` (what ``rotelab run`` does: one
  prompt pass yields the states, the scores and the generations; capture finds nothing to do).

Printed: wall seconds of each side (stage calls only, store writes included), the decoder
positions each ran — counted in the prompt pass: prompt tokens ``P``, trie inner nodes ``I``,
generation steps ``G`` — and the ratios. For reference, the scheme before the prompt pass (trie
scoring of packed ``prompt ‖ inner nodes`` rows, ``model.generate`` re-running the prompt, capture
running it a third time) ran ``3P + I + G`` positions; separate now runs ``2P + I + G``, fused
``P + I + G``. The two stores are compared bit for bit (``compare_stores``, ``probe_pass`` attrs
ignored).

    .venv/bin/python benchmarks/bench_fused_probe.py [--demo runs/smollm2-demo] [--checkpoints base,p2-e04] [--kinds key,test,icl]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def _scratch_run(demo: Path, dest: Path, checkpoints: list[str]) -> Path:
    """A run folder at ``dest`` with the demo's config and data and links to ``checkpoints``."""
    dest.mkdir(parents=True)
    shutil.copy(demo / "config.yaml", dest / "config.yaml")
    shutil.copytree(demo / "data", dest / "data")
    (dest / "checkpoints").mkdir()
    index = json.loads((demo / "checkpoints" / "index.json").read_text())
    keep = [e for e in index["checkpoints"] if e["id"] in checkpoints]
    missing = set(checkpoints) - {e["id"] for e in keep}
    if missing:
        raise SystemExit(f"bench_fused_probe: {demo}: no checkpoint(s) {sorted(missing)}")
    for e in keep:
        (dest / e["path"]).symlink_to((demo / e["path"]).resolve(), target_is_directory=True)
    (dest / "checkpoints" / "index.json").write_text(json.dumps({**index, "checkpoints": keep}))
    return dest


class _Counter:
    """Wraps ``prompt_pass`` where the HF engine and capture call it; sums what each pass ran."""

    def __init__(self) -> None:
        from rotelab.probe import capture, prompt_pass
        from rotelab.probe.engines import hf

        self.orig = prompt_pass.prompt_pass
        self.mods = (hf, capture)
        self.prompt = self.inner = self.gen = 0
        for m in self.mods:
            m.prompt_pass = self._wrap

    def _wrap(self, model, prompts, **kw):
        from rotelab.probe.mc_trie import build_trie

        out = self.orig(model, prompts, **kw)
        p = sum(len(x) for x in prompts)
        i = sum(len(build_trie(o).inner) for o in (kw.get("options") or []) if o)
        self.prompt += p
        self.inner += i
        self.gen += out.forward_tokens - p - i
        return out

    def total(self) -> int:
        return self.prompt + self.inner + self.gen

    def reset(self) -> None:
        self.prompt = self.inner = self.gen = 0

    def close(self) -> None:
        for m in self.mods:
            m.prompt_pass = self.orig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", default=str(ROOT / "runs" / "smollm2-demo"))
    ap.add_argument("--checkpoints", default="base,p2-e04")
    ap.add_argument("--kinds", default="key,test,icl")
    args = ap.parse_args()
    import torch

    from compare_stores import compare
    from rotelab.probe import capture_run, evaluate_run
    from rotelab.run import Run

    demo = Path(args.demo)
    ckpts = args.checkpoints.split(",")
    kinds = args.kinds.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench_fused."))
    counter = _Counter()
    try:
        runs = {name: Run.open(_scratch_run(demo, tmp / name, ckpts)) for name in ("separate", "fused")}
        cfg = runs["fused"].config
        n_items = {k: len(runs["fused"].items(k)) for k in kinds}
        print(
            f"{cfg.model.name} {cfg.model.dtype}, {torch.get_num_threads()} threads; checkpoints {ckpts}; kinds {n_items}; "
            f"{cfg.data.distractors} distractors; capture.batch_size {cfg.capture.batch_size} (the prompt pass); "
            f"max_new_tokens {cfg.eval.max_new_tokens}"
        )
        rows = {}
        for name in ("separate", "fused"):
            run = runs[name]
            counter.reset()
            t0 = time.perf_counter()
            evaluate_run(run, engine="hf", kinds=kinds, progress=False, capture=name == "fused")
            t_eval = time.perf_counter() - t0
            capture_run(run, kinds=kinds, progress=False)
            t_all = time.perf_counter() - t0
            rows[name] = (t_eval, t_all - t_eval, t_all, counter.prompt, counter.inner, counter.gen, counter.total())
            print(
                f"{name:9s}: eval {t_eval:7.1f} s + capture {t_all - t_eval:6.1f} s = {t_all:7.1f} s;"
                f" positions P {counter.prompt} + I {counter.inner} + G {counter.gen} = {counter.total()}"
            )
        s, f = rows["separate"], rows["fused"]
        before = 3 * f[3] + f[4] + f[5]
        print(
            f"fused / separate: time {f[2] / s[2]:.3f} (separate is {s[2] / f[2]:.2f}x the fused time), positions"
            f" {f[6] / s[6]:.3f}; the scheme before the prompt pass ran 3P + I + G = {before} positions (fused {f[6] / before:.3f} of it)"
        )
        diffs, n_arrays, n_tables = compare(runs["separate"].store_path, runs["fused"].store_path, ["probe_pass"])
        print(f"stores: {'IDENTICAL' if not diffs else 'DIFFERENT'} ({n_arrays} arrays, {n_tables} tables compared bit for bit)")
        for d in diffs[:10]:
            print("  ", d)
    finally:
        counter.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
