"""`eagle3-mlx chat`: a Textual chat that shows speculative decoding at work."""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

from textual import on
from textual.actions import SkipAction
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from eagle3_mlx.tui.engine_thread import (
    AnswerChunk,
    AnswerDone,
    AnswerFailed,
    AnswerStarted,
    EngineNotice,
    EngineReady,
    EngineThread,
    GenerateRequest,
    LoadFailed,
    LoadProgress,
    TreeSet,
)
from eagle3_mlx.tui.screens import ChatSettings, HelpScreen, SettingsScreen
from eagle3_mlx.tui.stats import AnswerStats
from eagle3_mlx.tui.widgets import AssistantMessage, NoticeMessage, PromptInput, StatsPanel, UserMessage

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


@dataclass
class Turn:
    """The answer being generated."""

    request: GenerateRequest
    user_text: str
    widget: AssistantMessage
    stats: AnswerStats
    stopped: bool = False
    messages: list = field(default_factory=list)


# The UI shares the CPU (two cores here) and the GIL with the engine thread, so
# every redraw is time the engine does not compute: text is handed over a few
# times a second (flush_interval, the first token at once) and the statistics
# panel redrawn twice a second, which reads as live and costs the engine little.
STATS_REFRESH_S = 0.5
UI_NICE = 5
# MLX releases the GIL while it computes, but the engine thread needs it back
# between every op and transfer; while the UI renders, each such wait could
# last CPython's default 5 ms switch interval. 0.5 ms hands it over sooner.
GIL_SWITCH_INTERVAL_S = 0.0005


