"""rotelab: a workbench for studying how rote-memorized facts become generalizable knowledge.

Reproduces and extends "Rote Learning Considered Useful" (arXiv 2507.21914). The core package holds
the config schema, facts and prompt sets, model loading, the run layout and the CLI; the stages live
in the subpackages ``rotelab.train``, ``rotelab.probe``, ``rotelab.store``, ``rotelab.analyses`` and
``rotelab.tui``.
"""

__version__ = "0.1.0"
