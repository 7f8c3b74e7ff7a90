"""Shared test settings: a private model cache per test session unless one is given, so tests never
depend on what a user's ~/.cache holds (the embedded model's conversion is cached across sessions
in ROTELAB_CACHE when CI sets it)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models run faster on one thread and do not oversubscribe a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def _free_module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Delete what a test module wrote under pytest's base temp dir once the module is done, unless
    one of its tests failed (then it stays for debugging). Several tests write SmolLM2 checkpoints
    (0.54 GB each, 2.1 GB for one test); kept for the whole session (pytest's default retention),
    they add up to more than a CI machine's free disk, and every later test then errors at setup.
    Function-level ``tmp_path`` dirs of passed tests are already removed at teardown by
    ``tmp_path_retention_policy = "failed"`` (pyproject); this covers ``tmp_path_factory.mktemp``
    dirs of module-scoped fixtures. Autouse and module-scoped, it is set up before the module's
    other fixtures and so torn down after them."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        for path in set(base.iterdir()) - before:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
