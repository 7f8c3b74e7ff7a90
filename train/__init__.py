"""rotelab.train — the two-phase trainer on DeepSpeed with a dense, resumable checkpoint series.

``train_run(run)`` does everything the train stage still misses: the base checkpoint (the model
with the key tokens added), phase 1 (rote memorization), phase 2 (generalization) and the SFT
baseline, each saved point appended to ``checkpoints/index.json`` only once complete. A killed
run resumes from its last listed point with the same data order, optimizer and schedule.

CPU: one process (gloo). GPUs: ``deepspeed --num_gpus N --no_local_rank --module rotelab.cli train CONFIG|RUN``
(see :mod:`rotelab.train.engine`).
"""

from rotelab.train.pipeline import (
    ensure_base_checkpoint,
    import_phase1,
    phase1_key,
    phase2_start_id,
    train_phase1,
    train_phase2,
    train_run,
    train_sft_baseline,
    validate,
)

__all__ = [
    "ensure_base_checkpoint",
    "import_phase1",
    "phase1_key",
    "phase2_start_id",
    "train_phase1",
    "train_phase2",
    "train_run",
    "train_sft_baseline",
    "validate",
]
