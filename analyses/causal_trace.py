"""Causal tracing over the checkpoint series (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT" §2.1, ROME), issue 16 item 2.

Definition, per item (one prompt of one fact) at one checkpoint:

* **clean** — the object probability of the unmodified forward (metric :func:`object_prob` of
  :mod:`.interventions`: the joint probability of the object tokens, scored with the answer in the
  sequence, as the patching sweep does).
* **corrupted** — the same forward with Gaussian noise added to the embedding output (site
  ``resid[0]``) at every subject token: ``ν · z`` with ``z ~ N(0, 1)`` [subject tokens, hidden]
  drawn once per item from a generator seeded by ``(seed, fact_id, template_id)`` — the same draw for
  the corrupted and every restored run and at every checkpoint — and ``ν = noise_scale · σ``,
  ``noise_scale = 3`` (ROME's 3σ), ``σ`` the standard deviation of the entries of this checkpoint's
  input-embedding rows of all subject tokens of the traced items (ROME: the empirical std of subject
  embeddings; per checkpoint because training moves the embeddings).
* **restored** — the corrupted forward with the clean state of one site (``resid[v]``, :mod:`rotelab.
  probe.sites` numbering: 0 = embedding output, v = output of block v) at one position written back.
* **effect** — ``(restored − corrupted) / (clean − corrupted)``: 1 = restoring this state alone
  recovers the clean prediction, 0 = it recovers nothing. Where the corruption changed nothing
  (``|clean − corrupted| ≤ 1e-12``, e.g. zero noise) the effect is 1 if the restored value equals the
  clean one within the same bound (nothing was lost, so nothing is missing) and NaN otherwise.
  ROME averages over 10 noise draws; ``samples`` (default 1) draws are averaged per cell here
  (clean/corrupted/restored are the means over draws, the effect is computed from the means).

Positions (:data:`POSITIONS`): ``subject_last`` (the subject's last token), ``key`` (the key token:
the relation's key token in the prompt; only kinds whose prompts contain it, e.g. ``key``), ``last``
(the last prompt token). ``all`` (every prompt token) is accepted for checks: restoring ``all`` at
layer 0 is the clean forward. Kinds whose prompts contain the subject more than once (ICL) are
refused: which occurrence to corrupt would be a silent choice.

Batching: the cells of one item are rows of one batch (the same token sequence, so no padding): a
forward computes the clean row, the corrupted row and up to ``rows_per_forward − 2`` restored cells,
so the cost per cell is about one row of a batched forward rather than one forward (benchmark:
``benchmarks/bench_causal_trace.py``).

The table ``causal_trace`` (:data:`CAUSAL_TRACE_COLUMNS`): one row per checkpoint × kind × item ×
site × position. :func:`causal_trace_run` is the stage step of ``rotelab analyze``
(``analyses.causal_trace``): the stage checkpoints (base, last phase 1, last phase 2) by default, a
seeded sample of facts per relation and split; it computes only the (checkpoint, kind) units the
table lacks.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from rotelab.errors import RotelabError
from rotelab.probe.sites import ModelSites, resid
from rotelab.tokenization import Encoded, encode

from .interventions import Metric, object_prob

if TYPE_CHECKING:
    from rotelab.run import Run

POSITIONS = ("subject_last", "key", "last")
CAUSAL_TRACE_COLUMNS = ("checkpoint", "kind", "item", "fact_id", "relation", "split", "site", "layer", "position",
                        "clean", "corrupted", "restored", "effect")
_KEY = ("checkpoint", "kind", "item", "site", "position")
_SAME = 1e-12


@dataclass(frozen=True)
class TraceItem:
    """One prompt to trace: its encoding, the subject's token indices and the label → token indices
    of each position traced."""

    enc: Encoded
    subject: tuple[int, ...]
    positions: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class ItemTrace:
    """The result for one item: ``clean``, ``corrupted`` (floats) and ``restored`` float64 [layer, position]
    (rows in the ``layers`` order, columns in the item's ``positions`` order)."""

    clean: float
    corrupted: float
    restored: np.ndarray


def effect(clean: np.ndarray | float, corrupted: np.ndarray | float, restored: np.ndarray | float) -> np.ndarray:
    """``(restored − corrupted) / (clean − corrupted)`` with the zero-corruption rule of the module docstring."""
    clean, corrupted, restored = (np.asarray(x, dtype=np.float64) for x in (clean, corrupted, restored))
    denom = clean - corrupted
    lost = np.abs(denom) > _SAME
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (restored - corrupted) / np.where(lost, denom, 1.0)
    same = np.where(np.abs(restored - clean) <= _SAME, 1.0, np.nan)
    return np.where(lost, ratio, same)


def item_positions(enc: Encoded, key_token_id: int | None, positions: Sequence[str], what: str) -> dict[str, tuple[int, ...]]:
    """Token indices of each position label in one encoded prompt (labels that do not apply — ``key``
    in a prompt without the key token — are left out)."""
    n = enc.answer_start
    out: dict[str, tuple[int, ...]] = {}
    for p in positions:
        if p == "subject_last":
            if not enc.subject_tokens:
                raise RotelabError(f"causal tracing: no subject tokens in {what}")
            out[p] = (max(enc.subject_tokens),)
        elif p == "key":
            hits = [i for i, t in enumerate(enc.prompt_ids) if key_token_id is not None and t == key_token_id]
            if hits:
                out[p] = (hits[-1],)
        elif p == "last":
            out[p] = (n - 1,)
        elif p == "all":
            out[p] = tuple(range(n))
        else:
            raise RotelabError(f"causal tracing: unknown position {p!r} ({', '.join((*POSITIONS, 'all'))})")
    return out


def _forward_rows(
    sites: ModelSites,
    ids: torch.Tensor,
    subject: torch.Tensor,
    noise: torch.Tensor,
    restores: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Logits [rows, seq, vocab] of ``ids`` [rows, seq]; row 0 is the clean run. ``noise`` [rows,
    n_subject, hidden] is added to ``resid[0]`` at the ``subject`` tokens (row 0's noise must be 0);
    then, per layer ``v`` of ``restores`` ``(row index [m], token index [m])``, those rows' states at
    those tokens are overwritten with row 0's (the clean state of the same forward)."""
    w = sites.wrapped_model
    with torch.no_grad():
        with w.nn.trace(input_ids=ids):
            for v in sorted(set(restores) | {0}):
                h = w.value(resid(v))
                if v == 0:
                    h[:, subject] = h[:, subject] + noise.to(h.dtype)
                if v in restores:
                    r, t = restores[v]
                    h[r, t] = h[0, t]
            logits = w.nn.output.logits.save()
    return logits


def trace_item(
    sites: ModelSites,
    item: TraceItem,
    layers: Sequence[int],
    noise: torch.Tensor,
    *,
    metric: Metric = object_prob,
    rows_per_forward: int = 64,
) -> ItemTrace:
    """Clean, corrupted and restored metric of one item for every ``layers`` × position cell.

    ``noise``: [samples, n_subject, hidden], already scaled (ν · z); the results are means over
    samples. Each forward is ``[clean, corrupted, cell…]`` of the same sequence; a restored cell
    copies the clean row's state of that forward, so restoring every position at layer 0 *is* the
    clean row.
    """
    if rows_per_forward < 3:
        raise RotelabError("causal tracing: rows_per_forward must be at least 3")
    dev = sites.device
    ids1 = torch.tensor([item.enc.input_ids], device=dev)
    subject = torch.tensor(item.subject, device=dev)
    labels = list(item.positions)
    cells = [(v, item.positions[p]) for v in layers for p in labels]
    per_forward = rows_per_forward - 2
    samples = noise.shape[0]
    restored = np.zeros(len(cells))
    clean = corrupted = 0.0
    for s in range(samples):
        for c0 in range(0, max(len(cells), 1), per_forward):
            part = cells[c0 : c0 + per_forward]
            rows = 2 + len(part)  # row 0 clean, row 1 corrupted, then one row per cell
            restores: dict[int, list[tuple[int, int]]] = {}
            for j, (v, toks) in enumerate(part):
                restores.setdefault(v, []).extend((2 + j, t) for t in toks)
            idx = {v: (torch.tensor([r for r, _ in rt], device=dev), torch.tensor([t for _, t in rt], device=dev))
                   for v, rt in restores.items()}
            row_noise = noise[s][None].expand(rows, -1, -1).clone().to(dev)
            row_noise[0] = 0.0  # the clean row
            logits = _forward_rows(sites, ids1.expand(rows, -1), subject, row_noise, idx)
            vals = np.asarray(metric(logits, [item.enc] * rows), dtype=np.float64)
            if c0 == 0:
                clean += vals[0] / samples
                corrupted += vals[1] / samples
            restored[c0 : c0 + len(part)] += vals[2:] / samples
    return ItemTrace(float(clean), float(corrupted), restored.reshape(len(layers), len(labels)))


def subject_noise_std(model: torch.nn.Module, items: Sequence[TraceItem]) -> float:
    """σ: the std of the entries of the input-embedding rows of every subject token of ``items``."""
    emb = model.get_input_embeddings().weight
    toks = sorted({item.enc.input_ids[i] for item in items for i in item.subject})
    if not toks:
        raise RotelabError("causal tracing: no subject tokens to estimate the noise scale from")
    return float(emb[torch.tensor(toks, device=emb.device)].detach().float().std())


def item_noise(seed: int, fact_id: str, template_id: int, n_subject: int, hidden: int, samples: int) -> torch.Tensor:
    """z ~ N(0, 1) [samples, n_subject, hidden] seeded by ``(seed, fact_id, template_id)`` (float32, CPU)."""
    key = zlib.crc32(f"{seed}/{fact_id}/{template_id}".encode())
    g = torch.Generator().manual_seed(key)
    return torch.randn((samples, n_subject, hidden), generator=g, dtype=torch.float32)


def trace_items(
    run: Run,
    checkpoint: str,
    kind: str,
    item_ids: Sequence[int],
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    layers: Sequence[int] | None = None,
    positions: Sequence[str] = POSITIONS,
    noise_scale: float = 3.0,
    samples: int = 1,
    seed: int = 0,
    rows_per_forward: int = 64,
    progress: bool = False,
) -> pd.DataFrame:
    """Causal trace of ``item_ids`` of ``kind`` under an already loaded checkpoint model; returns
    :data:`CAUSAL_TRACE_COLUMNS` (rows item → layer → position)."""
    from tqdm.auto import tqdm

    sites = ModelSites(model)
    layers = list(range(sites.n_layers + 1)) if layers is None else [int(v) for v in layers]
    bad = [v for v in layers if not 0 <= v <= sites.n_layers]
    if bad:
        raise RotelabError(f"causal tracing: layer {bad[0]} out of range (0..{sites.n_layers}; 0 = embeddings)")
    table = run.items(kind).set_index("item", drop=False)
    facts = {f.id: f for f in run.facts}
    key_ids = {r: tokenizer.convert_tokens_to_ids(t) for r, t in run.key_tokens().items()}
    traced: list[tuple[pd.Series, TraceItem]] = []
    for i in item_ids:
        row = table.loc[int(i)]
        subj = facts[str(row["fact_id"])].subject
        what = f"{kind} item {int(i)}"
        if str(row["text"]).count(subj) != 1:
            raise RotelabError(f"causal tracing: the subject {subj!r} occurs {str(row['text']).count(subj)} times in {what}; "
                               "trace kinds with one subject mention (key, train, test, translated)")
        enc = encode(tokenizer, str(row["text"]), str(row["object"]), subj)
        traced.append((row, TraceItem(enc, tuple(enc.subject_tokens), item_positions(enc, key_ids.get(str(row["relation"])), positions, what))))
    if noise_scale < 0:
        raise RotelabError("causal tracing: noise_scale must be ≥ 0")
    nu = noise_scale * subject_noise_std(model, [t for _, t in traced]) if traced else 0.0
    frames = []
    for row, item in tqdm(traced, desc=f"causal trace {checkpoint}:{kind}", disable=not progress):
        z = item_noise(seed, str(row["fact_id"]), int(row["template_id"]), len(item.subject), sites.hidden, samples)
        res = trace_item(sites, item, layers, nu * z, rows_per_forward=rows_per_forward)
        labels = list(item.positions)
        n = len(layers) * len(labels)
        frames.append(pd.DataFrame({
            "checkpoint": checkpoint, "kind": kind, "item": int(row["item"]), "fact_id": str(row["fact_id"]),
            "relation": str(row["relation"]), "split": str(row["split"]),
            "site": [f"resid[{v}]" for v in layers for _ in labels], "layer": np.repeat(np.asarray(layers, dtype=np.int64), len(labels)),
            "position": labels * len(layers), "clean": np.full(n, res.clean), "corrupted": np.full(n, res.corrupted),
            "restored": res.restored.reshape(-1), "effect": effect(res.clean, res.corrupted, res.restored.reshape(-1)),
        }, columns=list(CAUSAL_TRACE_COLUMNS)))
    if not frames:
        return pd.DataFrame(columns=list(CAUSAL_TRACE_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def merge_table(old: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` rows replace ``old`` rows with the same (checkpoint, kind, item, site, position)."""
    if old is None or not len(old):
        return new.reset_index(drop=True)
    keys = list(_KEY)
    keep = ~pd.MultiIndex.from_frame(old[keys].astype(str)).isin(pd.MultiIndex.from_frame(new[keys].astype(str)))
    return pd.concat([old[keep][list(CAUSAL_TRACE_COLUMNS)], new], ignore_index=True)


def causal_trace_run(run: Run, *, progress: bool = True, note: Callable[[str], None] = print) -> pd.DataFrame | None:
    """The ``analyses.causal_trace`` step: trace the configured checkpoints × kinds × sampled items,
    skipping (checkpoint, kind) units whose sampled items are all in the store table already; returns
    the table (None when disabled)."""
    from rotelab.models import load_model
    from rotelab.store import Store

    from ._common import stage_checkpoints
    from .patching import sample_items

    cfg = run.config.analyses.causal_trace
    if not cfg.enabled:
        return None
    store = Store.open(run.store_path, fingerprint=run.fingerprint())
    ckpts = cfg.checkpoints or list(dict.fromkeys(stage_checkpoints(run).values()))
    known = {e.id for e in run.checkpoints()}
    missing = [c for c in ckpts if c not in known]
    if missing:
        raise RotelabError(f"{run.config_path}: analyses.causal_trace.checkpoints: no checkpoint {missing[0]!r}")
    kinds = [k for k in cfg.kinds if k in run.kinds()]
    table = store.read_table("causal_trace")
    done = set() if table is None else {(str(c), str(k), int(i)) for c, k, i in zip(table["checkpoint"], table["kind"], table["item"])}
    for ckpt in ckpts:
        todo = {}
        for kind in kinds:
            items = run.items(kind)
            picked: list[int] = []
            for split in sorted(set(items["split"])):
                picked += sample_items(items, cfg.facts_per_relation, split=split, seed=run.config.seed)
            picked = sorted(set(picked))
            if any((ckpt, kind, i) not in done for i in picked):
                todo[kind] = picked
        if not todo:
            continue
        model, tok = load_model(str(run.checkpoint_dir(ckpt)), run.config.model.dtype)
        for kind, picked in todo.items():
            df = trace_items(run, ckpt, kind, picked, model=model, tokenizer=tok, layers=cfg.layers, positions=cfg.positions,
                             noise_scale=cfg.noise_scale, samples=cfg.samples, seed=run.config.seed, progress=progress)
            table = merge_table(store.read_table("causal_trace"), df)
            store.write_table("causal_trace", table)
            note(f"causal trace {ckpt}:{kind}: {len(picked)} items × {df['site'].nunique()} sites × {df['position'].nunique()} positions")
    return store.read_table("causal_trace")


__all__ = ["CAUSAL_TRACE_COLUMNS", "POSITIONS", "ItemTrace", "TraceItem", "causal_trace_run", "effect", "item_noise",
           "item_positions", "merge_table", "subject_noise_std", "trace_item", "trace_items"]
