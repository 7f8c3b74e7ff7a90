"""A synthetic run for the browser's tests, snapshots and benchmark — no model needed.

:func:`make_demo_run` writes a real run directory (config, data, ``checkpoints/index.json``) and a
store through the Store API with random but structured data: projections whose relation clusters
separate over the checkpoints, ΔCosSim rising with training, metrics, generations, and the
``alignment`` and ``patching`` tables. ``missing`` leaves chosen cells uncommitted, like a run that
is still being captured.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rotelab.checkpoints import CheckpointEntry, write_index
from rotelab.config import Config, DataConfig, Phase1Config, Phase2Config
from rotelab.run import Run
from rotelab.store import KindGroup, Store


@dataclass
class DemoSpec:
    """What :func:`make_demo_run` writes."""

    relations: tuple[str, ...] = ("capital", "author", "mother")
    facts_per_relation: int = 5
    templates_per_kind: int | None = 2
    languages: tuple[str, ...] = ("de",)
    phase1_epochs: int = 3
    phase2_epochs: int = 2
    k: int = 2
    layers: int = 3
    kinds: tuple[str, ...] | None = ("zero", "key", "train", "test", "unrelated", "translated-de")
    methods: tuple[str, ...] = ("pca", "umap")
    umap_kinds: tuple[str, ...] | None = ("key", "train")
    """Kinds that get UMAP projections (None: all) — fewer writes keep the fixture fast."""
    joint: bool = True
    metrics: bool = True
    tables: bool = True
    cellwise: bool = True
    """Write projections slab by slab (lets ``missing_slabs`` stay uncommitted); False writes each
    array at once (fast, for the benchmark)."""
    missing_slabs: Sequence[tuple[str, int]] = ()
    """(checkpoint id, layer) projection slabs left uncommitted in every kind."""
    missing_metrics: Sequence[str] = ()
    """Checkpoint ids whose metrics are not written (evaluation still running)."""
    seed: int = 0
    extra: dict = field(default_factory=dict)


def checkpoint_ids(spec: DemoSpec) -> list[CheckpointEntry]:
    out = [CheckpointEntry("base", "base", 0.0, 0, 0, None, None)]
    for e in range(1, spec.phase1_epochs + 1):
        out.append(CheckpointEntry(f"p1-e{e:02d}", "phase1", float(e), 10 * e, 1000 * e, 2.0 / e, None))
    for e in range(1, spec.phase2_epochs + 1):
        out.append(CheckpointEntry(f"p2-e{e:02d}", "phase2", float(e), 100 + 5 * e, 50_000 + 500 * e, 1.0 / (e + 1), None))
    return out


def _config(name: str, spec: DemoSpec) -> Config:
    return Config(
        name=name,
        seed=spec.seed,
        data=DataConfig(
            relations=list(spec.relations),
            facts_per_relation=spec.facts_per_relation,
            distractors=20,
            languages=list(spec.languages),
            templates_per_kind=spec.templates_per_kind,
        ),
        phase1=Phase1Config(epochs=spec.phase1_epochs),
        phase2=Phase2Config(k=spec.k, epochs=spec.phase2_epochs),
    )


def _projection(rng: np.random.Generator, rel_idx: np.ndarray, n_rel: int, progress: float, layer_frac: float) -> np.ndarray:
    """float32 [item, 2]: relation clusters whose separation grows with training and depth."""
    angles = 2 * np.pi * np.arange(n_rel) / max(1, n_rel)
    centers = np.stack([np.cos(angles), np.sin(angles)], axis=1) * (0.3 + 3.0 * progress * (0.4 + layer_frac))
    return (centers[rel_idx] + rng.standard_normal((len(rel_idx), 2))).astype(np.float32)


def make_demo_run(root: str | Path, spec: DemoSpec | None = None) -> Run:
    """Write a synthetic run at ``root`` (created; an existing run there is reused) and return it."""
    spec = spec or DemoSpec()
    root = Path(root)
    run = Run.create(_config(root.name, spec), root)
    entries = checkpoint_ids(spec)
    write_index(run.index_path, entries)
    ids = [e.id for e in entries]
    nc = len(ids)
    layers = list(range(spec.layers + 1))
    store = Store.open(run.store_path, fingerprint=run.fingerprint())
    rng = np.random.default_rng(spec.seed)
    kinds = [k for k in run.kinds() if spec.kinds is None or k in spec.kinds]
    missing = {(c, int(l)) for c, l in spec.missing_slabs}
    groups: dict[str, KindGroup] = {}
    for kind in kinds:
        items = run.items(kind)
        g = groups[kind] = store.ensure_kind(kind, checkpoints=ids, layers=layers, items=items)
        rels = sorted(set(items["relation"]))
        rel_idx = np.array([rels.index(r) for r in items["relation"]])
        n = len(items)
        # ΔCosSim: rises over checkpoints and layers
        prog = np.linspace(0.0, 1.0, nc)[:, None]
        lf = np.linspace(0.0, 1.0, len(layers))[None, :]
        dcs = (0.05 + 0.2 * prog * (0.5 + lf) + 0.01 * rng.standard_normal((nc, len(layers)))).astype(np.float32)
        g.write_derived("delta_cossim", ("checkpoint", "layer"), dcs)
        for method in spec.methods:
            if method == "umap" and spec.umap_kinds is not None and kind not in spec.umap_kinds:
                continue
            for name in [f"proj_{method}"] + ([f"proj_{method}_joint"] if spec.joint else []):
                data = np.stack([
                    np.stack([_projection(rng, rel_idx, len(rels), ci / max(1, nc - 1), li / max(1, len(layers) - 1))
                              for li in range(len(layers))])
                    for ci in range(nc)
                ])  # [checkpoint, layer, item, 2]
                if not spec.cellwise and not missing:
                    g.write_derived(name, ("checkpoint", "layer", "item", "component"), data)
                    continue
                dims = ("checkpoint", "layer", "item", "component")
                for ci, c in enumerate(ids):
                    if not any((c, layer) in missing for layer in layers):
                        g.write_derived(name, dims, data[ci], index={"checkpoint": c})
                        continue
                    for li, layer in enumerate(layers):
                        if (c, layer) not in missing:
                            g.write_derived(name, dims, data[ci, li], index={"checkpoint": c, "layer": layer})
        if spec.metrics:
            train = (items["split"] == "train").to_numpy()
            for ci, c in enumerate(ids):
                if c in spec.missing_metrics:
                    continue
                p = np.clip(rng.beta(2, 5, n) * (0.3 + 0.7 * ci / max(1, nc - 1)) + 0.2 * train, 0, 1).astype(np.float32)
                if kind in ("unrelated", "zero"):
                    p = p * 0.05
                mc = (rng.random(n) < p + 0.1).astype(np.float32)
                gen = (rng.random(n) < p).astype(np.float32)
                text = np.where(gen > 0, items["object"].to_numpy(), "something else")
                g.write_item_arrays(c, {"object_prob": p, "mc_correct": mc, "gen_correct": gen, "gen_text": text.astype(str)})
    if spec.tables:
        _write_tables(store, run, ids, layers, kinds, rng)
    return run


def _write_tables(store: Store, run: Run, ids: list[str], layers: list[int], kinds: Iterable[str], rng: np.random.Generator) -> None:
    """``alignment`` and ``patching`` in the analyses' tidy schemas (see rotelab.analyses)."""
    rows = []
    prompt_kinds = [k for k in kinds if k not in ("key", "zero", "icl", "reverse")]
    for ci, c in enumerate(ids):
        for layer in layers:
            for rel in run.config.data.relations:
                for k in prompt_kinds:
                    base = 0.2 + (0.4 * ci / max(1, len(ids) - 1) if k != "unrelated" else 0.02 * ci)
                    for split in ("all", "train", "heldout"):
                        cos = float(base + 0.03 * rng.standard_normal())
                        rows.append((c, layer, rel, k, split, 3, cos))
    align = pd.DataFrame(rows, columns=["checkpoint", "layer", "relation", "kind", "split", "n", "cosine"])
    ref = align[align["checkpoint"] == ids[-1]].set_index(["layer", "relation", "kind", "split"])["cosine"]
    align["reference"] = [float(ref.get((r.layer, r.relation, r.kind, r.split), np.nan)) for r in align.itertuples()]
    align["delta"] = align["cosine"] - align["reference"]
    store.write_table("alignment", align)
    prow = []
    for c in ids:
        for layer in layers:
            for item in range(3):
                eff = float(layer / max(1, layers[-1]) * 0.8 + 0.1 * rng.standard_normal())
                prow.append((c, "key", c, "test", layer, "last", item, "object_logprob", f"f{item}", -3.0, -5.0, -5.0 + eff, eff))
    cols = ["source_checkpoint", "source_kind", "target_checkpoint", "target_kind", "layer", "position", "item", "metric",
            "fact_id", "clean", "corrupted", "patched", "effect"]
    store.write_table("patching", pd.DataFrame(prow, columns=cols))
