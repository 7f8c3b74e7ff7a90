"""The DeepSpeed engine: distributed setup, config, optimizer, schedule and the loss of a micro-batch.

CPU (no GPU): ``gloo`` backend, ZeRO stage 0 from ``ds_zero0_cpu.json`` unless ``train.deepspeed``
names another (ZeRO-1/2/3 work on CPU too). One process: the environment variables
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` are set when absent (a free
port is chosen). Several ranks on CPU: ``torchrun``, which sets them::

    torchrun --nproc_per_node 2 -m rotelab.cli train CONFIG --run-dir DIR

DeepSpeed would compile its shared-memory communication op (``deepspeed_shm_comm``) when it creates
the torch backend; that op serves only inference all-reduces, so on CPU it is switched off and
nothing is compiled.

GPUs: launch every rank through the DeepSpeed launcher (or torchrun), which sets the variables above, e.g.::

    deepspeed --num_gpus 8 --no_local_rank --module rotelab.cli train configs/paper-qwen2.5-1.5b.yaml
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 --no_local_rank --module rotelab.cli train RUN_DIR

(the default DeepSpeed config on GPU is ``ds_zero2_bf16.json``; ``train.deepspeed`` names another,
e.g. ``ds_zero3_bf16.json``). Each rank computes the same data order; rank 0 writes checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import socket
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from rotelab.errors import RotelabError

SHIPPED = ("ds_zero0_cpu.json", "ds_zero2_bf16.json", "ds_zero3_bf16.json")


def has_gpu() -> bool:
    return torch.cuda.is_available()


def resolve_ds_config(spec: str | None) -> tuple[Path, dict[str, Any]]:
    """The DeepSpeed JSON config: ``spec`` as a path, else a shipped file of that name (``train/``
    prefix allowed); default: ZeRO-0 on CPU, ZeRO-2 bf16 on GPU."""
    shipped = Path(str(resources.files("rotelab.train")))
    if spec is None:
        path = shipped / ("ds_zero2_bf16.json" if has_gpu() else "ds_zero0_cpu.json")
    else:
        path = Path(spec).expanduser()
        if not path.is_file() and (shipped / path.name).is_file():
            path = shipped / path.name
    if not path.is_file():
        raise RotelabError(f"{spec}: DeepSpeed config not found (shipped: {', '.join(SHIPPED)})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RotelabError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(cfg, dict):
        raise RotelabError(f"{path}: a DeepSpeed config must be a JSON object")
    if "optimizer" in cfg or "scheduler" in cfg:
        raise RotelabError(f"{path}: leave out 'optimizer' and 'scheduler'; rotelab sets them from phase1/phase2 (lr, weight_decay) and train.lr_schedule")
    return path, cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed once (gloo on CPU, nccl on GPU)."""
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    single = "WORLD_SIZE" not in os.environ or os.environ.get("WORLD_SIZE") == "1"
    # one process has no peer to meet: any free port will do. A MASTER_PORT inherited from a parent
    # that initialised its own process group (a test runner, a script) is busy, so on EADDRINUSE a
    # single process retries on a new free port.
    if single and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if single:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not has_gpu():
        # DeepSpeed's shared-memory op serves only its inference_all_reduce; training's all-reduce
        # is torch.distributed's (gloo). Do not compile it (1-3 min, and a build killed midway
        # leaves a lock file that hangs every later CPU launch in torch's FileBaton).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for attempt in range(5):
        try:
            deepspeed.init_distributed(dist_backend="nccl" if has_gpu() else "gloo", auto_mpi_discovery=False)
            break
        except dist.DistNetworkError:
            if not single or attempt == 4:
                raise
            os.environ["MASTER_PORT"] = str(_free_port())
    if has_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def launched() -> bool:
    """Started by a launcher with more than one rank (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def open_run_ranked(target, run_dir=None):
    """:meth:`rotelab.run.Run.from_target` for every rank of a launch: rank 0 creates the run
    (config, data) while the others wait at a barrier, then open it without writing. One process:
    plain ``from_target``."""
    from rotelab.run import Run

    if not launched():
        return Run.from_target(target, run_dir)
    init_distributed()
    run = Run.from_target(target, run_dir) if rank() == 0 else None
    barrier()
    return run if run is not None else Run.from_target(target, run_dir, write=False)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def load_for_training(spec):
    """``(model, tokenizer)`` in float32, train mode, with every parameter in freshly allocated
    memory: weights loaded from safetensors are views into a memory map at unaligned offsets,
    which made CPU matmuls (forward and backward) ≈1.4× slower in training."""
    from rotelab.models import load_model

    model, tok = load_model(spec, "float32")
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()
    model.train()
    return model, tok


def lr_lambda(schedule: str, total_steps: int, warmup_ratio: float):
    """Multiplier of the base lr at optimizer step ``s`` (0-based): cosine/linear decay to 0 over
    ``total_steps`` after ``warmup_ratio × total_steps`` linear warm-up steps, or constant."""
    warm = int(round(warmup_ratio * total_steps))

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if schedule == "constant":
            return 1.0
        p = (s - warm) / max(1, total_steps - warm)
        p = min(max(p, 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p

    return f


def monitor_sections(ds_config: dict[str, Any], run_root: Path, stage: str) -> dict[str, Any]:
    """``ds_config`` with DeepSpeed's ``tensorboard`` and ``csv_monitor`` sections on by default:
    ``<run>/tensorboard/<stage>/`` and ``<run>/logs/csv_monitor/<stage>/`` (see
    :mod:`rotelab.tracking`). A section the config already has wins key by key, so
    ``"tensorboard": {"enabled": false}`` turns TensorBoard off and ``output_path`` moves it."""
    from rotelab.tracking import csv_monitor_dir, tensorboard_dir

    cfg = dict(ds_config)
    defaults = {"tensorboard": tensorboard_dir(run_root), "csv_monitor": csv_monitor_dir(run_root)}
    for section, out in defaults.items():
        cfg[section] = {"enabled": True, "output_path": str(out), "job_name": stage, **cfg.get(section, {})}
    return cfg


def write_step_events(engine, stage_step: int, loss: float, lr: float) -> None:
    """Per-step loss and lr through the engine's own monitor (rank 0 writes; no-op when off)."""
    if engine.monitor.enabled:
        engine.monitor.write_events([("Train/Steps/loss", loss, stage_step), ("Train/Steps/lr", lr, stage_step)])


