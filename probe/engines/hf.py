"""The transformers reference engine: batched, padding-correct, shared-prefix MC scoring.

Scoring (shared prefix): the prefixes of a batch are run once, left-padded (attention mask and
explicit position ids, so padding changes nothing); the log-probability of every continuation's
first token comes from the prefix's last position; the prefix's key/value cache is then gathered
into one row per continuation and only the continuation tokens (all but the last) are run on top of
it, one forward per continuation length (so no padding work). Work per request: prefix +
Σ (len(option) − 1) tokens instead of Σ (prefix + option).

Generation: ``model.generate`` with greedy decoding on left-padded prompts, stopping at any of the
stop ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rotelab.errors import RotelabError

from rotelab.batching import Collator, pad, pad_id, pad_values

from ..accuracy_metrics import ScoreRequest, cut_at_stop

#: Upper bound on the float32 logits one forward of continuation rows may hold (bytes).
_LOGITS_BUDGET = 2**28


class HFEngine:
    """transformers engine. ``batch_size``: prefixes (and generation prompts) per forward pass."""

    name = "hf"
    prefix_caching = True  # shared-prefix KV reuse (explicit, not vLLM's automatic cache)

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

    @torch.inference_mode()
    def score(self, requests: Sequence[ScoreRequest]) -> list[list[np.ndarray]]:
        """Per-token log-probabilities ``[request][continuation] -> float32 [len]``."""
        from transformers import DynamicCache

        model = self._need_model()
        collator: Collator[list[np.ndarray]] = Collator(len(requests), self.batch_size, key=lambda i: len(requests[i].prefix))
        per_batch: list[list[list[np.ndarray]]] = []
        vocab = int(model.get_output_embeddings().weight.shape[0])
        for chunk in collator.batches():
            prefixes = [requests[i].prefix for i in chunk]
            if any(len(p) == 0 for p in prefixes):
                raise RotelabError("hf engine: a scoring prefix is empty (the tokenizer adds no BOS and the prompt is empty)")
            ids, mask, pos = self._left_pad(prefixes)
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            last_lp = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # [B, V]
            kv = [(layer.keys, layer.values) for layer in res.past_key_values.layers]
            plen = mask.sum(-1)  # [B]
            rows = [(b, c) for b, i in enumerate(chunk) for c in range(len(requests[i].continuations))]
            conts = {(b, c): requests[chunk[b]].continuations[c] for b, c in rows}
            results: dict[tuple[int, int], np.ndarray] = {}
            rows.sort(key=lambda r: len(conts[r]))
            longest = max(len(c) for c in conts.values())
            cap = max(1, _LOGITS_BUDGET // (4 * vocab * max(1, longest - 1)))
            r0 = 0
            while r0 < len(rows):
                # one forward per continuation length (rows are sorted by it): no padding work
                n0 = len(conts[rows[r0]])
                part = [r for r in rows[r0 : r0 + cap] if len(conts[r]) == n0]
                r0 += len(part)
                tok, cmask = pad_values([conts[r] for r in part], self.pad_id)
                L = tok.shape[1]
                tok, cmask = tok.to(self.device), cmask.to(self.device)
                bidx = torch.tensor([b for b, _ in part], dtype=torch.long, device=self.device)
                lp = torch.zeros((len(part), L), dtype=torch.float32, device=self.device)
                lp[:, 0] = last_lp[bidx, tok[:, 0]]
                if L > 1:
                    cache = DynamicCache([(k.index_select(0, bidx), v.index_select(0, bidx)) for k, v in kv], config=model.config)
                    attn = torch.cat([mask.index_select(0, bidx), cmask[:, :-1]], dim=1)
                    cpos = plen.index_select(0, bidx)[:, None] + torch.arange(L - 1, device=self.device)[None, :]
                    logits = model(
                        input_ids=tok[:, :-1], attention_mask=attn, position_ids=cpos, past_key_values=cache, use_cache=True
                    ).logits
                    lps = torch.log_softmax(logits.float(), dim=-1)
                    lp[:, 1:] = lps.gather(-1, tok[:, 1:, None])[..., 0]
                lp_np = lp.cpu().numpy()
                for j, r in enumerate(part):
                    results[r] = lp_np[j, : len(conts[r])].copy()
            per_batch.append([[results[(b, c)] for c in range(len(requests[i].continuations))] for b, i in enumerate(chunk)])
        return collator.restore(per_batch)

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
