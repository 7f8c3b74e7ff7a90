#!/usr/bin/env bash
# GPU smoke test (issue 15). NEVER RUN YET: written on a machine without a GPU.
#
# On one CUDA machine with the project's venv (`pip install -e .[gpu]` with a CUDA torch):
#   1. builds a random-init model of the Qwen2 architecture, ~0.47B parameters, from a config
#      (no model hub: the tokenizer is rotelab's shipped byte-level one);
#   2. trains phase 1 + phase 2 in bfloat16 with ZeRO-2 and with ZeRO-3 (train/ds_zero{2,3}_bf16.json)
#      through the DeepSpeed launcher on every visible GPU;
#   3. evaluates (HF engine, CUDA) and captures (nnsight, CUDA) the ZeRO-2 run;
#   4. prints each step's wall time (record them in BENCHMARKS.md) and the weight difference of the
#      two ZeRO stages' final checkpoints.
#
# Usage: scripts/gpu_smoke.sh [OUT_DIR]   (default /tmp/rotelab-gpu-smoke; NGPU=n to limit GPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/rotelab-gpu-smoke}
PY=${PY:-.venv/bin/python}
NGPU=${NGPU:-$($PY -c "import torch; print(torch.cuda.device_count())")}
if [ "$NGPU" -lt 1 ]; then echo "gpu_smoke: no CUDA device visible" >&2; exit 1; fi
mkdir -p "$OUT"
export OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

t() { local s=$SECONDS; "$@"; echo "gpu_smoke: $(( SECONDS - s ))s: $*" | tee -a "$OUT/times.txt"; }

# 1. the model: Qwen2 layout, hidden 1024, 24 layers, 16 heads (2 KV heads), MLP 5632
$PY - "$OUT/qwen2-0.5b" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rotelab.models import tiny_tokenizer

out = Path(sys.argv[1])
if not (out / "config.json").is_file():
    tok = tiny_tokenizer("bytelevel")
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=1024, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                      use_sliding_window=False, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    print(f"gpu_smoke: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters")
    model.save_pretrained(out)
    tok.save_pretrained(out)
EOF

# 2. one config per ZeRO stage (phase 1 + phase 2, bf16)
for z in 2 3; do
  cat > "$OUT/zero$z.yaml" <<EOF
name: gpu-smoke-zero$z
seed: 0
model: {name: $OUT/qwen2-0.5b, dtype: bfloat16}
data: {relations: [capital, author, mother], facts_per_relation: 16, distractors: 9, languages: [de], templates_per_kind: 1}
train: {deepspeed: train/ds_zero${z}_bf16.json}
phase1: {epochs: 4, lr: 1.0e-4, batch_size: 16}
phase2: {k: 8, prompts: 1, epochs: 2, lr: 2.0e-5, batch_size: 8}
eval: {engine: hf, max_new_tokens: 6}
capture: {device: auto, batch_size: 32}
EOF
  t .venv/bin/deepspeed --num_gpus "$NGPU" --no_local_rank --module rotelab.cli train "$OUT/zero$z.yaml" --run-dir "$OUT/zero$z" --no-progress
done

# 3. eval (HF engine) and capture (nnsight) on CUDA
t .venv/bin/rotelab eval "$OUT/zero2" --engine hf --no-progress
t .venv/bin/rotelab capture "$OUT/zero2" --no-progress

# 4. ZeRO-2 vs ZeRO-3 final weights (bf16: expect agreement to ~1e-2, not bit-equality)
$PY - "$OUT" <<'EOF'
import sys
from pathlib import Path

from safetensors.torch import load_file

from rotelab.checkpoints import read_index

out = Path(sys.argv[1])
for a, b in zip(read_index(out / "zero2/checkpoints/index.json"), read_index(out / "zero3/checkpoints/index.json")):
    assert a.id == b.id, (a.id, b.id)
last = a.id
wa = load_file(str(out / "zero2/checkpoints" / last / "model.safetensors"))
wb = load_file(str(out / "zero3/checkpoints" / last / "model.safetensors"))
print(f"gpu_smoke: {last}: max |zero2 - zero3| = {max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa):.3e}")
EOF
cat "$OUT/times.txt"