def make_engine(model, ds_config: dict[str, Any], *, lr: float, weight_decay: float, micro_batch: int, grad_accum: int, total_steps: int, schedule: str, warmup_ratio: float):
    """``deepspeed.initialize`` with AdamW and a LambdaLR schedule; returns the engine.

    The config's batch fields are filled in here (``train_micro_batch_size_per_gpu``,
    ``gradient_accumulation_steps``, ``train_batch_size``).
    """
    import deepspeed

    init_distributed()
    cfg = dict(ds_config)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size()
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule, total_steps, warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    if world_size() == 1 and int(cfg.get("zero_optimization", {}).get("stage", 0)) == 0:
        # averaging gradients over one rank is the identity: skip the flatten + gloo all-reduce
        # DeepSpeed would do after every backward (≈10% of a tiny model's step on CPU)
        engine.enable_backward_allreduce = False
    return engine


def step_loss(model_or_engine, batch: dict[str, torch.Tensor], scale: float) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions of a micro-batch, times ``scale``.

    ``batch``: ``input_ids``/``attention_mask``/``labels`` [batch, seq] from :func:`collate`; the
    labels are used as they are. Returns ``(scaled loss, number of labelled target tokens)``.
    With ``scale = grad_accum × world / tokens in the whole optimizer step`` the gradient is that of
    the mean loss per target token over the whole step (DeepSpeed divides by grad_accum and
    averages over ranks).
    """
    out = model_or_engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss * scale, int((targets != -100).sum())
