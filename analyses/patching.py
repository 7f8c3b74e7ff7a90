"""Activation patching with nnsight: copy a source forward pass's hidden state into a target's.

``patch(run, source=(checkpoint, kind), target=(checkpoint, kind), layers, position, metric)``
runs, for every target item, the same fact's source prompt (matched by ``fact_id`` and
``template_id`` when the source kind has that template, else the fact's first source template)
and the target prompt, and patches the source's hidden state at (layer, position) into the target.
Source and target may be different checkpoints (two models loaded) and different kinds.

Conventions
-----------
* **Layers** follow the store: layer 0 is the embedding output (the input of block 0), layer i
  the output of block i (the residual stream after it, before the final norm).
* **Position** is a prompt token index in each sequence: ``"last"`` is the prompt's last token
  (for the ``key`` kind the key token itself); an int ``p >= 0`` is the p-th prompt token, ``p < 0``
  counts back from the prompt's end (``-1`` == ``"last"``). It must lie inside the prompt of both
  the source and the target item.
* **Scoring with the answer in the sequence.** Each forward runs on the full ``prompt + " " +
  object`` sequence (tokenized by :func:`rotelab.tokenization.encode`) and the patch is written at
  the prompt position only. The object tokens come after the patched position, so the first object
  token is predicted from the patched state and later object tokens attend to the patched
  position's keys/values in the layers above the patch — exactly what a prompt-only forward with the
  patch followed by teacher-forced decoding of the object from its cache computes. The source's
  hidden state is taken from its own full-sequence forward (causal attention: the object tokens
  after it do not change it).
* **Metrics**: ``object_logprob`` (sum of the object tokens' log-probabilities), ``object_prob``
  (its exp), ``first_token_logprob`` (the first object token only).

Every result row has ``clean`` (the source prompt's metric under the source model), ``corrupted``
(the target prompt under the target model, unpatched), ``patched``, ``effect = patched −
corrupted`` and ``normalized = effect / (clean − corrupted)``. Sweeps are stored as the store table
``patching`` (rows with the same keys are replaced).

The nnsight traces are in this file on purpose: nnsight reads the source of the traced block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from rotelab.errors import RotelabError
from rotelab.facts import split_mask
from rotelab.tokenization import Encoded, encode

if TYPE_CHECKING:
    from rotelab.run import Run

Position = Literal["last"] | int
METRICS = ("object_logprob", "object_prob", "first_token_logprob")
KEY_COLUMNS = ("source_checkpoint", "source_kind", "target_checkpoint", "target_kind", "layer", "position", "item", "metric")
PATCHING_COLUMNS = (*KEY_COLUMNS, "source_item", "fact_id", "relation", "template_id", "split",
                    "clean", "corrupted", "patched", "effect", "normalized")


# --------------------------------------------------------------------------- model plumbing

def block_path(model: torch.nn.Module) -> str:
    """Dotted path of the model's transformer block list (the ModuleList with
    ``config.num_hidden_layers`` entries), e.g. ``model.layers`` or ``transformer.h``."""
    n = int(getattr(model.config, "num_hidden_layers", 0) or getattr(model.config, "n_layer", 0))
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and n > 0:
            return name
    raise RotelabError(f"{type(model).__name__}: cannot find its list of {n} transformer blocks")


def n_layers(model: torch.nn.Module) -> int:
    """Number of transformer blocks (store layers are 0..n)."""
    return len(_resolve(model, block_path(model)))


def _resolve(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _wrap(model: torch.nn.Module) -> Any:
    import warnings

    from nnsight import NNsight

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return NNsight(model)


def _rows(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


# --------------------------------------------------------------------------- traces (nnsight)

def hidden_states_at(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    layers: Sequence[int], positions: torch.Tensor,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One forward; returns ``{layer: [batch, n_pos, hidden]}`` at ``positions`` [batch, n_pos]
    (token indices per row) and the logits [batch, seq, vocab]."""
    nn = _wrap(model)
    path = block_path(model)
    blocks = _resolve(nn, path)
    rows = _rows(input_ids.shape[0], input_ids.device)[:, None]
    wanted = sorted(set(int(v) for v in layers))
    saved: dict[int, torch.Tensor] = {}  # filled inside the trace (names bound there do not escape it)
    with torch.no_grad():
        with nn.trace(input_ids=input_ids, attention_mask=attention_mask):
            for v in wanted:
                h = blocks[0].input if v == 0 else blocks[v - 1].output
                saved[v] = h[rows, positions].clone().save()
            logits = nn.output.logits.save()
    return {v: saved[v] for v in wanted}, logits