def lower_ui_thread_priority(nice: int = UI_NICE) -> None:
    """Linux: give the calling (UI) thread a lower scheduling priority than the
    engine's threads, so on a busy CPU the scheduler runs the model first.
    Linux applies setpriority to one thread when given its thread id; other
    systems would renice the whole process, so they are left alone."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except (AttributeError, OSError):
        pass


class ChatApp(App):
    """Chat with an EAGLE-3 engine; all model work happens on one engine thread."""

    CSS_PATH = "chat.tcss"
    TITLE = "eagle3-mlx chat"

    BINDINGS = [
        Binding("escape", "stop", "Stop", tooltip="Stop the running answer"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+t,f3", "toggle_colour", "Colour"),
        Binding("ctrl+b,f4", "toggle_plain", "Plain"),
        Binding("ctrl+s,f2", "settings", "Settings"),
        Binding("f1", "help", "Help"),
        Binding("pageup", "scroll_conversation(-1)", "Scroll up", show=False, priority=True),
        Binding("pagedown", "scroll_conversation(1)", "Scroll down", show=False, priority=True),
    ]

    def __init__(self, loader: Callable[[Callable[..., None]], Any], *,
                 settings: ChatSettings | None = None, model_label: str = "",
                 clock: Callable[[], float] = time.perf_counter, flush_interval: float = 0.2,
                 animate_loading: bool = True) -> None:
        super().__init__()
        self.settings = settings or ChatSettings()
        self.model_label = model_label
        self.sub_title = model_label
        self.engine_thread = EngineThread(loader, self.post_message, clock=clock,
                                          flush_interval=flush_interval)
        self.history: list[dict] = []
        self.turn: Turn | None = None
        self.last_stats: AnswerStats | None = None
        self.coloured = False
        self.plain = False
        self.ready = False
        self.load_error: str | None = None
        self.tps = {"speculative": None, "plain": None}
        self.session_tokens = 0
        self.answers = 0
        self.errors: list[str] = []
        self.chunks_received = 0
        self._stats_dirty = False
        self._next_id = 0
        self._load_text = "Loading model…"
        self._load_started = time.monotonic()
        self._spin = 0
        self._animate_loading = animate_loading
        self._load_timer = None
        self._engine_tree = None
        self._last_draft_fraction: float | None = None

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield VerticalScroll(id="conversation")
                yield Static("", id="status", markup=False)
                yield PromptInput(id="prompt", placeholder="Ask something · enter sends · F1 keys")
            yield StatsPanel(id="stats")
        yield Footer()

    def on_mount(self) -> None:
        conv = self.query_one("#conversation", VerticalScroll)
        conv.anchor()
        conv.mount(NoticeMessage(self._load_text, id="loading"))
        if self._animate_loading:
            self._load_timer = self.set_interval(0.25, self._tick_loading)
        self.query_one("#prompt", PromptInput).focus()
        self._update_status()
        self._refresh_stats()
        self.set_interval(STATS_REFRESH_S, self._refresh_if_dirty)
        self.engine_thread.start()
        lower_ui_thread_priority()  # after the engine thread exists: it keeps the normal priority
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, GIL_SWITCH_INTERVAL_S))

    async def on_unmount(self) -> None:
        self.engine_thread.close(timeout=2.0)
        if getattr(self, "_switch_interval", None):
            sys.setswitchinterval(self._switch_interval)

    # ------------------------------------------------------------- properties
    @property
    def conversation(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    @property
    def stats_panel(self) -> StatsPanel:
        return self.query_one(StatsPanel)

    @property
    def prompt_input(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    @property
    def generating(self) -> bool:
        return self.turn is not None and not self.turn.stopped

    def tree(self) -> dict | None:
        return self.settings.tree() or self._engine_tree

    def build_prompt(self, user_text: str) -> list[dict]:
        msgs = []
        if self.settings.system.strip():
            msgs.append({"role": "system", "content": self.settings.system})
        msgs.extend(self.history)
        msgs.append({"role": "user", "content": user_text})
        return msgs

    # ---------------------------------------------------------------- status
    def _update_status(self) -> None:
        parts = []
        if self.load_error:
            parts.append("no model")
        elif not self.ready:
            parts.append("loading…")
        elif self.generating:
            parts.append("generating · escape stops")
        else:
            parts.append("ready")
        parts.append("plain decoding" if self.plain else "speculative")
        tree = self.tree()
        if tree and not self.plain:
            parts.append(f"tree k{tree['top_k']} d{tree['depth']} n{tree['total_tokens']}")
        parts.append("colour: draft/target" if self.coloured else "colour off")
        parts.append(f"temp {self.settings.temp:g}")
        self.query_one("#status", Static).update(" · ".join(parts))

    def _refresh_stats(self) -> None:
        self._stats_dirty = False
        stats = self.turn.stats if self.turn is not None else self.last_stats
        widget = self.turn.widget if self.turn is not None else None
        frac = widget.draft_fraction() if widget is not None else self._last_draft_fraction
        ctx = {
            "speculative": stats.speculative if stats is not None else not self.plain,
            "tree": self.tree(),
            "spec_tps": self.tps["speculative"],
            "plain_tps": self.tps["plain"],
            "session_tokens": self.session_tokens + ((stats.tokens or 0) if self.generating and stats else 0),
            "coloured": self.coloured,
            "draft_fraction": frac,
        }
        self.stats_panel.show(stats, ctx)

    def _tick_loading(self) -> None:
        if self.ready or self.load_error:
            return
        self._spin = (self._spin + 1) % len(SPINNER)
        secs = time.monotonic() - self._load_started
        self._show_loading(f"{SPINNER[self._spin]} {self._load_text}  ({secs:.0f} s)")

    def _show_loading(self, text: str) -> None:
        try:
            self.query_one("#loading", NoticeMessage).update(text)
        except Exception:  # noqa: BLE001 - banner already gone
            pass

    async def _add(self, widget) -> None:
        await self.conversation.mount(widget)

    # ------------------------------------------------------- engine messages
    def on_load_progress(self, msg: LoadProgress) -> None:
        self._load_text = msg.text + (f" {msg.fraction * 100:.0f}%" if msg.fraction is not None else "")
        self._show_loading(self._load_text)

    async def on_engine_ready(self, msg: EngineReady) -> None:
        self.ready = True
        tree = msg.info.get("tree")
        if tree:
            self._engine_tree = tree
            self.settings = replace(self.settings, top_k_tree=tree["top_k"], depth=tree["depth"],
                                    total_tokens=tree["total_tokens"])
        if self._load_timer is not None:
            self._load_timer.stop()
        what = self.model_label or "model"
        # The loading banner becomes the ready note, in place (it stays above
        # any question typed while the model was loading).
        self._show_loading(f"Ready: {what}. Type a question and press enter; F1 lists the keys.")
        self._update_status()
        self._refresh_stats()

    async def on_load_failed(self, msg: LoadFailed) -> None:
        self.load_error = msg.error
        self.errors.append(msg.error)
        if self._load_timer is not None:
            self._load_timer.stop()
        try:
            await self.query_one("#loading").remove()
        except Exception:  # noqa: BLE001
            pass
        await self.conversation.mount(NoticeMessage(msg.error, error=True, id="load-error"),
                                      before=0)
        self._update_status()

    def on_answer_started(self, msg: AnswerStarted) -> None:
        self._update_status()

    async def on_answer_chunk(self, msg: AnswerChunk) -> None:
        turn = self.turn
        if turn is None or turn.stopped or msg.request_id != turn.request.request_id:
            return
        self.chunks_received += 1
        await turn.widget.write(msg.tokens, coloured=self.coloured)
        turn.stats.add_tokens(msg.tokens)
        turn.stats.update(msg.latest)
        if msg.ttft_ms is not None:
            turn.stats.ttft_ms = msg.ttft_ms
        # The panel is redrawn a few times a second, not per chunk.
        self._stats_dirty = True

    def _refresh_if_dirty(self) -> None:
        if not self._stats_dirty:
            return
        try:
            self._refresh_stats()
        except NoMatches:
            pass  # the timer fired once more while the app shut down and the panel was gone

    async def on_answer_done(self, msg: AnswerDone) -> None:
        turn = self.turn
        if turn is None or msg.request_id != turn.request.request_id:
            return
        if turn.stopped:
            # Stopped by the user: the text and its stats were frozen at escape.
            turn.stats.new_prompt_tokens = msg.new_prompt_tokens
            self.turn = None
            self._refresh_stats()
            self._update_status()
            return
        turn.stats.update(msg.latest)
        if msg.ttft_ms is not None:
            turn.stats.ttft_ms = msg.ttft_ms
        turn.stats.new_prompt_tokens = msg.new_prompt_tokens
        await self._finish_turn(turn)
        reason = turn.stats.finish_reason
        if reason == "length":
            await self._add(NoticeMessage(f"(stopped at max tokens = {self.settings.max_tokens}; "
                                          "change it in settings, ctrl+s)"))
        elif reason == "context":
            await self._add(NoticeMessage("Context limit reached: the model cannot take a longer "
                                          "conversation. Start a new chat with ctrl+n.", error=True))
        elif reason == "cancelled":
            await self._add(NoticeMessage("(stopped)"))

    async def on_answer_failed(self, msg: AnswerFailed) -> None:
        turn = self.turn
        self.errors.append(msg.error)
        if msg.request_id != self._next_id:
            return  # an answer the user already stopped or cleared
        if turn is not None and msg.request_id == turn.request.request_id:
            await turn.widget.finish()
            self.turn = None
            self.last_stats = turn.stats
        await self._add(NoticeMessage(f"Engine error: {msg.error}", error=True))
        self._update_status()
        self._refresh_stats()

    async def on_tree_set(self, msg: TreeSet) -> None:
        if msg.tree:
            self._engine_tree = msg.tree
            self.settings = replace(self.settings, top_k_tree=msg.tree["top_k"], depth=msg.tree["depth"],
                                    total_tokens=msg.tree["total_tokens"])
        if msg.error:
            self.errors.append(msg.error)
            await self._add(NoticeMessage(msg.error, error=True))
        elif msg.tree:
            what = "Tree retuned from live acceptance" if msg.retuned else "Tree"
            self.notify(what + ": top-k {top_k}, depth {depth}, {total_tokens} tokens".format(**msg.tree),
                        timeout=3)
        self._update_status()
        self._refresh_stats()

    async def on_engine_notice(self, msg: EngineNotice) -> None:
        if msg.error:
            self.errors.append(msg.text)
            await self._add(NoticeMessage(msg.text, error=True))
        else:
            self.notify(msg.text, timeout=3)

    async def _finish_turn(self, turn: Turn) -> None:
        await turn.widget.finish()
        text = turn.widget.text
        if text:
            self.history.append({"role": "user", "content": turn.user_text})
            self.history.append({"role": "assistant", "content": text})
        self.session_tokens += turn.stats.tokens or 0
        self.answers += 1
        if turn.stats.tps:
            self.tps["speculative" if turn.stats.speculative else "plain"] = turn.stats.tps
        self._last_draft_fraction = turn.widget.draft_fraction()
        self.last_stats = turn.stats
        if not turn.stopped:
            self.turn = None
        self._update_status()
        self._refresh_stats()

    # ------------------------------------------------------------- input
    @on(PromptInput.Submitted)
    async def on_prompt_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        if self.generating:
            self.notify("An answer is still running: escape stops it.", severity="warning", timeout=3)
            return
        if self.load_error:
            self.prompt_input.clear()
            await self._add(UserMessage(text))
            await self._add(NoticeMessage(f"No model is loaded. {self.load_error}", error=True))
            return
        await self.send(text)

    async def send(self, text: str) -> None:
        """Send ``text`` as the next user turn (also used by tests)."""
        self.prompt_input.clear()
        prompt = self.build_prompt(text)
        self._next_id += 1
        speculative = not self.plain
        conv = self.conversation
        await self._add(UserMessage(text))
        if not self.ready:
            await self._add(NoticeMessage("(queued: the model is still loading)"))
        widget = AssistantMessage(speculative=speculative)
        await self._add(widget)
        conv.anchor()
        req = self.engine_thread.generate(self._next_id, prompt, self.settings.sampling(), speculative)
        self.turn = Turn(req, text, widget, AnswerStats(speculative=speculative), messages=prompt)
        self._update_status()
        self._refresh_stats()

    # ------------------------------------------------------------- actions
    async def action_stop(self) -> None:
        turn = self.turn
        if turn is None or turn.stopped:
            return
        turn.request.cancel.set()
        turn.stopped = True
        await self._finish_turn(turn)
        await self._add(NoticeMessage("(stopped)"))

    async def action_new_chat(self) -> None:
        if self.turn is not None:
            self.turn.request.cancel.set()
            await self.turn.widget.finish()
            self.turn = None
        self.history.clear()
        self.last_stats = None
        self._last_draft_fraction = None
        self.session_tokens = 0
        self.engine_thread.reset()
        conv = self.conversation
        await conv.remove_children()
        if self.load_error:
            await self._add(NoticeMessage(self.load_error, error=True))
        else:
            await self._add(NoticeMessage("New chat: history and prompt cache cleared."))
        conv.anchor()
        self._update_status()
        self._refresh_stats()

    def action_toggle_colour(self) -> None:
        self.coloured = not self.coloured
        self.screen.set_class(self.coloured, "-origin")
        if self.coloured:
            for w in self.query(AssistantMessage):
                w.show_origin()
        self.notify("Colouring by origin: green = accepted draft token, orange = target token"
                    if self.coloured else "Colouring off", timeout=3)
        self._update_status()
        self._refresh_stats()

    def action_toggle_plain(self) -> None:
        self.plain = not self.plain
        self.notify("Plain decoding ON: next answers run without speculation" if self.plain
                    else "Speculative decoding ON", timeout=3)
        self._update_status()
        if self.turn is None:
            self._refresh_stats()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_settings(self) -> None:
        if isinstance(self.screen, SettingsScreen):
            return
        current = self.settings
        tree = self.tree() or {}
        if current.tree() is None and tree:
            current = ChatSettings(**{**current.__dict__, "top_k_tree": tree.get("top_k"),
                                      "depth": tree.get("depth"), "total_tokens": tree.get("total_tokens")})
        self.push_screen(SettingsScreen(current), self._apply_settings)

    def _apply_settings(self, new: ChatSettings | None) -> None:
        if new is None:
            return
        old_tree = self.tree()
        self.settings = new
        tree = new.tree()
        if tree is not None and tree != old_tree:
            self.engine_thread.set_tree(**tree)
        self.notify("Settings saved", timeout=2)
        self._update_status()
        self._refresh_stats()

    def action_scroll_conversation(self, direction: int) -> None:
        """Page the conversation from anywhere on the main screen.  Scrolling
        up unpins it from the bottom; paging back to the end pins it again."""
        if self.screen is not self.screen_stack[0]:
            raise SkipAction()  # modal screens keep their own pageup/pagedown
        conv = self.conversation
        if direction < 0:
            conv.scroll_page_up(animate=False)
        else:
            conv.scroll_page_down(animate=False)

    # ------------------------------------------------------- command palette
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Stop answer", "Stop the running answer, keep its text", self.action_stop)
        yield SystemCommand("New chat", "Clear history and the prompt cache", self.action_new_chat)
        yield SystemCommand("Colour by origin", "Toggle draft/target colouring", self.action_toggle_colour)
        yield SystemCommand("Plain decoding", "Toggle speculation off/on for the next answers",
                            self.action_toggle_plain)
        yield SystemCommand("Settings", "Temperature, top-p, max tokens, system prompt, tree",
                            self.action_settings)
        yield SystemCommand("Keys", "Show all keys", self.action_help)
