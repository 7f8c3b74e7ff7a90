"""Check a run's stored accuracy results against a plain transformers forward of one checkpoint.

    .venv/bin/python scripts/check_eval_against_transformers.py runs/smollm2-demo [--checkpoint ID] [--kinds key,test]

For every item of the chosen kinds (default: every kind evaluated at that checkpoint) it recomputes,
with the checkpoint loaded by plain ``transformers`` (float32, CPU, one unpadded sequence at a
time, none of rotelab's engine code), the object's log-probability after the prompt and the greedy
continuation (``model.generate``, ``eval.max_new_tokens`` tokens, cut at the first stop token as
the eval stage defines it), and compares them with ``object_logprob`` and ``gen_text`` in the
store. Prints one line per kind (max |Δ logprob|, generations equal) and the provenance the
results carry; exits 1 if any log-probability differs by more than ``--tol`` (default 1e-4 per
answer token) or any generated text differs.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from rotelab.models import load_model
    from rotelab.probe.accuracy_metrics import finish_generation, stop_token_ids
    from rotelab.probe.eval_units import unit_provenance
    from rotelab.run import Run
    from rotelab.store import Store
    from rotelab.tokenization import encode

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--checkpoint", help="checkpoint id (default: the last of the series)")
    ap.add_argument("--kinds", help="comma-separated kinds (default: every kind evaluated there)")
    ap.add_argument("--tol", type=float, default=1e-4, help="allowed |Δ logprob| per answer token")
    args = ap.parse_args(argv)

    run = Run.open(args.run)
    ckpt = args.checkpoint or run.checkpoints()[-1].id
    store = Store.open(run.store_path, mode="r")
    kinds = args.kinds.split(",") if args.kinds else [k for k in store.kinds() if "gen_text" in store.kind(k).item_arrays()]
    model, tok = load_model(str(run.checkpoint_dir(ckpt)), "float32")
    stops = set(stop_token_ids(tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ok = True
    torch.set_grad_enabled(False)
    for kind in kinds:
        kg = store.kind(kind)
        if not kg.is_committed("gen_text", ckpt):
            print(f"{kind}: not evaluated at {ckpt}")
            continue
        items = run.items(kind)
        lp = kg.read_item_array("object_logprob", checkpoints=[ckpt])[0]
        texts = kg.read_item_array("gen_text", checkpoints=[ckpt])[0]
        worst, same = 0.0, 0
        for i, (text, obj) in enumerate(zip(items["text"], items["object"])):
            enc = encode(tok, text, obj)
            ids = torch.tensor([list(enc.input_ids)])
            logits = model(ids).logits[0].double()
            lps = torch.log_softmax(logits, -1)
            ref = sum(float(lps[j - 1, enc.input_ids[j]]) for j in range(enc.answer_start, len(enc.input_ids)))
            n_ans = len(enc.input_ids) - enc.answer_start
            worst = max(worst, abs(float(lp[i]) - ref) / n_ans)
            prompt = ids[:, : enc.answer_start]
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=run.config.eval.max_new_tokens,
                do_sample=False, eos_token_id=sorted(stops), pad_token_id=pad,
            )[0, enc.answer_start :].tolist()
            same += int(finish_generation(tok, out, stops) == texts[i])
        prov = unit_provenance(kg, ckpt) or {}
        good = worst <= args.tol and same == len(items)
        ok &= good
        print(
            f"{kind}: {len(items)} items, max |Δ logprob| per token {worst:.2e}, generations equal {same}/{len(items)} "
            f"[{prov.get('engine')}; eval code {prov.get('eval_code_version', 1)}; vLLM weights {prov.get('vllm_weights', '-')}] "
            f"{'ok' if good else 'MISMATCH'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
