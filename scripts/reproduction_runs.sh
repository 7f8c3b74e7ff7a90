#!/usr/bin/env bash
# The runs behind REPRODUCTION.md, one seed per call:  scripts/reproduction_runs.sh SEED
#   1. train runs/repro-smollm2-seed=SEED (configs/repro-smollm2.yaml: base, phase 1, phase 2, SFT);
#   2. evaluate the stage checkpoints with the HF engine (ICL is a base-model baseline);
#   3. the familiarity control: MC accuracy with memorized distractors (scripts/mc_memorized.py);
#   4. seed 0 only: capture + analyze the stage checkpoints (ΔCosSim / alignment rows).
# Wall times go to runs/repro-times.log. One torch thread per process (2-core machine).
# The tables: `rotelab report runs/repro-smollm2-seed=0` (all seeds found; reports/repro-smollm2/).
set -euo pipefail
SEED=${1:?seed}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-.venv/bin/python}
RL=${RL:-.venv/bin/rotelab}
RUN=runs/repro-smollm2-seed=$SEED
log() { echo "$(date -u +%FT%TZ) seed=$SEED $*" >> runs/repro-times.log; }
mkdir -p runs
t() { local s=$SECONDS; "$@"; log "$(( SECONDS - s ))s: $*"; }

$PY - "$SEED" <<'PY'
import sys
from rotelab.config import load_config, expand_sweep
from rotelab.run import Run
seed = int(sys.argv[1])
cfg = next(c for c in expand_sweep(load_config("configs/repro-smollm2.yaml")) if c.seed == seed)
Run.create(cfg, f"runs/repro-smollm2-seed={seed}")
PY
t $RL train "$RUN" --no-progress
EV="$RL eval $RUN --engine hf --no-progress"
t $EV --checkpoints base --kinds icl,icl-translated-de,icl-translated-zh
t $EV --checkpoints sft-e04,p2-e04 --kinds test
t $EV --checkpoints sft-e04,p2-e04 --kinds translated-de,translated-zh,train
t $EV --checkpoints p1-e10 --kinds key,train,test
t $PY scripts/mc_memorized.py "$RUN" --checkpoints p1-e10,p2-e04,sft-e04 --kinds test,zero
t $EV --checkpoints p1-e10,p2-e04,sft-e04 --kinds unrelated,zero
t $EV --checkpoints p2-e04 --kinds key

if [ "$SEED" = 0 ]; then
  t $RL capture "$RUN" --checkpoints base,p1-e10,p2-e04,sft-e04 --no-progress
  t $RL analyze "$RUN" --no-progress
fi
t $RL report "$RUN"   # the tables so far, over every seed present: reports/repro-smollm2/
log "done"
