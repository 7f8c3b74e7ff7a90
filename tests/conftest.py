"""Shared test settings: a private model cache per test session unless one is given, so tests never
depend on what a user's ~/.cache holds (the embedded model's conversion is cached across sessions
in ROTELAB_CACHE when CI sets it)."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
