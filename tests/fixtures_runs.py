"""Tiny runs with a real checkpoint series, for tests of the stages that read checkpoints
(evaluation, capture, analyses) without running the trainer.

``make_tiny_run(tmp_path)`` builds ``tmp_path/"run"``: a :class:`rotelab.run.Run` over a small fact
set, a ``base`` checkpoint (the tiny model with the relations' key tokens added, saved with its
tokenizer) and ``n_checkpoints - 1`` perturbed copies ``p1-e01``, ``p1-e02``, … (series ``main``),
indexed in ``checkpoints/index.json``. Everything is float32 and seeded: the same call gives the
same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rotelab.checkpoints import CheckpointEntry, write_index
from rotelab.config import Config, config_from_dict
from rotelab.models import add_key_tokens, load_model
from rotelab.run import Run

DEFAULT_CONFIG: dict[str, Any] = {
    "name": "tiny-fixture",
    "seed": 0,
    "data": {
        "relations": ["capital", "author"],
        "facts_per_relation": 4,
        "distractors": 5,
        "languages": ["de"],
        "templates_per_kind": 1,
    },
    "phase2": {"k": 2},
    "eval": {"engine": "hf", "max_new_tokens": 4, "batch_size": 4},
}


def apply_overrides(cfg: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with keyword overrides applied in place: ``section__field=value`` sets one field,
    ``section=value`` replaces a whole section (or a top-level key)."""
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    return cfg


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_tiny_run(
    tmp_path: Path,
    n_checkpoints: int = 2,
    model: str = "tiny-llama",
    config: dict[str, Any] | None = None,
    noise: float = 0.05,
) -> Run:
    """A run at ``tmp_path/"run"`` with ``n_checkpoints`` checkpoints (``base``, ``p1-e01``, …).

    ``config`` is merged over :data:`DEFAULT_CONFIG` (nested dicts merge key by key); ``model`` is
    a model name for :func:`rotelab.models.load_model`. Checkpoint ``p1-eNN`` is ``base`` plus
    Gaussian noise of std ``noise × NN`` on every weight (seed ``NN``).
    """
    cfg: Config = config_from_dict(_merge(DEFAULT_CONFIG, {"model": {"name": model}, **(config or {})}), "make_tiny_run")
    run = Run.create(cfg, Path(tmp_path) / "run")
    mdl, tok = load_model(model, "float32")
    if cfg.phase1.mode == "key":
        add_key_tokens(mdl, tok, list(run.key_tokens().values()), cfg.model.key_token_init, cfg.seed)
    base_state = {k: v.detach().clone() for k, v in mdl.state_dict().items()}
    entries = []
    for i in range(n_checkpoints):
        ckpt_id = "base" if i == 0 else f"p1-e{i:02d}"
        if i > 0:
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for name, p in mdl.named_parameters():
                    p.copy_(base_state[name] + noise * i * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        rel = f"checkpoints/{ckpt_id}"
        out = run.root / rel
        mdl.save_pretrained(out)
        tok.save_pretrained(out)
        entries.append(
            CheckpointEntry(
                id=ckpt_id,
                phase="base" if i == 0 else "phase1",
                epoch=float(i),
                step=i * 10,
                tokens_seen=i * 1000,
                loss=None if i == 0 else 1.0 / i,
                path=rel,
                series="main",
            )
        )
    write_index(run.index_path, entries)
    return run
