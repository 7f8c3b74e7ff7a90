"""Errors rotelab raises for bad input. The CLI turns them into one-line messages and exit code 2."""


class RotelabError(Exception):
    """A user-facing error: the message names the file (or object) and the problem in one line."""
