"""The browser's actions, one table per screen: each row feeds the screen's key bindings, the help
screen and (for the main screen) the command palette, so the three can never disagree.

Adding an action (or a panel with its keys) is one row here plus the ``action_<name>`` method on
the screen.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding


@dataclass(frozen=True)
class Action:
    """One user action of a screen.

    ``keys``: Textual key names, comma separated (``"left,h"``); ``action``: the Textual action
    string run on the screen (``"checkpoint(1)"``); ``label``: the short footer / help text;
    ``title`` and ``help``: the command palette entry (title searched, help shown under it);
    ``footer``: whether the footer shows the key; ``help_label``: the help screen's text when it
    differs from ``label``.
    """

    keys: str
    action: str
    label: str
    title: str
    help: str
    footer: bool = False
    help_label: str | None = None

    def binding(self) -> Binding:
        return Binding(self.keys, self.action, self.label, show=self.footer)


COMMAND_PALETTE = "command_palette"
"""The one app action Textual binds itself (``App.COMMAND_PALETTE_BINDING``)."""

MAIN_ACTIONS: tuple[Action, ...] = (
    Action("left,h", "checkpoint(-1)", "◀ ckpt", "Previous checkpoint", "Step the timeline back", True),
    Action("right,l", "checkpoint(1)", "ckpt ▶", "Next checkpoint", "Step the timeline forward", True),
    Action("up,k", "layer(1)", "layer ▲", "Next layer", "One layer up", True),
    Action("down,j", "layer(-1)", "layer ▼", "Previous layer", "One layer down", True),
    Action("home", "checkpoint_to(0)", "first ckpt", "First checkpoint", "Jump to the start of the timeline"),
    Action("end", "checkpoint_to(-1)", "last ckpt", "Last checkpoint", "Jump to the end of the timeline"),
    Action("g", "layer_to(0)", "first layer", "First layer", "Jump to the lowest layer"),
    Action("G", "layer_to(-1)", "last layer", "Last layer", "Jump to the highest layer"),
    Action("t", "kind(1)", "kind", "Next prompt kind", "Filter the projection to the next kind (or all, jointly)", True),
    Action("T", "kind(-1)", "previous kind", "Previous prompt kind", "Filter the projection to the previous kind"),
    Action("m", "method", "PCA/UMAP", "Toggle PCA / UMAP", "Switch the projection method", True),
    Action("J", "joint", "joint space", "Toggle joint projection space", "Per-kind projection or the joint space of several kinds"),
    Action("c", "color_by", "color by", "Color by relation / kind", "Switch what the scatter colors encode"),
    Action("s", "series", "series", "Next checkpoint series", "main, or a baseline series such as sft"),
    Action("f", "find_fact", "fact", "Find a fact", "Drill down into one fact's prompts, generations and probabilities", True),
    Action("p", "patching", "patching", "Patching heatmap", "Layer × checkpoint activation patching results", True),
    Action("w", "where", "where", "Where the fact lives", "Layer × checkpoint heatmaps: logit lens, relation probes, CKA drift", True),
    Action("e", "export", "export", "Export current view", "Write the view as a paper figure (PNG, PDF, SVG + CSV)", True),
    Action("r", "refresh", "refresh", "Refresh from store", "Re-read what has been committed since", True),
    Action("escape", "back", "runs", "Back to the runs", "Return to the run picker (when opened from a folder of runs)"),
)
FACT_ACTIONS: tuple[Action, ...] = (
    Action("escape,backspace", "app.pop_screen", "back", "Back", "Return to the main screen", True),
    Action("left,h", "checkpoint(-1)", "◀ ckpt", "Previous checkpoint", "Step the timeline back", True),
    Action("right,l", "checkpoint(1)", "ckpt ▶", "Next checkpoint", "Step the timeline forward", True),
)
def _heatmap_actions(export_help: str) -> tuple[Action, ...]:
    """The keys of a heatmap screen (:class:`rotelab.tui.screens.HeatmapScreen`)."""
    return (
        Action("escape,backspace", "app.pop_screen", "back", "Back", "Return to the main screen", True),
        Action("t", "panel", "next panel", "Next panel", "Cycle the heatmap panels", True),
        Action("e", "export", "export", "Export panel", export_help, True),
    )


PATCHING_ACTIONS = _heatmap_actions("Write the panel as a paper figure")
WHERE_ACTIONS = _heatmap_actions("Write the panel's analysis as a paper figure (all kinds)")
PICKER_ACTIONS: tuple[Action, ...] = (
    Action("enter", "open", "open run", "Open run", "Browse the selected run", True),
    Action("r", "rescan", "rescan", "Rescan", "Re-read the folder of runs", True),
)
APP_ACTIONS: tuple[Action, ...] = (
    Action("question_mark", "help", "help", "Help: key bindings", "All keys of the browser", True, "this help"),
    Action("ctrl+p", COMMAND_PALETTE, "command palette", "Command palette", "Search the actions"),
    Action("q", "quit", "quit", "Quit", "Leave the browser", True),
)
HELP_SECTIONS: tuple[tuple[str, tuple[Action, ...]], ...] = (
    ("main screen", MAIN_ACTIONS),
    ("fact drill-down", FACT_ACTIONS),
    ("patching", PATCHING_ACTIONS),
    ("where the fact lives", WHERE_ACTIONS),
    ("run picker", PICKER_ACTIONS),
    ("everywhere", APP_ACTIONS),
)
"""What the help screen lists, in order."""


def bindings(actions: tuple[Action, ...]) -> list[Binding]:
    """A screen's ``BINDINGS`` from its action table."""
    return [a.binding() for a in actions]


def key_name(key: str) -> str:
    """How a key is written for people (``?`` for ``question_mark``)."""
    return {"question_mark": "?", "escape": "esc"}.get(key, key)


def help_line(action: Action) -> str:
    """The help screen's line of one action (markup)."""
    keys = ", ".join(key_name(k) for k in action.keys.split(","))
    return f"  [b]{keys:<18}[/] {action.help_label or action.label}"


def help_text() -> str:
    """The help screen's text: every action of every screen, then how the mouse works."""
    lines = ["[b]rotelab browser — keys[/]", ""]
    for title, actions in HELP_SECTIONS:
        lines.append(f"[b]{title}[/]")
        lines += [help_line(a) for a in actions]
        lines.append("")
    lines.append("mouse: click the timeline, the layer bar, a point (opens its fact) or an accuracy row (shows that kind)")
    lines.append("missing data is hatched or shown as —, never as 0; r re-reads what capture has committed since")
    return "\n".join(lines)
