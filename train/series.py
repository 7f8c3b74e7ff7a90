"""Writing the checkpoint series: atomic checkpoint folders, the index and its extra fields, and
dropping weights (``train.keep_weights``).

Order of a save (every crash point leaves the index listing only complete checkpoints):
``.resume/<stage>/<id>`` (DeepSpeed state) → ``.tmp-<id>`` → rename to ``<id>`` → index entry →
older resume states and dropped weights removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rotelab.checkpoints import CheckpointEntry, read_index, verify_weights, weights_sha256, write_index
from rotelab.errors import RotelabError
from rotelab.run import Run

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_extra(run: Run) -> dict[str, Any]:
    """The index's fields besides ``checkpoints`` (``model``, ``key_token_ids``, ``phase1_key``,
    ``phase2_start``)."""
    if not run.index_path.is_file():
        return {}
    try:
        data = json.loads(run.index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RotelabError(f"{run.index_path}: not a valid checkpoint index ({err})") from None
    return {k: v for k, v in data.items() if k != "checkpoints"}


def update_index(run: Run, entries: list[CheckpointEntry] | None = None, **extra: Any) -> None:
    """Rewrite the index atomically with ``entries`` (default: unchanged) and updated extras."""
    cur = read_extra(run)
    cur.update(extra)
    write_index(run.index_path, read_index(run.index_path) if entries is None else entries, cur)


def save_weights(module, tokenizer, out_dir: Path, dtype: str, state_dict: dict | None = None) -> None:
    """``save_pretrained`` (safetensors) of the model in ``dtype`` and of the tokenizer into ``out_dir``."""
    sd = state_dict if state_dict is not None else module.state_dict()
    sd = {k: v.detach().to("cpu", _DTYPES[dtype]) for k, v in sd.items()}
    module.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(out_dir)


def write_checkpoint_folder(run: Run, ckpt_id: str, write) -> tuple[str, str]:
    """Run ``write(tmp_dir)`` into ``checkpoints/.tmp-<id>`` and rename it to ``checkpoints/<id>``.

    Returns the path relative to the run and the folder's :func:`weights_sha256` (for the index
    entry). A failure (e.g. a full disk) removes the temporary folder and raises a one-line
    :class:`RotelabError`; nothing already listed is touched.
    """
    run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    tmp = run.checkpoints_dir / f".tmp-{ckpt_id}"
    final = run.checkpoints_dir / ckpt_id
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        write(tmp)
        verify_weights(tmp, ckpt_id)  # a writer that swallowed a short write is caught here
        sha = weights_sha256(tmp)
    except (OSError, RuntimeError, RotelabError) as err:
        why = write_failure(err, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise RotelabError(f"{final}: cannot save checkpoint {ckpt_id!r} ({why}); existing checkpoints are untouched") from None
    if final.is_symlink():
        final.unlink()
    elif final.exists():  # left over by a killed run, never listed in the index
        shutil.rmtree(final)
    os.replace(tmp, final)
    return str(final.relative_to(run.root)), sha


def write_failure(err: BaseException, where: Path) -> str:
    """A short reason for a failed write under ``where``: ``disk full`` for ENOSPC, also when a
    library wrapped it in another error (torch's writer raises a RuntimeError about positions):
    then the free space of ``where``'s file system tells; else the error's first line."""
    msg = str(err)
    if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in msg:
        return "disk full"
    try:
        free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
    except (OSError, StopIteration):
        free = None
    if free is not None and free < 16 << 20:
        return f"disk full: {free >> 10} KiB free"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return (msg.splitlines()[0] if msg else type(err).__name__)[:200]


def verify_last_points(run: Run) -> None:
    """Verify (size and recorded sha256) the last listed point with weights of every series:
    what a finished train would otherwise report as done without looking at it."""
    last: dict[str, CheckpointEntry] = {}
    for e in read_index(run.index_path):
        if e.path is not None:
            last[e.series] = e
    for e in last.values():
        verify_weights(run.root / e.path, e.id, e.sha256)


def append_entry(run: Run, entry: CheckpointEntry) -> None:
    entries = [e for e in read_index(run.index_path) if e.id != entry.id]
    update_index(run, entries + [entry])


def linked_by_siblings(run: Run) -> set[str]:
    """Names of ``run``'s checkpoint folders that another run in the same runs folder links to
    (sweep siblings share phase 1 through symlinks, :func:`rotelab.train.pipeline.import_phase1`).
    Siblings always live in one runs folder (``rotelab run`` puts them there); a run linked from
    elsewhere is not seen."""
    mine = run.checkpoints_dir.resolve()
    me = run.root.resolve()
    used: set[str] = set()
    try:
        others = [p for p in run.root.parent.iterdir() if p.is_dir() and p.resolve() != me]
    except OSError:
        return used
    for other in others:
        ck = other / "checkpoints"
        if not ck.is_dir():
            continue
        for link in ck.iterdir():
            if link.is_symlink():
                target = link.resolve()
                if target.parent == mine:
                    used.add(target.name)
    return used


def prune_weights(run: Run, keep: str | int, protected: set[str]) -> list[str]:
    """Drop the weights ``train.keep_weights`` does not keep; returns the ids dropped.

    Always kept: ``base``, the ids in ``protected`` (e.g. the phase-2 start point) and the latest
    point of every (series, phase) group. ``all`` keeps everything; an int ``n`` keeps every n-th
    point of each group (1-based); ``latest`` keeps only the always-kept ones; ``final`` keeps
    ``base``, ``protected`` and the last point of every series (not of every phase). Imported points
    (symlinked folders) are never dropped, nor are folders a sibling run links to
    (:func:`linked_by_siblings`). The index is rewritten (``path: null``) before the folder is
    removed.
    """
    if keep == "all":
        return []
    shared = linked_by_siblings(run)
    entries = read_index(run.index_path)
    groups: dict[tuple[str, str], list[CheckpointEntry]] = {}
    for e in entries:
        groups.setdefault((e.series, "" if keep == "final" else e.phase), []).append(e)
    drop: set[str] = set()
    for group in groups.values():
        for i, e in enumerate(group, start=1):
            if e.path is None or e.id == "base" or e.id in protected or e is group[-1]:
                continue
            if (run.root / e.path).is_symlink() or Path(e.path).name in shared:
                continue
            if isinstance(keep, int) and i % keep == 0:
                continue
            drop.add(e.id)
    if not drop:
        return []
    update_index(run, [replace(e, path=None) if e.id in drop else e for e in entries])
    for e in entries:
        if e.id in drop and e.path is not None:
            shutil.rmtree(run.root / e.path, ignore_errors=True)
    return sorted(drop)
