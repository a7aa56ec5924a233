"""Modal screens: help (all keys) and settings (sampling, system prompt, tree)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

# Every key of the chat, shown by the help screen and in the README.
KEYS: list[tuple[str, str]] = [
    ("enter", "send the prompt"),
    ("shift+enter / ctrl+j", "new line in the prompt"),
    ("escape", "stop the running answer (keeps the text)"),
    ("ctrl+n", "new chat (clears history and the prompt cache)"),
    ("ctrl+t / f3", "colour the answer by origin: draft vs target tokens"),
    ("ctrl+b / f4", "plain decoding on/off (compare tok/s)"),
    ("ctrl+s / f2", "settings: temperature, top-p, max tokens, system prompt, tree"),
    ("f1", "this help"),
    ("ctrl+p", "command palette (all commands, themes)"),
    ("tab / shift+tab", "move focus (prompt, conversation)"),
    ("pageup / pagedown", "scroll the conversation (scrolling up unpins it from the bottom)"),
    ("ctrl+c", "copy selected text"),
    ("ctrl+q", "quit"),
]


@dataclass(frozen=True)
class ChatSettings:
    temp: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    system: str = ""
    top_k_tree: int | None = None
    depth: int | None = None
    total_tokens: int | None = None

    def tree(self) -> dict | None:
        if None in (self.top_k_tree, self.depth, self.total_tokens):
            return None
        return {"top_k": self.top_k_tree, "depth": self.depth, "total_tokens": self.total_tokens}

    def sampling(self) -> dict:
        return {"max_tokens": self.max_tokens, "temp": self.temp, "top_p": self.top_p}


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,f1,q", "dismiss_help", "Close", show=True),
    ]

    def compose(self) -> ComposeResult:
        table = Table(show_header=False, box=None, pad_edge=False, padding=(0, 2, 0, 0))
        table.add_column(style="bold")
        table.add_column()
        for key, what in KEYS:
            table.add_row(key, what)
        with Vertical(id="help-box"):
            yield Label("eagle3-mlx chat — keys", id="help-title")
            yield Static(table, id="help-keys")
            yield Static(
                "The panel on the right shows, for the current answer: τ (mean tokens "
                "per target step), the tokens each step produced (sparkline and "
                "histogram), tok/s for speculative and plain decoding, draft and "
                "verify time per step, the tree shape, time to first token and peak "
                "memory.  Every token is exactly what the target model alone would "
                "produce; speculation only makes it faster.",
                id="help-text",
            )
            yield Label("escape closes", id="help-foot")

    def action_dismiss_help(self) -> None:
        self.dismiss(None)


class SettingsScreen(ModalScreen["ChatSettings | None"]):
    """Edit sampling, system prompt and tree; returns new settings or None."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", show=True),
        Binding("ctrl+s", "save", "Save", show=True, priority=True),
    ]

    def __init__(self, settings: ChatSettings) -> None:
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with Vertical(id="settings-box"):
            yield Label("Settings", id="settings-title")
            with VerticalScroll(id="settings-form"):
                with Grid(id="settings-grid"):
                    yield Label("temperature")
                    yield Input(str(s.temp), id="temp", type="number", compact=True)
                    yield Label("top-p")
                    yield Input(str(s.top_p), id="top_p", type="number", compact=True)
                    yield Label("max tokens")
                    yield Input(str(s.max_tokens), id="max_tokens", type="integer", compact=True)
                    yield Label("tree top-k")
                    yield Input("" if s.top_k_tree is None else str(s.top_k_tree), id="top_k_tree",
                                type="integer", placeholder="engine default", compact=True)
                    yield Label("tree depth")
                    yield Input("" if s.depth is None else str(s.depth), id="depth", type="integer",
                                placeholder="engine default", compact=True)
                    yield Label("tree tokens")
                    yield Input("" if s.total_tokens is None else str(s.total_tokens), id="total_tokens",
                                type="integer", placeholder="engine default", compact=True)
                yield Label("system prompt", id="system-label")
                yield TextArea(s.system, id="system", soft_wrap=True, compact=True)
                yield Static("temperature 0 = greedy. Tree: top-k 1 is a chain; "
                             "tokens = nodes verified per step.", id="settings-hint")
                yield Label("", id="settings-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Save", id="save", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#temp", Input).focus()

    def _parse(self) -> ChatSettings:
        def val(name, kind, lo=None, hi=None, optional=False):
            raw = self.query_one(f"#{name}", Input).value.strip()
            if not raw and optional:
                return None
            try:
                x = kind(raw)
            except ValueError:
                raise ValueError(f"{name.replace('_', ' ')}: not a number: {raw!r}") from None
            if (lo is not None and x < lo) or (hi is not None and x > hi):
                raise ValueError(f"{name.replace('_', ' ')} must be in [{lo}, {hi if hi is not None else '∞'}]")
            return x

        tree = [val("top_k_tree", int, 1, 64, True), val("depth", int, 1, 32, True),
                val("total_tokens", int, 2, 1024, True)]
        if any(t is None for t in tree) and any(t is not None for t in tree):
            raise ValueError("set all three tree values, or none")
        return replace(
            self.settings,
            temp=val("temp", float, 0.0, 10.0),
            top_p=val("top_p", float, 0.0, 1.0),
            max_tokens=val("max_tokens", int, 1, 1_000_000),
            system=self.query_one("#system", TextArea).text,
            top_k_tree=tree[0], depth=tree[1], total_tokens=tree[2],
        )

    def action_save(self) -> None:
        try:
            new = self._parse()
        except ValueError as exc:
            self.query_one("#settings-error", Label).update(f"⚠ {exc}")
            return
        self.dismiss(new)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "save":
            self.action_save()
        else:
            self.action_cancel()
