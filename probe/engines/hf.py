"""The transformers reference engine: batched, padding-correct, trie-shared MC scoring.

Scoring: :func:`rotelab.probe.mc_trie.score_trie` — each prompt and every distinct inner node of
its options' token trie run once, in one packed row per prompt. Work per request: prefix + inner
trie nodes instead of Σ (prefix + option) (the flat shared-prefix scheme this replaced ran
prefix + Σ (len(option) − 1); it is kept in ``tests/references.py`` as a reference).

Generation: ``model.generate`` with greedy decoding on left-padded prompts, stopping at any of the
stop ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rotelab.errors import RotelabError

from rotelab.batching import Collator, pad, pad_id

from ..accuracy_metrics import ScoreRequest, cut_at_stop
from ..mc_trie import score_trie


class HFEngine:
    """transformers engine. ``batch_size``: prefixes (and generation prompts) per forward pass."""

    name = "hf"
    prefix_caching = True  # the prompt and shared option prefixes are run once (explicit, not vLLM's automatic cache)
    scoring = "trie"  # MC scoring scheme, recorded in the provenance

    def __init__(self, *, dtype: str = "float32", batch_size: int = 32, device: str | None = None) -> None:
        import transformers

        self.version = f"transformers {transformers.__version__}"
        self.dtype = dtype
        self.batch_size = int(batch_size)
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

    # ------------------------------------------------------------------ scoring

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input ids, attention mask and position ids [batch, max_len] for left-padded ``seqs``."""
        p = pad(seqs, self.pad_id, "left").to(self.device)
        return p.input_ids, p.attention_mask, p.position_ids

    def score(self, requests: Sequence[ScoreRequest]) -> list[list[np.ndarray]]:
        """Per-token log-probabilities ``[request][continuation] -> float32 [len]`` (trie-shared, see
        :mod:`rotelab.probe.mc_trie`)."""
        return score_trie(self._need_model(), requests, pad_id=self.pad_id, batch_size=self.batch_size)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int]) -> list[list[int]]:
        """Greedy continuations (new token ids, cut after the first stop id)."""
        model = self._need_model()
        stops = set(int(s) for s in stop_ids)
        collator: Collator[list[int]] = Collator(len(prompts), self.batch_size, key=lambda i: len(prompts[i]))
        per_batch: list[list[list[int]]] = []
        for chunk in collator.batches():
            ids, mask, _ = self._left_pad([prompts[i] for i in chunk])
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=int(max_new_tokens),
                do_sample=False,
                num_beams=1,
                eos_token_id=sorted(stops),
                pad_token_id=self.pad_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
            new = gen[:, ids.shape[1] :].cpu().tolist()
            per_batch.append([cut_at_stop(row, stops) for row in new])
        return collator.restore(per_batch)

    def close(self) -> None:
        self.model = None
        self.checkpoint = None
