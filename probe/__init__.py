"""rotelab.probe"""
from .capture import capture_hidden, capture_run  # noqa: F401
