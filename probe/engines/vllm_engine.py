"""The vLLM engine: one running engine for a whole checkpoint series.

The engine starts once on the first checkpoint (which must have the final shapes: the base model
*with* the key tokens) and every later checkpoint is loaded into it in place, after which the
prefix cache is reset (its keys/values belong to the old weights). The in-place load is
:meth:`rotelab.probe.engines.vllm_worker.SwapExtension.rotelab_reload`: vLLM's
``reload_weights`` plus a refresh of the embedding/output-head layers, without which a model with
tied embeddings keeps the *first* checkpoint's output head on CPU (see that module).

**Every load is verified** (:meth:`VllmEngine.check`): the prompt log-probabilities of a fixed
probe sequence (a short English text with the tokenizer's added tokens, i.e. the key tokens, in
it) from the running engine are compared with a plain transformers forward of the checkpoint
(float32, CPU). Tolerance: max |Δ| ≤ 2e-3 nats for a float32 engine (a fresh engine agrees with
transformers within ~2e-5 on SmolLM2; the tied-head defect was off by up to 1.33 nats); for
bfloat16/float16 engines mean |Δ| ≤ 0.1 nats over the probe (half-precision noise; a heuristic,
not measured here — no GPU). When a *swap* fails the check, the engine is restarted on that
checkpoint, the first time with a one-line notice on stderr; when a *fresh* engine fails it, that
is an error. ``load_note`` says how the current weights got there (``start``, ``swap``,
``restart``) and ``check_diff`` the measured difference: both go into the results' provenance.

Prompts are fed as token ids (``TokensPrompt``), so vLLM sees exactly the tokens
:func:`rotelab.tokenization.encode` produced.

Scoring: every option is one prompt ``prefix + option`` with ``prompt_logprobs=0`` (the
log-probability of each actual prompt token), all of a kind submitted in one ``generate`` call.
Automatic prefix caching is on (``enable_prefix_caching=True``) and the requests are allowed to
*read* it (``skip_reading_prefix_cache=False``): vLLM then computes prompt log-probabilities only
for positions after the cached blocks, which is fine as long as the cache ends before the last
prefix token — checked per request with ``num_cached_tokens``; a request where it does not is
scored again without reading the cache. vLLM caches whole blocks only (16 tokens on GPU, 128 by
default on CPU), so on CPU the short prompts of this project share nothing and the work is the
naive token count.

vLLM creates worker processes with ``spawn``: a script that builds this engine needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rotelab.errors import RotelabError

from ..accuracy_metrics import ScoreRequest, cut_at_stop
from . import cuda_available


def _logprob_of(entry, token_id: int) -> float:
    """The log-probability of ``token_id`` in one prompt-logprob entry (dict or flat)."""
    if isinstance(entry, dict):
        lp = entry.get(token_id)
        if lp is None:
            raise RotelabError(f"vllm engine: prompt logprob of token {token_id} missing")
        return float(lp.logprob)
    raise RotelabError(f"vllm engine: unexpected prompt logprob entry {type(entry).__name__}")


#: Qualified name of the worker extension vLLM injects into its workers (see vllm_worker.py).
WORKER_EXTENSION = "rotelab.probe.engines.vllm_worker.SwapExtension"
#: Text of the swap check's probe sequence (the tokenizer's added tokens are appended to it).
PROBE_TEXT = "The capital of France is Paris. The author of Hamlet is William Shakespeare. In"
#: Swap-check tolerances (nats; see the module docstring): max |Δ| for float32, mean |Δ| otherwise.
CHECK_MAX_ABS_FP32 = 2e-3
CHECK_MEAN_ABS_HALF = 0.1


_PROBES: dict[str, list[int]] = {}


def probe_ids(checkpoint_dir: Path) -> list[int]:
    """Token ids of the swap check's probe: :data:`PROBE_TEXT`, then every added token (key tokens)
    with a plain word after each, so the added rows of the input *and* output embeddings are used.
    Cached by the tokenizer files' content (a series shares one tokenizer; loading it takes seconds)."""
    import hashlib

    from rotelab.models import load_tokenizer

    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        f = Path(checkpoint_dir) / name
        h.update(f.read_bytes() if f.is_file() else b"-")
    key = h.hexdigest()
    if key in _PROBES:
        return list(_PROBES[key])
    tok = load_tokenizer(str(checkpoint_dir))
    ids = list(tok(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    word = list(tok(" the", add_special_tokens=False)["input_ids"])
    for t in sorted(tok.get_added_vocab().values()):
        if t not in tok.all_special_ids:
            ids += [int(t)] + word
    _PROBES[key] = ids
    return list(ids)


def reference_logprobs(checkpoint_dir: Path, ids: Sequence[int]) -> np.ndarray:
    """float64 [len(ids) - 1]: log P(ids[j] | ids[:j]) from a plain transformers forward (float32, CPU)."""
    import torch
    from transformers.utils import logging as hf_logging

    from rotelab.models import load_model

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per checkpoint in eval's output
    try:
        model, _ = load_model(str(checkpoint_dir), "float32", "cpu")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    with torch.inference_mode():
        logits = model(torch.tensor([list(ids)])).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(list(ids[1:]))[:, None])[:, 0]
    del model
    return lp.numpy()


def host_memory_bytes() -> int:
    """Total memory of the host memory node vLLM's CPU worker checks against (node 0's
    ``/sys/devices/system/node/node0/meminfo``; the whole machine's where there is none)."""
    try:
        with open("/sys/devices/system/node/node0/meminfo") as f:
            for line in f:
                parts = line.split()  # "Node 0 MemTotal: 15689448 kB"
                if len(parts) >= 4 and parts[2] == "MemTotal:":
                    return int(parts[3]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().total)


def cpu_kv_cache_bytes(checkpoint_dir: Path, fraction: float) -> int:
    """The KV cache the CPU engine allocates: ``fraction`` of the host memory node
    (:func:`host_memory_bytes`) less the checkpoint's weight files, i.e. the worker's budget of
    ``eval.gpu_memory_utilization`` as vLLM describes it.

    Passed to vLLM as ``kv_cache_memory_bytes``. Left to itself, vLLM's CPU worker takes
    ``fraction × node memory − the worker's resident set`` *at startup*, which on a 2-core machine
    with a ballooning node size (seen 10.5–16.5 GiB on one 24 GiB VM) and a worker of ≈ 2 GiB (torch,
    compiled kernels) came out negative and refused to start ("requested memory for kv
    (-0.98/0.96 GiB)"). ``VLLM_CPU_KVCACHE_SPACE`` (GiB), where set, still wins (vLLM applies it).
    """
    weights = sum(f.stat().st_size for f in Path(checkpoint_dir).glob("*.safetensors"))
    weights += sum(f.stat().st_size for f in Path(checkpoint_dir).glob("*.bin"))
    kv = int(fraction * host_memory_bytes()) - weights
    if kv <= 0:
        raise RotelabError(
            f"{checkpoint_dir}: eval.gpu_memory_utilization {fraction} of {host_memory_bytes() / 2**30:.1f} GiB host memory "
            f"does not hold the {weights / 2**30:.2f} GiB of weights and a KV cache: raise it (or set VLLM_CPU_KVCACHE_SPACE)"
        )
    return kv


class VllmEngine:
    """vLLM engine (``vllm.LLM``). Created with the first checkpoint to evaluate.

    ``verify``: check every load against transformers (module docstring); on by default.
    """

    name = "vllm"
    #: The worker method that swaps weights in place (tests set vLLM's bare ``reload_weights`` to
    #: reproduce the tied-head defect and exercise the check's restart).
    swap_rpc = "rotelab_reload"

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        dtype: str = "float32",
        batch_size: int = 32,
        gpu_memory_utilization: float = 0.2,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        verify: bool = True,
    ) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as err:
            raise RotelabError(f"vLLM cannot be imported ({err}); use --engine hf for the transformers engine") from None
        self.version = f"vllm {vllm.__version__}"
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.prefix_caching = bool(enable_prefix_caching)
        self.verify = bool(verify)
        self._llm_kwargs = dict(
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=self.prefix_caching,
            max_logprobs=1,
            worker_extension_cls=WORKER_EXTENSION,
        )
        if not cuda_available() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            self._llm_kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(Path(checkpoint_dir), gpu_memory_utilization)
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        self.llm = None
        self.restarts = 0
        self.check_diff: float | None = None
        self._start(Path(checkpoint_dir))
        self.load_note = "start"
        self._check(Path(checkpoint_dir), fresh=True)

    def _start(self, checkpoint_dir: Path) -> None:
        from vllm import LLM

        d = str(checkpoint_dir)
        try:
            self.llm = LLM(model=d, tokenizer=d, **self._llm_kwargs)
        except Exception as err:  # vLLM raises many kinds; the message matters
            raise RotelabError(f"{d}: vLLM could not start ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        self.checkpoint = checkpoint_dir

    def load(self, checkpoint_dir: Path) -> None:
        """Swap the weights of the running engine for those of ``checkpoint_dir``, verified."""
        d = Path(checkpoint_dir)
        if d == self.checkpoint:
            return
        self.llm.collective_rpc(self.swap_rpc, kwargs={"weights_path": str(d)})
        self.llm.reset_prefix_cache()
        self.checkpoint = d
        self.load_note = "swap"
        self._check(d, fresh=False)

    def check(self, checkpoint_dir: Path | None = None) -> float:
        """The swap check's statistic for the running weights against ``checkpoint_dir`` (default:
        the loaded checkpoint): max |Δ logprob| (float32 engine) or mean |Δ| (half precision)."""
        d = Path(checkpoint_dir or self.checkpoint)
        ids = probe_ids(d)
        got = self.score([ScoreRequest(prefix=tuple(ids[:1]), continuations=(tuple(ids[1:]),))])[0][0].astype(np.float64)
        diff = np.abs(got - reference_logprobs(d, ids))
        return float(diff.max() if self.dtype == "float32" else diff.mean())

    def _tolerance(self) -> float:
        return CHECK_MAX_ABS_FP32 if self.dtype == "float32" else CHECK_MEAN_ABS_HALF

    def _check(self, d: Path, *, fresh: bool) -> None:
        if not self.verify:
            self.check_diff = None
            return
        diff = self.check(d)
        if diff <= self._tolerance():
            self.check_diff = diff
            return
        if fresh:
            raise RotelabError(
                f"{d}: vLLM started on this checkpoint disagrees with transformers "
                f"(|Δ logprob| {diff:.3g} > {self._tolerance():g} on the probe sequence); use --engine hf"
            )
        if self.restarts == 0:
            print(
                f"rotelab eval: vLLM's in-place weight swap to {d} disagrees with transformers "
                f"(|Δ logprob| {diff:.3g}); restarting the engine for this and any later failing checkpoint",
                file=sys.stderr,
            )
        self.restarts += 1
        self.close()
        self._start(d)
        self.load_note = "restart"
        self._check(d, fresh=True)

    def _params(self, *, skip_cache: bool):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            detokenize=False,
            skip_reading_prefix_cache=skip_cache or not self.prefix_caching,
        )

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[np.ndarray]]:
        """Per-token log-probabilities ``[request][continuation] -> float32 [len]``."""
        from vllm.inputs import TokensPrompt

        flat = [(r, c) for r, req in enumerate(requests) for c in range(len(req.continuations))]
        seqs = [list(requests[r].prefix) + list(requests[r].continuations[c]) for r, c in flat]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], self._params(skip_cache=False), use_tqdm=False)
        redo = [
            k
            for k, o in enumerate(outs)
            if (o.num_cached_tokens or 0) > len(requests[flat[k][0]].prefix) - 1 or o.prompt_logprobs is None
        ]
        if redo:
            again = self.llm.generate(
                [TokensPrompt(prompt_token_ids=seqs[k]) for k in redo], self._params(skip_cache=True), use_tqdm=False
            )
            for k, o in zip(redo, again, strict=True):
                outs[k] = o
        result: list[list[np.ndarray]] = [[np.zeros(0, np.float32)] * len(req.continuations) for req in requests]
        for (r, c), seq, o in zip(flat, seqs, outs, strict=True):
            p = len(requests[r].prefix)
            lps = o.prompt_logprobs
            result[r][c] = np.array([_logprob_of(lps[j], seq[j]) for j in range(p, len(seq))], dtype=np.float32)
        return result

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
        """Greedy continuations (new token ids, ending with the stop id that ended them, if any)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=int(max_new_tokens), temperature=0.0, stop_token_ids=[int(s) for s in stop_ids], detokenize=False
        )
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        stops = set(int(s) for s in stop_ids)
        return [cut_at_stop(o.outputs[0].token_ids, stops) for o in outs]

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm
