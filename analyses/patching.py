"""Activation patching: copy a source forward pass's hidden state into a target's — presets of
the generic sweep :func:`rotelab.analyses.interventions.intervene` (whose docstring states the
conventions: sites, positions, scoring with the answer in the sequence, metrics, result columns).

``patch(run, source=(checkpoint, kind), target=(checkpoint, kind), layers, position, metric)``
runs, for every target item, the same fact's source prompt (matched by ``fact_id`` and
``template_id`` when the source kind has that template, else the fact's first source template)
and the target prompt, and patches the source's state at site ``resid[layer]`` and ``position``
into the target. Source and target may be different checkpoints (two models loaded) and different
kinds. Sweeps are stored as the store table ``patching`` (rows with the same keys are replaced).
:data:`layer_sweep` is the configured sweep of ``rotelab analyze`` (every layer, last token).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from rotelab.errors import RotelabError
from rotelab.facts import split_mask
from rotelab.probe.sites import ModelSites, resid

from .interventions import (
    KEY_COLUMNS,
    METRICS,
    PATCHING_COLUMNS,
    ModelCache,
    Position,
    PromptSet,
    RunSource,
    answer_scores,
    hidden_states_at,
    intervene,
    match_source_items,
    metric_fn,
    patched_forward,
    resolve_position,
)

if TYPE_CHECKING:
    from rotelab.run import Run


def block_path(model: torch.nn.Module) -> str:
    """Dotted path of the model's transformer block list (:class:`ModelSites`), e.g.
    ``model.layers`` or ``transformer.h``."""
    sites = ModelSites(model)
    return ".".join(p for p in (sites.decoder_path, sites.blocks_name) if p)


def n_layers(model: torch.nn.Module) -> int:
    """Number of transformer blocks (store layers are 0..n)."""
    return ModelSites(model).n_layers


def sample_items(items: pd.DataFrame, per_relation: int, split: str | None = "heldout", seed: int = 0) -> list[int]:
    """``per_relation`` item ids of each relation (of ``split`` when it has any), spread over
    facts: a seeded random order of the relation's facts, one item (a seeded random template) per
    fact, further rounds over the facts only when the relation has fewer facts than
    ``per_relation``. Returned sorted by item id."""
    import numpy as np

    df = items
    if split is not None and split_mask(items["split"], split).any():
        df = items[split_mask(items["split"], split)]
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for _, rel in df.groupby("relation", sort=True):
        by_fact = [list(g["item"]) for _, g in rel.groupby("fact_id", sort=True)]
        for ids in by_fact:
            rng.shuffle(ids)
        order = rng.permutation(len(by_fact))
        picked: list[int] = []
        for round_ in range(max(len(x) for x in by_fact)):
            for f in order:
                if round_ < len(by_fact[f]) and len(picked) < per_relation:
                    picked.append(int(by_fact[f][round_]))
        out += picked
    return sorted(out)


# --------------------------------------------------------------------------- the presets

def patch(
    run: Run,
    source: tuple[str, str],
    target: tuple[str, str],
    layers: Iterable[int] | None = None,
    position: Position | Sequence[Position] = "last",
    metric: str = "object_logprob",
    items: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
    store: bool = True,
    progress: bool = True,
    models: ModelCache | None = None,
    device: str | None = None,
) -> pd.DataFrame:
    """Patch ``source=(checkpoint, kind)`` hidden states into ``target=(checkpoint, kind)``: the
    sweep over sites ``resid[layer]`` × positions with :class:`RunSource` (the matched source
    prompts' clean forward) as the source.

    ``layers``: store layers (0 = embeddings … n_blocks; None = all); ``position``: one position or
    a list (a sweep); ``items``: target item ids (None = all of the target kind). Returns the tidy
    table :data:`PATCHING_COLUMNS` (one row per layer × position × item) and, with ``store``,
    merges it into the store table ``patching``.
    """
    _, fn = metric_fn(metric)
    (s_ckpt, s_kind), (t_ckpt, t_kind) = source, target
    positions: list[Position] = list(position) if isinstance(position, (list, tuple)) else [position]  # type: ignore[arg-type]
    if not positions:
        raise RotelabError("patching: no positions given")
    tgt = PromptSet(t_ckpt, t_kind, None if items is None else [int(i) for i in items])
    t_items = tgt.table(run)
    if t_items.empty:
        raise RotelabError(f"patching: no target items of kind {t_kind!r}")
    cache = models or ModelCache(run, device=device)
    src = RunSource(run, cache, s_ckpt, s_kind, t_items)
    L = cache.load(t_ckpt)[2].n_layers
    if src.sites.n_layers != L:
        raise RotelabError(f"patching: {s_ckpt!r} and {t_ckpt!r} have different numbers of layers")
    lays = list(range(L + 1)) if layers is None else [int(v) for v in layers]
    bad = [v for v in lays if not 0 <= v <= L]
    if bad:
        raise RotelabError(f"patching: layer {bad[0]} out of range (0..{L}; 0 = embeddings)")
    df = intervene(run, src, tgt, [resid(v) for v in lays], positions, fn,
                   models=cache, batch_size=batch_size, progress=progress)
    if store:
        store_patching(run, df)
    return df


def _preset(doc: str, **fixed: Any) -> Any:
    p = partial(patch, **fixed)
    p.__doc__ = doc  # type: ignore[misc]
    return p


layer_sweep = _preset(
    """Every layer (or ``layers``) at the prompt's last token: the source kind's state into the target
    kind, ``patch(run, source, target, layers=None, metric=…, items=…)``. The configured sweep of
    ``rotelab analyze`` (``analyses.patching``) is this preset within one checkpoint.""",
    position="last",
)


def store_patching(run: Run, df: pd.DataFrame) -> pd.DataFrame:
    """Merge ``df`` into the store table ``patching`` (rows with the same keys are replaced)."""
    from rotelab.store import Store

    st = Store.open(run.store_path, fingerprint=run.fingerprint())
    old = st.read_table("patching")
    if old is not None and len(old):
        keys = list(KEY_COLUMNS)
        old = old[list(PATCHING_COLUMNS)]
        new_keys = pd.MultiIndex.from_frame(df[keys].astype(str))
        keep = ~pd.MultiIndex.from_frame(old[keys].astype(str)).isin(new_keys)
        df = pd.concat([old[keep], df], ignore_index=True)
    st.write_table("patching", df.reset_index(drop=True))
    return df


__all__ = [
    "KEY_COLUMNS", "METRICS", "PATCHING_COLUMNS", "ModelCache", "answer_scores", "block_path", "hidden_states_at",
    "layer_sweep", "match_source_items", "n_layers", "patch", "patched_forward", "resolve_position", "sample_items",
    "store_patching",
]