def patched_forward(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    layer: int, positions: torch.Tensor, states: torch.Tensor,
) -> torch.Tensor:
    """One forward with the hidden state at store layer ``layer`` replaced at ``positions``
    [batch] (one token index per row) by ``states`` [batch, hidden]; returns the logits
    [batch, seq, vocab]."""
    nn = _wrap(model)
    blocks = _resolve(nn, block_path(model))
    rows = _rows(input_ids.shape[0], input_ids.device)
    states = states.to(device=input_ids.device)
    with torch.no_grad():
        with nn.trace(input_ids=input_ids, attention_mask=attention_mask):
            h = blocks[0].input if layer == 0 else blocks[layer - 1].output
            h[rows, positions] = states.to(h.dtype)
            logits = nn.output.logits.save()
    return logits


# --------------------------------------------------------------------------- scoring

def answer_scores(logits: torch.Tensor, encs: Sequence[Encoded]) -> np.ndarray:
    """Per row: ``[object_logprob, first_token_logprob]`` (float64 [batch, 2]) of each encoded
    item's answer tokens, from ``logits`` [batch, seq, vocab] of the padded batch."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    out = np.zeros((len(encs), 2))
    for b, e in enumerate(encs):
        tgt = torch.tensor(e.input_ids[e.answer_start:], device=lp.device)
        pos = torch.arange(e.answer_start - 1, len(e.input_ids) - 1, device=lp.device)
        vals = lp[b, pos, tgt].double()
        out[b] = (float(vals.sum()), float(vals[0]))
    return out


def _metric(scores: np.ndarray, metric: str) -> np.ndarray:
    if metric == "object_logprob":
        return scores[:, 0]
    if metric == "object_prob":
        return np.exp(scores[:, 0])
    return scores[:, 1]


def _pad(encs: Sequence[Encoded], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(e.input_ids) for e in encs)
    ids = torch.full((len(encs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encs), T), dtype=torch.long)
    for b, e in enumerate(encs):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[b, : len(e.input_ids)] = 1
    return ids.to(device), mask.to(device)


def resolve_position(position: Position, enc: Encoded, what: str) -> int:
    """Token index of ``position`` (see the module docstring) in one encoded item's prompt."""
    n = enc.answer_start
    if position == "last":
        return n - 1
    if not isinstance(position, (int, np.integer)) or isinstance(position, bool):
        raise RotelabError(f"patch position must be 'last' or an int, got {position!r}")
    p = int(position) + n if position < 0 else int(position)
    if not 0 <= p < n:
        raise RotelabError(f"patch position {position} is outside the {n}-token prompt of {what}")
    return p


# --------------------------------------------------------------------------- models

class ModelCache:
    """Keeps up to ``size`` checkpoints' ``(model, tokenizer)`` loaded (cross-checkpoint patching
    needs two)."""

    def __init__(self, run: Run, size: int = 2, device: str | torch.device | None = None):
        self.run, self.size = run, size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._models: dict[str, tuple[Any, Any]] = {}

    def get(self, checkpoint: str) -> tuple[Any, Any]:
        if checkpoint not in self._models:
            from rotelab.models import load_model

            while len(self._models) >= self.size:
                self._models.pop(next(iter(self._models)))
            path = self.run.checkpoint_dir(checkpoint)
            self._models[checkpoint] = load_model(str(path), self.run.config.model.dtype, self.device)
        return self._models[checkpoint]


# --------------------------------------------------------------------------- items

def match_source_items(source_items: pd.DataFrame, target_items: pd.DataFrame) -> np.ndarray:
    """For each target item, the source item id of the same fact: same ``template_id`` when the
    source has it, else the fact's first source item."""
    by_key = {(str(f), int(t)): int(i) for i, f, t in zip(source_items["item"], source_items["fact_id"], source_items["template_id"])}
    first: dict[str, int] = {}
    for i, f in zip(source_items["item"], source_items["fact_id"]):
        first.setdefault(str(f), int(i))
    out = []
    for f, t in zip(target_items["fact_id"], target_items["template_id"]):
        key = (str(f), int(t))
        if key in by_key:
            out.append(by_key[key])
        elif str(f) in first:
            out.append(first[str(f)])
        else:
            raise RotelabError(f"patching: fact {f!r} has no item in the source kind")
    return np.asarray(out, dtype=np.int64)


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


# --------------------------------------------------------------------------- the API

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
    """Patch ``source=(checkpoint, kind)`` hidden states into ``target=(checkpoint, kind)``.

    ``layers``: store layers (0 = embeddings … n_blocks; None = all); ``position``: one position or
    a list (a sweep); ``items``: target item ids (None = all of the target kind). Returns the tidy
    table :data:`PATCHING_COLUMNS` (one row per layer × position × item) and, with ``store``,
    merges it into the store table ``patching``. See the module docstring for the conventions.
    """
    from tqdm.auto import tqdm

    if metric not in METRICS:
        raise RotelabError(f"unknown patching metric {metric!r} ({', '.join(METRICS)})")
    (s_ckpt, s_kind), (t_ckpt, t_kind) = source, target
    positions: list[Position] = list(position) if isinstance(position, (list, tuple)) else [position]  # type: ignore[arg-type]
    if not positions:
        raise RotelabError("patching: no positions given")
    t_items = run.items(t_kind)
    s_items = run.items(s_kind)
    if items is not None:
        want = [int(i) for i in items]
        unknown = sorted(set(want) - set(int(i) for i in t_items["item"]))
        if unknown:
            raise RotelabError(f"patching: target kind {t_kind!r} has no item {unknown[0]}")
        t_items = t_items.set_index("item", drop=False).loc[want].reset_index(drop=True)
    if t_items.empty:
        raise RotelabError(f"patching: no target items of kind {t_kind!r}")
    src_ids = match_source_items(s_items, t_items)
    s_rows = s_items.set_index("item", drop=False).loc[src_ids].reset_index(drop=True)

    cache = models or ModelCache(run, device=device)
    s_model, s_tok = cache.get(s_ckpt)
    t_model, t_tok = cache.get(t_ckpt)
    L = n_layers(t_model)
    if n_layers(s_model) != L:
        raise RotelabError(f"patching: {s_ckpt!r} and {t_ckpt!r} have different numbers of layers")
    lays = list(range(L + 1)) if layers is None else [int(v) for v in layers]
    bad = [v for v in lays if not 0 <= v <= L]
    if bad:
        raise RotelabError(f"patching: layer {bad[0]} out of range (0..{L}; 0 = embeddings)")

    s_enc = [encode(s_tok, t, o) for t, o in zip(s_rows["text"], s_rows["object"])]
    t_enc = [encode(t_tok, t, o) for t, o in zip(t_items["text"], t_items["object"])]
    s_pos = np.array([[resolve_position(p, e, f"{s_kind} item {i}") for p in positions] for e, i in zip(s_enc, s_rows["item"])])
    t_pos = np.array([[resolve_position(p, e, f"{t_kind} item {i}") for p in positions] for e, i in zip(t_enc, t_items["item"])])
    dev = next(t_model.parameters()).device
    s_dev = next(s_model.parameters()).device
    pad_s = s_tok.pad_token_id if s_tok.pad_token_id is not None else 0
    pad_t = t_tok.pad_token_id if t_tok.pad_token_id is not None else 0

    records: list[dict[str, Any]] = []
    batches = [list(range(a, min(a + batch_size, len(t_enc)))) for a in range(0, len(t_enc), batch_size)]
    bar = tqdm(total=len(batches) * len(lays) * len(positions), desc=f"patch {s_ckpt}:{s_kind} → {t_ckpt}:{t_kind}",
               disable=not progress)
    for bidx in batches:
        se = [s_enc[i] for i in bidx]
        te = [t_enc[i] for i in bidx]
        s_ids, s_mask = _pad(se, pad_s, s_dev)
        t_ids, t_mask = _pad(te, pad_t, dev)
        states, s_logits = hidden_states_at(s_model, s_ids, s_mask, lays, torch.as_tensor(s_pos[bidx], device=s_dev))
        clean = _metric(answer_scores(s_logits, se), metric)
        with torch.no_grad():
            t_logits = t_model(input_ids=t_ids, attention_mask=t_mask).logits
        corrupted = _metric(answer_scores(t_logits, te), metric)
        for v in lays:
            for pi, p in enumerate(positions):
                logits = patched_forward(t_model, t_ids, t_mask, v, torch.as_tensor(t_pos[bidx, pi], device=dev), states[v][:, pi])
                patched = _metric(answer_scores(logits, te), metric)
                for j, i in enumerate(bidx):
                    denom = clean[j] - corrupted[j]
                    eff = patched[j] - corrupted[j]
                    records.append({
                        "source_checkpoint": s_ckpt, "source_kind": s_kind, "target_checkpoint": t_ckpt,
                        "target_kind": t_kind, "layer": v, "position": str(p), "item": int(t_items["item"].iat[i]),
                        "metric": metric, "source_item": int(src_ids[i]), "fact_id": str(t_items["fact_id"].iat[i]),
                        "relation": str(t_items["relation"].iat[i]), "template_id": int(t_items["template_id"].iat[i]),
                        "split": str(t_items["split"].iat[i]), "clean": float(clean[j]), "corrupted": float(corrupted[j]),
                        "patched": float(patched[j]), "effect": float(eff),
                        "normalized": float(eff / denom) if abs(denom) > 1e-9 else math.nan,
                    })
                bar.update(1)
    bar.close()
    df = pd.DataFrame.from_records(records, columns=list(PATCHING_COLUMNS))
    if store:
        store_patching(run, df)
    return df


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
    "match_source_items", "n_layers", "patch", "patched_forward", "resolve_position", "sample_items", "store_patching",
]
