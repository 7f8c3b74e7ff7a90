"""Key-token alignment drift (paper §6, Fig. 18–20, Appendix F.4).

For one checkpoint and layer: the cosine similarity between the ``key`` kind's representation of a
fact (``"{subject} <R_r>"``, last token = the key token) and the representations of that same
fact's prompts of another kind (train / test / unrelated / translated-<lang>), averaged over the
fact's templates, then over the facts of each relation. ``ΔSimilarity`` (F.4) is that cosine at a
checkpoint minus the cosine at a reference checkpoint (default: the last phase-1 checkpoint of the
``main`` series), same layer / relation / kind / split.

The store table ``alignment`` is tidy: ``checkpoint, layer, relation, kind, split, n, cosine,
reference, delta`` with ``split`` ∈ {all, train, validation, test, heldout = validation ∪ test, …}.
``layer`` ≥ 0 rows use the raw hidden states; ``layer`` = -1
(:data:`rotelab.analyses._common.FINAL_NORM_LAYER`) rows use the ``final_norm`` state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rotelab.errors import RotelabError
from rotelab.facts import LEGACY_HELDOUT, split_mask, split_names

from .cossim import unit_rows

ALIGNMENT_COLUMNS = ("checkpoint", "layer", "relation", "kind", "split", "n", "cosine", "reference", "delta")


def key_prompt_cosines(
    key_X: np.ndarray, key_fact_ids: Sequence[str], X: np.ndarray, fact_ids: Sequence[str]
) -> np.ndarray:
    """Cosine of each prompt item with its fact's key-token representation.

    ``key_X`` [n_key, hidden] with ``key_fact_ids`` [n_key] (one item per fact); ``X`` [n, hidden]
    with ``fact_ids`` [n] → float64 [n]. A fact without a key item is an error.
    """
    kf = [str(f) for f in key_fact_ids]
    pos = {f: i for i, f in enumerate(kf)}
    if len(pos) != len(kf):
        raise RotelabError("alignment: the key kind has more than one item per fact")
    try:
        idx = np.array([pos[str(f)] for f in fact_ids], dtype=np.int64)
    except KeyError as e:
        raise RotelabError(f"alignment: fact {e.args[0]!r} has no key-token item") from None
    K = unit_rows(key_X, "key activations")
    P = unit_rows(X, "prompt activations")
    return np.einsum("ih,ih->i", K[idx], P)


def alignment_by_relation(
    key_X: np.ndarray, key_items: pd.DataFrame, X: np.ndarray, items: pd.DataFrame
) -> pd.DataFrame:
    """Mean key/prompt cosine per relation and split for one slab pair.

    ``key_X`` [n_key, hidden] rows in ``key_items`` order; ``X`` [n, hidden] rows in ``items``
    order (item tables with ``fact_id``, ``relation``, ``split``). Mean over each fact's templates
    first, then over the facts. Returns columns ``relation, split, n, cosine`` (``n`` = facts),
    with ``split`` ``all``, every split value present and ``heldout`` (validation ∪ test).
    """
    cos = key_prompt_cosines(key_X, key_items["fact_id"].tolist(), X, items["fact_id"].tolist())
    df = pd.DataFrame({"fact_id": items["fact_id"].astype(str).to_numpy(), "relation": items["relation"].astype(str).to_numpy(),
                       "split": items["split"].astype(str).to_numpy(), "cos": cos})
    per_fact = df.groupby(["relation", "split", "fact_id"], sort=True)["cos"].mean().reset_index()
    parts = [per_fact.assign(split="all"), per_fact]
    if LEGACY_HELDOUT in split_names(per_fact["split"]) and not (per_fact["split"] == LEGACY_HELDOUT).any():
        parts.append(per_fact[split_mask(per_fact["split"], LEGACY_HELDOUT)].assign(split=LEGACY_HELDOUT))
    out = (
        pd.concat(parts, ignore_index=True)
        .groupby(["relation", "split"], sort=True)["cos"]
        .agg(n="size", cosine="mean")
        .reset_index()
    )
    return out[["relation", "split", "n", "cosine"]]


def with_delta(table: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Fill ``reference`` and ``delta`` = cosine − cosine at ``reference`` (same layer, relation,
    kind, split); NaN where the reference has no value."""
    t = table.drop(columns=[c for c in ("reference", "delta") if c in table.columns])
    keys = ["layer", "relation", "kind", "split"]
    ref = t[t["checkpoint"] == reference][keys + ["cosine"]].rename(columns={"cosine": "_ref"})
    t = t.merge(ref, on=keys, how="left")
    t["reference"] = reference
    t["delta"] = t["cosine"] - t["_ref"]
    return t.drop(columns="_ref")[list(ALIGNMENT_COLUMNS)]


__all__ = ["ALIGNMENT_COLUMNS", "alignment_by_relation", "key_prompt_cosines", "with_delta"]
