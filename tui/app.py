"""The Textual app: opens a run (or a folder of runs with a picker), help and command palette."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

from textual import on
from textual.app import App, SystemCommand
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.screen import Screen

from rotelab.errors import RotelabError

from .actions import APP_ACTIONS, COMMAND_PALETTE, MAIN_ACTIONS, bindings
from .data import RunData, find_runs
from .main_screen import MainScreen
from .screens import HelpScreen, RunPicker

class BrowserCommands(Provider):
    """The main actions of the browser for the command palette (ctrl+p)."""

    def _target(self) -> Screen | None:
        for s in reversed(self.app.screen_stack):
            if isinstance(s, MainScreen):
                return s
        return None

    async def discover(self) -> Hits:
        target = self._target()
        if target is None:
            return
        for a in MAIN_ACTIONS:
            yield DiscoveryHit(a.title, partial(target.run_action, a.action), help=a.help)

    async def search(self, query: str) -> Hits:
        target = self._target()
        if target is None:
            return
        matcher = self.matcher(query)
        for a in MAIN_ACTIONS:
            score = matcher.match(a.title)
            if score > 0:
                yield Hit(score, matcher.highlight(a.title), partial(target.run_action, a.action), help=a.help)


class RotelabApp(App[None]):
    """``rotelab tui``: browse a run (layers × checkpoints) or pick one from a folder of runs."""

    CSS_PATH = "rotelab.tcss"
    TITLE = "rotelab"
    COMMANDS = App.COMMANDS | {BrowserCommands}
    BINDINGS = bindings(tuple(a for a in APP_ACTIONS if a.action != COMMAND_PALETTE))

    def __init__(self, target: str | Path, export_dir: Path | None = None) -> None:
        super().__init__()
        self.target = Path(target)
        self.export_dir = export_dir
        """Where exports go (default: the run's ``figures/tui``)."""
        self.last_export: list[Path] = []

    def on_mount(self) -> None:
        if (self.target / "config.yaml").is_file():
            self.push_screen(MainScreen(RunData.open(self.target)))
        else:
            self.push_screen(RunPicker(self.target))

    @on(RunPicker.Chosen)
    def _run_chosen(self, message: RunPicker.Chosen) -> None:
        self.push_screen(MainScreen(message.data))

    def action_help(self) -> None:
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
