"""The ordered checkpoint series of a run: ``checkpoints/index.json``.

The trainer appends an entry only after the checkpoint's folder is complete (written to a temporary
folder, then renamed), so the index lists exactly the complete checkpoints. Every later stage reads
the series through :func:`read_index`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from rotelab.errors import RotelabError
from rotelab.facts import atomic_write_text


@dataclass(frozen=True)
class CheckpointEntry:
    """One point of the series. ``path`` is relative to the run; ``None`` once its weights were
    dropped (``train.keep_weights``) — the later stages record what they need first."""

    id: str
    phase: str
    """``base``, ``phase1``, ``phase2`` or a baseline/series name such as ``sft``."""
    epoch: float
    step: int
    tokens_seen: int
    loss: float | None
    path: str | None
    series: str = "main"
    """Which series the point belongs to: ``main`` (base → phase 1 → phase 2 → inject) or a
    baseline (``sft``, ``sft-k``)."""
    total_tokens: int | None = None
    """Training tokens from the base model to this point along its series (``tokens_seen`` counts
    the point's own stage only): phase 1 + phase 2 (+ inject) for ``main``, the baseline's own for
    a baseline — the x-axis of the paper's Fig. 5. A token is one position of a training sequence
    (prompt and answer, BOS included, no padding), counted once per epoch it is trained. ``None`` in
    indexes written before it was recorded."""
    sha256: str | None = None
    """:func:`weights_sha256` of the folder, recorded when it was written (None in older runs):
    the identity of the point, checked before a resumed training trusts it and part of the
    store's fingerprint (via ``base``)."""


def read_index(path: Path) -> list[CheckpointEntry]:
    """The series in order; a missing file is an empty series."""
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [CheckpointEntry(**e) for e in data["checkpoints"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RotelabError(f"{path}: not a valid checkpoint index ({err})") from None


def write_index(path: Path, entries: list[CheckpointEntry], extra: dict | None = None) -> None:
    """Replace the index atomically."""
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise RotelabError(f"{path}: duplicate checkpoint ids")
    data = {"checkpoints": [asdict(e) for e in entries], **(extra or {})}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def weights_sha256(folder: Path) -> str:
    """SHA-256 (first 16 hex digits) of a checkpoint folder's ``*.safetensors`` files, in name order."""
    h = hashlib.sha256()
    for f in _weight_files(folder):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:16]


def check_safetensors(path: Path) -> str | None:
    """What is wrong with one ``.safetensors`` file (truncated, bad header), or None. Reads only
    the header: the file must be exactly header + the tensors' data (cheap for any size)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"truncated ({size} bytes, header alone needs {n + 8})"
            header = json.loads(fh.read(n))
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    except (ValueError, UnicodeDecodeError):
        return "not a safetensors file (bad header)"
    if not isinstance(header, dict):
        return "not a safetensors file (bad header)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "not a safetensors file (bad tensor offsets)"
    if size != 8 + n + end:
        return f"truncated or padded ({size} bytes, its header describes {8 + n + end})"
    return None


def verify_weights(folder: Path, ckpt_id: str, expected_sha256: str | None = None) -> None:
    """Raise a one-line :class:`RotelabError` naming the file when checkpoint ``ckpt_id``'s weights
    are missing, truncated or (with ``expected_sha256``) not the ones written."""
    files = _weight_files(folder)
    if not files:
        raise RotelabError(f"{folder}: checkpoint {ckpt_id!r} has no weights (*.safetensors)")
    for f in files:
        why = check_safetensors(f)
        if why:
            raise RotelabError(f"{f}: weights of checkpoint {ckpt_id!r} are damaged: {why}")
    if expected_sha256 is not None and weights_sha256(folder) != expected_sha256:
        raise RotelabError(
            f"{folder}: weights of checkpoint {ckpt_id!r} are not the ones written (sha256 differs from the index's {expected_sha256})"
        )
