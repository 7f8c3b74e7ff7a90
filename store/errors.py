"""Errors of the store. All are :class:`rotelab.errors.RotelabError` with one-line messages that
name the store path and the problem."""

from __future__ import annotations

from rotelab.errors import RotelabError


class StoreError(RotelabError):
    """Any problem with a rotelab store (not a store, read-only, bad argument shape, ...)."""


class StoreMismatchError(StoreError):
    """The store holds something incompatible with what the caller asked for (fingerprint, item
    table, layers, checkpoint series, array dims or dtype)."""


class MissingDataError(StoreError):
    """Asked for something the store does not (yet) hold: a kind, an array, an uncommitted slab."""


def one_line(text: str) -> str:
    """Collapse whitespace so that a message stays on one line."""
    return " ".join(str(text).split())
