"""rotelab.tui — the Textual browser: layers × checkpoints of a run, representations and accuracy.

``rotelab tui RUN`` (or a folder of runs, with a picker). Everything shown is read from the run's
store (:mod:`rotelab.tui.data`, no Textual there); the screens only draw it.
"""

from .app import RotelabApp, check_target, run_tui

__all__ = ["RotelabApp", "check_target", "run_tui"]
