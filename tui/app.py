"""The Textual app: opens a run (or a folder of runs with a picker), help and command palette."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.screen import Screen

from rotelab.errors import RotelabError

from .data import RunData, find_runs

#: Command palette entries: (title, help, action on the main screen).
MAIN_COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("Next checkpoint", "Step the timeline forward", "checkpoint(1)"),
    ("Previous checkpoint", "Step the timeline back", "checkpoint(-1)"),
    ("Next layer", "One layer up", "layer(1)"),
    ("Previous layer", "One layer down", "layer(-1)"),
    ("Next prompt kind", "Filter the projection to the next kind (or all, jointly)", "kind(1)"),
    ("Toggle PCA / UMAP", "Switch the projection method", "method"),
    ("Toggle joint projection space", "Per-kind projection or the joint space of several kinds", "joint"),
    ("Color by relation / kind", "Switch what the scatter colors encode", "color_by"),
    ("Next checkpoint series", "main, or a baseline series such as sft", "series"),
    ("Find a fact", "Drill down into one fact's prompts, generations and probabilities", "find_fact"),
    ("Patching heatmap", "Layer × checkpoint activation patching results", "patching"),
    ("Export current view", "Write the view as a paper figure (PNG, PDF, SVG + CSV)", "export"),
    ("Refresh from store", "Re-read what has been committed since", "refresh"),
)


class BrowserCommands(Provider):
    """The main actions of the browser for the command palette (ctrl+p)."""

    def _target(self) -> Screen | None:
        from .main_screen import MainScreen

        for s in reversed(self.app.screen_stack):
            if isinstance(s, MainScreen):
                return s
        return None

    async def discover(self) -> Hits:
        target = self._target()
        if target is None:
            return
        for title, help_text, action in MAIN_COMMANDS:
            yield DiscoveryHit(title, partial(target.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        target = self._target()
        if target is None:
            return
        matcher = self.matcher(query)
        for title, help_text, action in MAIN_COMMANDS:
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), partial(target.run_action, action), help=help_text)


class RotelabApp(App[None]):
    """``rotelab tui``: browse a run (layers × checkpoints) or pick one from a folder of runs."""

    CSS_PATH = "rotelab.tcss"
    TITLE = "rotelab"
    COMMANDS = App.COMMANDS | {BrowserCommands}
    BINDINGS = [
        Binding("question_mark", "help", "help", show=True),
        Binding("q", "quit", "quit", show=True),
    ]

    def __init__(self, target: str | Path, export_dir: Path | None = None) -> None:
        super().__init__()
        self.target = Path(target)
        self.export_dir = export_dir
        """Where exports go (default: the run's ``figures/tui``)."""
        self.last_export: list[Path] = []

    def on_mount(self) -> None:
        from .main_screen import MainScreen
        from .screens import RunPicker

        if (self.target / "config.yaml").is_file():
            self.push_screen(MainScreen(RunData.open(self.target)))
        else:
            self.push_screen(RunPicker(self.target))

    def action_help(self) -> None:
        from .screens import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: key bindings", "All keys of the browser", self.action_help)


def check_target(target: str | Path) -> Path:
    """A run directory or a folder holding run directories; RotelabError otherwise."""
    p = Path(target)
    if not p.is_dir():
        raise RotelabError(f"{p}: not a directory (give a run directory or a folder of runs)")
    if (p / "config.yaml").is_file():
        return p
    if not find_runs(p):
        raise RotelabError(f"{p}: neither a run directory (no config.yaml) nor a folder containing runs")
    return p


def run_tui(target: str | Path) -> None:
    """Start the browser on a run directory or a folder of runs."""
    RotelabApp(check_target(target)).run()
