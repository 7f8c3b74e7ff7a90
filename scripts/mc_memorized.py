"""Multiple-choice accuracy with *memorized* distractors on a run evaluated with pool distractors.

    python scripts/mc_memorized.py RUN --checkpoints p1-e10,p2-e04 --kinds train,test,zero

The familiarity control of REPRODUCTION.md (issue 11, beyond the paper): the gold option is always
an object seen in phase 1, most pool distractors never were, so a model can pick the familiar name
without knowing the fact. Here the distractors are the objects of *other* facts of the same
relation (:func:`rotelab.facts.memorized_distractors`, exactly what ``data.distractors_from:
memorized`` gives a run), scored with the same MC rule and tokenization as ``rotelab eval``
(:func:`rotelab.probe.accuracy_metrics.plan_kind` / ``item_scores``) by the HF engine. No
retraining: the checkpoints are the run's own (training never reads the distractors).

Appends ``RUN/mc_memorized.csv`` (``checkpoint, kind, split, n, mc_correct, filled_from_pool``;
``split`` ∈ all, train, validation, test, heldout = validation ∪ test); (checkpoint, kind) pairs already there are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from rotelab.facts import memorized_distractors, split_mask, split_names
from rotelab.probe.accuracy_metrics import item_scores, plan_kind
from rotelab.probe.engines.hf import HFEngine
from rotelab.prompts import answer_options
from rotelab.run import Run

COLUMNS = ["checkpoint", "kind", "split", "n", "mc_correct", "filled_from_pool"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--checkpoints", required=True)
    ap.add_argument("--kinds", required=True)
    a = ap.parse_args()
    run = Run.open(a.run)
    out = Path(run.root) / "mc_memorized.csv"
    have = pd.read_csv(out) if out.is_file() else pd.DataFrame(columns=COLUMNS)
    done = set(zip(have["checkpoint"], have["kind"]))
    n = run.config.data.distractors
    facts, filled = memorized_distractors(run.facts, n, run.config.seed)
    from rotelab.models import load_tokenizer

    eng = HFEngine(dtype=run.config.model.dtype, batch_size=run.config.eval.batch_size)
    for c in a.checkpoints.split(","):
        todo = [k for k in a.kinds.split(",") if (c, k) not in done]
        if not todo:
            continue
        d = run.checkpoint_dir(c)
        tok = load_tokenizer(d)
        eng.load(d)
        rows = []
        for k in todo:
            items = run.items(k)
            plan = plan_kind(tok, k, list(items["text"]), list(items["object"]), answer_options(items, facts, k, n + 1))
            mc = item_scores(plan, eng.score(plan.requests))["mc_correct"]
            n_fill = sum(filled.get(f, 0) > 0 for f in items["fact_id"])
            for s in split_names(items["split"]):
                sel = mc[split_mask(items["split"], s)]
                if len(sel):
                    rows.append((c, k, s, len(sel), float(sel.mean()), n_fill))
        have = pd.concat([have, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True)
        have.to_csv(out, index=False)
        print(pd.DataFrame(rows, columns=COLUMNS).to_string(index=False))
    eng.close()


if __name__ == "__main__":
    main()
