"""The vLLM engine: one running engine for a whole checkpoint series.

The engine starts once on the first checkpoint (which must have the final shapes: the base model
*with* the key tokens) and every later checkpoint is loaded into it in place with
``collective_rpc("reload_weights", weights_path=…)``, after which the prefix cache is reset (its
keys/values belong to the old weights).

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
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rotelab.errors import RotelabError

from ..accuracy_metrics import ScoreRequest


def _logprob_of(entry, token_id: int) -> float:
    """The log-probability of ``token_id`` in one prompt-logprob entry (dict or flat)."""
    if isinstance(entry, dict):
        lp = entry.get(token_id)
        if lp is None:
            raise RotelabError(f"vllm engine: prompt logprob of token {token_id} missing")
        return float(lp.logprob)
    raise RotelabError(f"vllm engine: unexpected prompt logprob entry {type(entry).__name__}")


class VllmEngine:
    """vLLM engine (``vllm.LLM``). Created with the first checkpoint to evaluate."""

    name = "vllm"

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
    ) -> None:
        try:
            import vllm
            from vllm import LLM
        except ImportError as err:
            raise RotelabError(f"vLLM cannot be imported ({err}); use --engine hf for the transformers engine") from None
        self.version = f"vllm {vllm.__version__}"
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.prefix_caching = bool(enable_prefix_caching)
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        d = str(Path(checkpoint_dir))
        try:
            self.llm = LLM(
                model=d,
                tokenizer=d,
                dtype=dtype,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size,
                enable_prefix_caching=self.prefix_caching,
                max_logprobs=1,
            )
        except Exception as err:  # vLLM raises many kinds; the message matters
            raise RotelabError(f"{d}: vLLM could not start ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        self.checkpoint = Path(checkpoint_dir)

    def load(self, checkpoint_dir: Path) -> None:
        """Swap the weights of the running engine for those of ``checkpoint_dir``."""
        if Path(checkpoint_dir) == self.checkpoint:
            return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(checkpoint_dir)})
        self.llm.reset_prefix_cache()
        self.checkpoint = Path(checkpoint_dir)

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
        res = []
        for o in outs:
            seq = []
            for t in o.outputs[0].token_ids:
                seq.append(int(t))
                if t in stops:
                    break
            res.append(seq)
        return res

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm
