"""The generic intervention sweep: write a source's hidden states into a target's forward pass at a
list of sites × positions, and score every patched forward with a metric callable (in the spirit
of TransformerLens's ``patching.py``: one sweep, the concrete analyses are presets of it —
:mod:`rotelab.analyses.patching`).

* :func:`intervene` — ``source`` (a :class:`StateSource`: any callable producing the states to
  write and the source's own metric; :class:`RunSource` is the clean forward of a checkpoint's
  prompts of one kind), ``target`` (:class:`PromptSet`: checkpoint, kind, items), ``sites``
  (``resid[v]``, :mod:`rotelab.probe.sites`), ``positions`` and ``metric`` → the tidy frame
  :data:`PATCHING_COLUMNS`, built once from arrays.
* Restoring *one* site at *one* position is the sweep with one site and one position; a source
  whose states are not a clean run (e.g. noise added to some embeddings, as causal tracing needs)
  is just another :class:`StateSource`.

Conventions (unchanged from the first patching implementation)
--------------------------------------------------------------
* **Sites** ``resid[v]``: 0 = the embedding output (input of block 0), v = output of block v.
* **Position**: ``"last"`` is the prompt's last token (for the ``key`` kind the key token itself);
  an int ``p >= 0`` is the p-th prompt token, ``p < 0`` counts back from the prompt's end (``-1`` ==
  ``"last"``). It must lie inside the prompt of both the source and the target item.
* **Scoring with the answer in the sequence.** Every forward runs on ``prompt + " " + object``
  (tokenized by :func:`rotelab.tokenization.encode`) and the patch is written at the prompt
  position only: the object tokens come after it, so the first object token is predicted from the
  patched state and later object tokens attend to the patched position's keys/values in the layers
  above the patch — what a prompt-only forward with the patch followed by teacher-forced decoding
  of the object computes. Batches are right-padded by :mod:`rotelab.batching` (real tokens never
  see the padding) in the target items' order.
* **Metrics** (:data:`METRICS`; any callable ``metric(logits [batch, seq, vocab], encoded) →
  float [batch]`` whose ``__name__`` names it in the table): ``object_logprob`` (sum of the object
  tokens' log-probabilities), ``object_prob`` (its exp), ``first_token_logprob``.

Every result row has ``clean`` (the source's metric), ``corrupted`` (the target prompt under the
target model, unpatched), ``patched``, ``effect = patched − corrupted`` and ``normalized = effect /
(clean − corrupted)`` (NaN when ``|clean − corrupted| ≤ 1e-9``).

The nnsight traces are in this file on purpose: nnsight reads the source of the traced block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pandas as pd
import torch

from rotelab.batching import Collator, Padded, pad, pad_id
from rotelab.errors import RotelabError
from rotelab.probe.sites import ModelSites, Site
from rotelab.tokenization import Encoded, encode

if TYPE_CHECKING:
    from rotelab.run import Run

Position = Literal["last"] | int
Metric = Callable[[torch.Tensor, Sequence[Encoded]], np.ndarray]
KEY_COLUMNS = ("source_checkpoint", "source_kind", "target_checkpoint", "target_kind", "layer", "position", "item", "metric")
PATCHING_COLUMNS = (*KEY_COLUMNS, "source_item", "fact_id", "relation", "template_id", "split",
                    "clean", "corrupted", "patched", "effect", "normalized")


# --------------------------------------------------------------------------- traces (nnsight)

def _sites(model: torch.nn.Module | ModelSites) -> ModelSites:
    return model if isinstance(model, ModelSites) else ModelSites(model)


def _position_kw(position_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if position_ids is None else {"position_ids": position_ids}


def hidden_states_at(
    model: torch.nn.Module | ModelSites, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    layers: Sequence[int], positions: torch.Tensor, position_ids: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One forward; returns ``{layer: [batch, n_pos, hidden]}`` (sites ``resid[layer]``) at
    ``positions`` [batch, n_pos] (token indices per row) and the logits [batch, seq, vocab]."""
    w = _sites(model).wrapped_model
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None]
    wanted = sorted(set(int(v) for v in layers))
    saved: dict[int, torch.Tensor] = {}  # filled inside the trace (names bound there do not escape it)
    with torch.no_grad():
        with w.nn.trace(input_ids=input_ids, attention_mask=attention_mask, **_position_kw(position_ids)):
            for v in wanted:
                h = w.value(Site("resid", v))
                saved[v] = h[rows, positions].clone().save()
            logits = w.nn.output.logits.save()
    return {v: saved[v] for v in wanted}, logits


