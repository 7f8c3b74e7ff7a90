"""rotelab.probe"""
from .capture import capture_hidden, capture_run  # noqa: F401
from .accuracy import evaluate_run  # noqa: F401
from .accuracy_tables import item_metrics_table, metrics_table, summary_table  # noqa: F401
