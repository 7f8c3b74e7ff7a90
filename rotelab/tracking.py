"""Run tracking in TensorBoard's event format, under ``<run>/tensorboard/``.

* Training (written by DeepSpeed's own monitor, :func:`rotelab.train.engine.monitor_sections`):
  one TensorBoard run per stage, ``tensorboard/<stage>/`` (``phase1``, ``phase2``, ``inject``,
  ``sft``, ``sft-k``), with ``Train/Steps/loss`` (the step's mean loss per target token, the
  number ``logs/train_loss.csv`` holds) and ``Train/Steps/lr`` at the stage's optimizer step, and
  DeepSpeed's own ``Train/Samples/lr`` at its sample counter. DeepSpeed's ``csv_monitor`` writes
  the same events as CSV files into ``logs/csv_monitor/<stage>/``.
* Evaluation (:func:`write_eval_scalars`, after every eval): one TensorBoard run per series,
  ``tensorboard/eval-<series>/``, with a scalar ``<metric>/<kind>/<split>`` per checkpoint at
  step = the checkpoint's ``total_tokens`` (training tokens seen since the pretrained model, so
  phase 1 and phase 2 share one axis). Metrics: ``object_prob``, ``mc_correct``, ``gen_correct``
  (means over items, as in the eval summary); splits ``train``/``heldout``/``all``.

A training stage resumed after a kill writes the redone steps' events again (TensorBoard shows
both; ``logs/train_loss.csv`` has each step once). The eval folders are rewritten whole from the
store each time, so they hold each point exactly once.

View: ``tensorboard --logdir runs/<name>/tensorboard`` (:func:`logdir_hint`).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rotelab.errors import RotelabError

TENSORBOARD_DIR = "tensorboard"
EVAL_PREFIX = "eval-"


def tensorboard_dir(run_root: Path) -> Path:
    return Path(run_root) / TENSORBOARD_DIR


def csv_monitor_dir(run_root: Path) -> Path:
    return Path(run_root) / "logs" / "csv_monitor"


def logdir_hint(path: Path) -> str:
    """The command line that opens ``path`` (a run, or a folder of runs) in TensorBoard."""
    p = Path(path)
    return f"tensorboard --logdir {p / TENSORBOARD_DIR if (p / TENSORBOARD_DIR).is_dir() else p}"


def write_eval_scalars(run_root: Path, rows: Iterable[tuple[str, str, int, float]]) -> list[Path]:
    """Replace ``tensorboard/eval-<series>/`` with one event file per series.

    ``rows``: ``(series, tag, step, value)`` with ``tag`` = ``<metric>/<kind>/<split>`` and
    ``step`` = the checkpoint's ``total_tokens``. Returns the folders written.
    """
    from torch.utils.tensorboard import SummaryWriter

    by_series: dict[str, list[tuple[str, int, float]]] = {}
    for series, tag, step, value in rows:
        by_series.setdefault(series, []).append((tag, int(step), float(value)))
    root = tensorboard_dir(run_root)
    for old in root.glob(EVAL_PREFIX + "*"):
        if old.is_dir() and old.name[len(EVAL_PREFIX):] not in by_series:
            shutil.rmtree(old, ignore_errors=True)
    written = []
    for series, events in by_series.items():
        d = root / f"{EVAL_PREFIX}{series}"
        tmp = root / f".{EVAL_PREFIX}{series}.{os.getpid()}.tmp"
        try:
            with _writer_thread_errors() as failed:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                w = SummaryWriter(log_dir=str(tmp))
                for tag, step, value in sorted(events, key=lambda e: (e[1], e[0])):
                    w.add_scalar(tag, value, step)
                w.close()
            if failed:
                raise failed[0]
        except OSError as err:  # e.g. a full disk: the old folder stays as it was
            shutil.rmtree(tmp, ignore_errors=True)
            raise RotelabError(f"{d}: cannot write TensorBoard events ({err.strerror or err})") from None
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
        written.append(d)
    return written


@contextmanager
def _writer_thread_errors() -> Iterator[list[OSError]]:
    """Collect the OSErrors that TensorBoard's background writer thread dies of (instead of the
    traceback ``threading`` prints) while the block runs."""
    failed: list[OSError] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError):
            failed.append(args.exc_value)
        else:
            previous(args)

    threading.excepthook = hook
    try:
        yield failed
    finally:
        threading.excepthook = previous