def patched_forward(
    model: torch.nn.Module | ModelSites, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    layer: int, positions: torch.Tensor, states: torch.Tensor, position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward with site ``resid[layer]`` replaced at ``positions`` [batch] (one token index
    per row) by ``states`` [batch, hidden]; returns the logits [batch, seq, vocab]."""
    w = _sites(model).wrapped_model
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    states = states.to(device=input_ids.device)
    with torch.no_grad():
        with w.nn.trace(input_ids=input_ids, attention_mask=attention_mask, **_position_kw(position_ids)):
            h = w.value(Site("resid", int(layer)))
            h[rows, positions] = states.to(h.dtype)
            logits = w.nn.output.logits.save()
    return logits


# --------------------------------------------------------------------------- metrics

def answer_scores(logits: torch.Tensor, encs: Sequence[Encoded]) -> np.ndarray:
    """Per row: ``[object_logprob, first_token_logprob]`` (float64 [batch, 2]) of each encoded
    item's answer tokens, from ``logits`` [batch, seq, vocab] of the right-padded batch."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    out = np.zeros((len(encs), 2))
    for b, e in enumerate(encs):
        tgt = torch.tensor(e.input_ids[e.answer_start:], device=lp.device)
        pos = torch.arange(e.answer_start - 1, len(e.input_ids) - 1, device=lp.device)
        vals = lp[b, pos, tgt].double()
        out[b] = (float(vals.sum()), float(vals[0]))
    return out


def object_logprob(logits: torch.Tensor, encs: Sequence[Encoded]) -> np.ndarray:
    """Sum of the object tokens' log-probabilities, float64 [batch]."""
    return answer_scores(logits, encs)[:, 0]


def object_prob(logits: torch.Tensor, encs: Sequence[Encoded]) -> np.ndarray:
    """Joint probability of the object's tokens (exp of :func:`object_logprob`), float64 [batch]."""
    return np.exp(answer_scores(logits, encs)[:, 0])


def first_token_logprob(logits: torch.Tensor, encs: Sequence[Encoded]) -> np.ndarray:
    """Log-probability of the object's first token, float64 [batch]."""
    return answer_scores(logits, encs)[:, 1]


METRICS: dict[str, Metric] = {f.__name__: f for f in (object_logprob, object_prob, first_token_logprob)}


def metric_fn(metric: str | Metric) -> tuple[str, Metric]:
    """``(name, callable)`` of a metric given by name (:data:`METRICS`) or as a callable."""
    if callable(metric):
        return str(getattr(metric, "__name__", "metric")), metric
    if metric not in METRICS:
        raise RotelabError(f"unknown patching metric {metric!r} ({', '.join(METRICS)})")
    return str(metric), METRICS[metric]


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


# --------------------------------------------------------------------------- models and prompts

class ModelCache:
    """Keeps up to ``size`` checkpoints' ``(model, tokenizer, sites)`` loaded (cross-checkpoint
    patching needs two); each model is wrapped for nnsight once (its :class:`ModelSites`)."""

    def __init__(self, run: Run, size: int = 2, device: str | torch.device | None = None):
        self.run, self.size = run, size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._models: dict[str, tuple[Any, Any, ModelSites]] = {}

    def load(self, checkpoint: str) -> tuple[Any, Any, ModelSites]:
        if checkpoint not in self._models:
            from rotelab.models import load_model

            while len(self._models) >= self.size:
                self._models.pop(next(iter(self._models)))
            path = self.run.checkpoint_dir(checkpoint)
            model, tok = load_model(str(path), self.run.config.model.dtype, self.device)
            self._models[checkpoint] = (model, tok, ModelSites(model))
        return self._models[checkpoint]

    def get(self, checkpoint: str) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of a checkpoint."""
        model, tok, _ = self.load(checkpoint)
        return model, tok


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one side of an intervention: ``kind``'s items (ids; None = all) under
    checkpoint ``checkpoint``."""

    checkpoint: str
    kind: str
    items: Sequence[int] | None = None

    def table(self, run: Run) -> pd.DataFrame:
        """The selected rows of the kind's item table, in the given order."""
        t = run.items(self.kind)
        if self.items is None:
            return t
        want = [int(i) for i in self.items]
        unknown = sorted(set(want) - set(int(i) for i in t["item"]))
        if unknown:
            raise RotelabError(f"patching: target kind {self.kind!r} has no item {unknown[0]}")
        return t.set_index("item", drop=False).loc[want].reset_index(drop=True)


@dataclass(frozen=True)
class SourceStates:
    """What a source gives one target batch: ``states[site]`` [batch, n_pos, hidden] and the
    source's own metric ``clean`` float [batch]."""

    states: dict[Site, torch.Tensor]
    clean: np.ndarray


class StateSource(Protocol):
    """Produces the states written into the target. ``checkpoint``/``kind``/``item_ids``
    ([target item], the source item of each target item) fill the table's source columns."""

    checkpoint: str
    kind: str
    item_ids: np.ndarray

    def __call__(self, rows: Sequence[int], sites: Sequence[Site], positions: Sequence[Position], metric: Metric) -> SourceStates:
        """States at ``sites`` × ``positions`` for the target rows ``rows`` (positions in the
        target table)."""
        ...


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


def _encode_rows(tok: Any, rows: pd.DataFrame) -> list[Encoded]:
    return [encode(tok, t, o) for t, o in zip(rows["text"], rows["object"])]


def _positions(positions: Sequence[Position], encs: Sequence[Encoded], kind: str, ids: Sequence[int]) -> np.ndarray:
    """int [item, n_pos] token index of every position in every item's prompt."""
    return np.array([[resolve_position(p, e, f"{kind} item {i}") for p in positions] for e, i in zip(encs, ids)]).reshape(len(encs), len(positions))


def _padded(encs: Sequence[Encoded], tok: Any, device: torch.device) -> Padded:
    return pad([e.input_ids for e in encs], pad_id(tok), "right").to(device)


class RunSource:
    """The clean forward of the source prompts matched to the target items
    (:func:`match_source_items`) under checkpoint ``checkpoint``."""

    def __init__(self, run: Run, models: ModelCache, checkpoint: str, kind: str, target_items: pd.DataFrame) -> None:
        self.checkpoint, self.kind, self.models = checkpoint, kind, models
        s_items = run.items(kind)
        self.item_ids = match_source_items(s_items, target_items)
        self.rows = s_items.set_index("item", drop=False).loc[self.item_ids].reset_index(drop=True)
        _, tok, self.sites = models.load(checkpoint)
        self.tok = tok
        self.encs = _encode_rows(tok, self.rows)

    def __call__(self, rows: Sequence[int], sites: Sequence[Site], positions: Sequence[Position], metric: Metric) -> SourceStates:
        encs = [self.encs[i] for i in rows]
        pos = _positions(positions, encs, self.kind, [int(self.item_ids[i]) for i in rows])
        batch = _padded(encs, self.tok, self.sites.device)
        layers = [int(s.layer) for s in sites]  # type: ignore[arg-type]
        states, logits = hidden_states_at(self.sites, batch.input_ids, batch.attention_mask, layers,
                                          torch.as_tensor(pos, device=batch.input_ids.device), batch.position_ids)
        return SourceStates({s: states[int(s.layer)] for s in sites}, metric(logits, encs))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the sweep

def intervene(
    run: Run,
    source: StateSource,
    target: PromptSet,
    sites: Sequence[str | Site],
    positions: Sequence[Position],
    metric: str | Metric,
    *,
    models: ModelCache,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Write ``source``'s states at every site × position into ``target``'s forward pass and score
    it; returns :data:`PATCHING_COLUMNS`, rows ordered batch → site → position → item (the target
    items' order within a batch). See the module docstring for the conventions."""
    from tqdm.auto import tqdm

    name, fn = metric_fn(metric)
    if not positions:
        raise RotelabError("patching: no positions given")
    t_items = target.table(run)
    if t_items.empty:
        raise RotelabError(f"patching: no target items of kind {target.kind!r}")
    _, t_tok, t_sites = models.load(target.checkpoint)
    site_list = [t_sites.check(s) for s in sites]
    if any(s.name != "resid" for s in site_list):
        raise RotelabError(f"patching: only resid[v] sites can be patched, got {', '.join(str(s) for s in site_list)}")
    t_enc = _encode_rows(t_tok, t_items)
    t_pos = _positions(positions, t_enc, target.kind, [int(i) for i in t_items["item"]])
    dev = t_sites.device

    n_s, n_p = len(site_list), len(positions)
    collator: Collator[Any] = Collator(len(t_enc), batch_size)
    bar = tqdm(total=len(collator) * n_s * n_p, desc=f"patch {source.checkpoint}:{source.kind} → {target.checkpoint}:{target.kind}",
               disable=not progress)
    order: list[np.ndarray] = []  # per batch: target rows
    clean_b, corr_b, patched_b = [], [], []  # per batch: [b], [b], [site, pos, b]
    for bidx in collator.batches():
        te = [t_enc[i] for i in bidx]
        src = source(bidx, site_list, positions, fn)
        batch = _padded(te, t_tok, dev)
        with torch.no_grad():
            t_logits = t_sites.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     position_ids=batch.position_ids).logits
        patched = np.empty((n_s, n_p, len(bidx)))
        for si, site in enumerate(site_list):
            for pi in range(n_p):
                logits = patched_forward(t_sites, batch.input_ids, batch.attention_mask, int(site.layer),  # type: ignore[arg-type]
                                         torch.as_tensor(t_pos[bidx, pi], device=dev), src.states[site][:, pi], batch.position_ids)
                patched[si, pi] = fn(logits, te)
                bar.update(1)
        order.append(np.asarray(bidx, dtype=np.int64))
        clean_b.append(np.asarray(src.clean, dtype=np.float64))
        corr_b.append(np.asarray(fn(t_logits, te), dtype=np.float64))
        patched_b.append(patched)
    bar.close()
    return _frame(source, target, t_items, site_list, positions, name, order, clean_b, corr_b, patched_b)


def _frame(source: StateSource, target: PromptSet, t_items: pd.DataFrame, sites: Sequence[Site], positions: Sequence[Position],
           metric: str, order: list[np.ndarray], clean: list[np.ndarray], corrupted: list[np.ndarray],
           patched: list[np.ndarray]) -> pd.DataFrame:
    """The tidy table, built once from the per-batch arrays (row order: batch → site → position → item)."""
    n_s, n_p = len(sites), len(positions)
    row = np.concatenate([np.tile(r, n_s * n_p) for r in order]) if order else np.zeros(0, np.int64)
    site_i = np.concatenate([np.repeat(np.arange(n_s), n_p * len(r)) for r in order]) if order else row
    pos_i = np.concatenate([np.tile(np.repeat(np.arange(n_p), len(r)), n_s) for r in order]) if order else row
    cl = np.concatenate([np.tile(c, n_s * n_p) for c in clean]) if order else np.zeros(0)
    co = np.concatenate([np.tile(c, n_s * n_p) for c in corrupted]) if order else np.zeros(0)
    pa = np.concatenate([p.reshape(-1) for p in patched]) if order else np.zeros(0)
    effect = pa - co
    denom = cl - co
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = np.where(np.abs(denom) > 1e-9, effect / np.where(denom == 0, 1.0, denom), np.nan)
    n = len(row)

    def strings(values: Sequence[Any]) -> np.ndarray:
        return np.asarray([str(v) for v in values], dtype=object)

    def const(value: str) -> np.ndarray:
        return np.full(n, value, dtype=object)

    cols = {
        "source_checkpoint": const(source.checkpoint), "source_kind": const(source.kind),
        "target_checkpoint": const(target.checkpoint), "target_kind": const(target.kind),
        "layer": np.asarray([int(s.layer) for s in sites], dtype=np.int64)[site_i],  # type: ignore[arg-type]
        "position": strings(positions)[pos_i] if n else np.zeros(0, dtype=object),
        "item": t_items["item"].to_numpy(dtype=np.int64)[row], "metric": const(metric),
        "source_item": np.asarray(source.item_ids, dtype=np.int64)[row],
        "fact_id": strings(t_items["fact_id"])[row], "relation": strings(t_items["relation"])[row],
        "template_id": t_items["template_id"].to_numpy(dtype=np.int64)[row], "split": strings(t_items["split"])[row],
        "clean": cl, "corrupted": co, "patched": pa, "effect": effect, "normalized": normalized,
    }
    return pd.DataFrame(cols, columns=list(PATCHING_COLUMNS))


__all__ = [
    "KEY_COLUMNS", "METRICS", "PATCHING_COLUMNS", "Metric", "ModelCache", "Position", "PromptSet", "RunSource", "SourceStates",
    "StateSource", "answer_scores", "first_token_logprob", "hidden_states_at", "intervene", "match_source_items",
    "metric_fn", "object_logprob", "object_prob", "patched_forward", "resolve_position",
]
