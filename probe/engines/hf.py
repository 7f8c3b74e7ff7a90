"""The transformers reference engine: batched, padding-correct, trie-shared MC scoring.

:meth:`HFEngine.evaluate_plan` evaluates one prompt kind with the prompt pass
(:mod:`rotelab.probe.prompt_pass`): each item's prompt runs once (in batches of
``prompt_batch_size``, the run's ``capture.batch_size``), its options' first tokens are read from
the prompt-final logits, the inner nodes of its options' token trie continue from the prompt's KV
cache, and greedy generation continues from the same cache. The pass can return the capture
states of the same forward (the fused probe pass). Work per item: prompt + inner trie nodes +
generated tokens (the flat shared-prefix scheme ran prompt + Σ (len(option) − 1); it is kept in
``tests/references.py`` as a reference).

``score(requests)`` (a request behind a prefix that is not its item's prompt, and the engine
protocol) uses :func:`rotelab.probe.mc_trie.score_trie` — each prefix and its inner trie nodes in
one packed row — in batches of ``batch_size`` requests; ``generate(prompts)`` is the prompt pass
with generation only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rotelab.errors import RotelabError

from rotelab.batching import pad_id

from ..accuracy_metrics import KindPlan, ScoreRequest
from ..mc_trie import score_trie
from ..prompt_pass import Generation, PassOutput, prompt_pass


class HFEngine:
    """transformers engine. ``prompt_batch_size``: prompts per forward of the prompt pass (scoring
    behind each item's prompt and generation); ``batch_size``: requests per forward of
    :meth:`score` (requests behind other prefixes)."""

    name = "hf"
    prefix_caching = True  # the prompt and shared option prefixes are run once (explicit, not vLLM's automatic cache)
    scoring = "trie"  # MC scoring scheme, recorded in the provenance (the pass: provenance "probe_pass")

    def __init__(
        self, *, dtype: str = "float32", batch_size: int = 32, prompt_batch_size: int = 32, device: str | None = None
    ) -> None:
        import transformers

        self.version = f"transformers {transformers.__version__}"
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.prompt_batch_size = int(prompt_batch_size)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = None
        self.pad_id = 0
        self.checkpoint: Path | None = None

    def load(self, checkpoint_dir: Path) -> None:
        from rotelab.models import load_model

        if self.checkpoint == Path(checkpoint_dir):
            return
        self.model = None
        model, tok = load_model(str(checkpoint_dir), self.dtype, self.device)
        self.model = model
        self.pad_id = pad_id(tok)
        self.checkpoint = Path(checkpoint_dir)

    def _need_model(self):
        if self.model is None:
            raise RotelabError("hf engine: no checkpoint loaded")
        return self.model

    # ------------------------------------------------------------------ scoring and generation

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[np.ndarray]]:
        """Per-token log-probabilities ``[request][continuation] -> float32 [len]`` (trie-shared, see
        :mod:`rotelab.probe.mc_trie`)."""
        return score_trie(self._need_model(), requests, pad_id=self.pad_id, batch_size=self.batch_size)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
        """Greedy continuations (new token ids, cut after the first stop id): the prompt pass."""
        gen = Generation(int(max_new_tokens), frozenset(int(s) for s in stop_ids))
        return prompt_pass(
            self._need_model(), prompts, pad_id=self.pad_id, batch_size=self.prompt_batch_size, generation=gen
        ).generated

    def evaluate_plan(
        self,
        plan: KindPlan,
        generation: Generation | None,
        *,
        layers: Sequence[int] | None = None,
        final_norm: bool = False,
    ) -> tuple[list[list[np.ndarray]], PassOutput]:
        """One kind by the prompt pass: ``(log-probabilities [request][continuation] -> float32
        [len], the pass's output)``; the pass's ``generated`` holds the greedy tokens per item when
        ``generation`` is given, and its ``hidden``/``final`` the states of ``layers`` /
        ``final_norm`` (capture). Each item's main request (the answer's prefix, which is its
        generation prompt) is scored in the pass; any other request of the plan by :meth:`score`."""
        main = [refs[0][0] for refs in plan.option_ref]
        out = prompt_pass(
            self._need_model(),
            plan.gen_prompts,
            pad_id=self.pad_id,
            batch_size=self.prompt_batch_size,
            layers=layers,
            final_norm=final_norm,
            options=[plan.requests[r].continuations for r in main],
            generation=generation,
        )
        lps: list[list[np.ndarray] | None] = [None] * len(plan.requests)
        for i, r in enumerate(main):
            lps[r] = out.logprobs[i]
        rest = [r for r, v in enumerate(lps) if v is None]
        if rest:
            for r, v in zip(rest, self.score([plan.requests[r] for r in rest])):
                lps[r] = v
        return lps, out  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
        self.checkpoint = None
