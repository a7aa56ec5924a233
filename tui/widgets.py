"""Widgets of the chat: prompt box, conversation messages and the statistics panel."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Label, Markdown, Sparkline, Static, TextArea

from eagle3_mlx.tui.stats import AnswerStats

DRAFT_STYLE = "bold #1b1b1b on #7bd88f"   # accepted draft tokens
TARGET_STYLE = "bold #1b1b1b on #f0b35a"  # tokens chosen by the target (bonus / plain)


class PromptInput(TextArea):
    """Multi-line prompt: Enter sends, Shift+Enter or Ctrl+J inserts a newline."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("soft_wrap", True)
        kwargs.setdefault("show_line_numbers", False)
        kwargs.setdefault("tab_behavior", "focus")
        kwargs.setdefault("compact", True)
        kwargs.setdefault("highlight_cursor_line", False)
        super().__init__(**kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j", "newline", "alt+enter"):
            event.stop()
            event.prevent_default()
            start, end = self.selection
            self._replace_via_keyboard("\n", start, end)
            return
        await super()._on_key(event)


class UserMessage(Vertical):
    def __init__(self, text: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.text = text

    def compose(self) -> ComposeResult:
        yield Label("you", classes="role")
        yield Markdown(self.text, classes="body")


class NoticeMessage(Static):
    """A one-line note in the conversation (load status, stop marker, errors)."""

    def __init__(self, text: str, *, error: bool = False, **kwargs) -> None:
        classes = kwargs.pop("classes", "")
        super().__init__(text, markup=False, classes=f"{classes} {'error' if error else 'note'}".strip(),
                         **kwargs)
        self.text = text
        self.is_error = error


class AssistantMessage(Vertical):
    """An answer, streamed append-only into a Markdown widget.

    It also keeps every text delta with its origin (accepted draft token or
    target token) so the answer can be shown coloured by origin.
    """

    def __init__(self, *, speculative: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.speculative = speculative
        self.segments: list[tuple[str, bool]] = []
        self._origin = Text()
        self._stream = None
        self.finished = False

    def compose(self) -> ComposeResult:
        label = "eagle3" if self.speculative else "eagle3 · plain decoding"
        yield Label(label, classes="role")
        yield Markdown("", classes="body")
        yield Static("", classes="origin", markup=False)

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    @property
    def origin_view(self) -> Static:
        return self.query_one(".origin", Static)

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.segments)

    def draft_fraction(self) -> float | None:
        n = sum(1 for t, _ in self.segments if t)
        if not n:
            return None
        return sum(1 for t, d in self.segments if t and d) / n

    async def write(self, records, *, coloured: bool) -> None:
        if self.finished:
            return
        if self._stream is None:
            self._stream = Markdown.get_stream(self.markdown)
        fragment = []
        for rec in records:
            if not rec.text:
                continue
            self.segments.append((rec.text, rec.from_draft))
            self._origin.append(rec.text, DRAFT_STYLE if rec.from_draft else TARGET_STYLE)
            fragment.append(rec.text)
        if fragment:
            await self._stream.write("".join(fragment))
            if coloured:
                self.origin_view.update(self._origin)

    def show_origin(self) -> None:
        self.origin_view.update(self._origin)

    async def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None


def _fmt(value, spec: str, unit: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:{spec}}{unit}"


def _memory(gb) -> str:
    if gb is None:
        return "–"
    return f"{gb:.2f} GB" if gb >= 1.0 else f"{gb * 1000:.1f} MB"


class StatsPanel(VerticalScroll):
    """Live speculation statistics for the current (or last) answer."""

    HIST_WIDTH = 13

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.values: dict[str, str] = {}
        self._head_text = Text()
        self._body_text = Text()

    def compose(self) -> ComposeResult:
        yield Static("", id="stats-head", markup=False)
        yield Label("sparkline: tokens per step", classes="caption")
        yield Sparkline([], id="spark")
        yield Static("", id="stats-body", markup=False)

    def on_mount(self) -> None:
        self.show(None, {})

    def show(self, stats: AnswerStats | None, ctx: dict) -> None:
        """Render ``stats`` (None: nothing generated yet) plus session context.

        ``ctx`` keys: mode, tree (dict), spec_tps, plain_tps, session_tokens,
        answers, coloured, draft_fraction.
        """
        self.values = v = panel_values(stats, ctx)
        self._head_text = self._head(v)
        self.query_one("#stats-head", Static).update(self._head_text)
        spark = self.query_one("#spark", Sparkline)
        spark.data = list(stats.step_lengths[-200:]) if stats and stats.step_lengths else []
        self._body_text = self._body(v, stats.histogram() if stats else {}, bool(ctx.get("coloured")))
        self.query_one("#stats-body", Static).update(self._body_text)

    def _head(self, v: dict) -> Text:
        head = Text()
        head.append(f"{'SPECULATIVE' if v['mode'] == 'speculative' else 'PLAIN DECODING'}\n", "bold")
        self._row(head, "τ tokens/step", v["tau"], bold=True)
        self._row(head, "last step", v["last_step"])
        self._row(head, "tok/s", v["tps"], bold=True)
        self._row(head, "speculative tok/s", v["spec_tps"])
        self._row(head, "plain tok/s", v["plain_tps"])
        self._row(head, "speedup", v["speedup"], end="")
        return head

    def _body(self, v: dict, hist: dict, coloured: bool) -> Text:
        body = Text()
        body.append("histogram: tokens per step\n", "dim")
        if hist:
            peak = max(hist.values())
            for length, count in hist.items():
                bar = "█" * max(1, round(count / peak * self.HIST_WIDTH))
                body.append(f"{length:>2} ", "bold")
                body.append(f"{bar:<{self.HIST_WIDTH}}", "green")
                body.append(f" {count:>3}\n")
        else:
            body.append("  –\n")
        body.append("\n")
        for label, key in (("draft ms/step", "draft_ms"), ("verify ms/step", "verify_ms"), ("tree", "tree"),
                           ("steps", "steps"), ("tokens", "tokens"), ("session tokens", "session_tokens"),
                           ("prompt", "prefill"), ("first token", "ttft"), ("peak memory", "peak_memory")):
            self._row(body, label, v[key])
        self._row(body, "from draft", v["draft_share"], end="")
        if "sources" in v:
            body.append("\n")
            self._row(body, v["sources_label"], v["sources"], end="")
        if coloured:
            body.append("\n\n")
            body.append(" draft ", DRAFT_STYLE)
            body.append(" accepted  ")
            body.append(" target ", TARGET_STYLE)
            body.append(" ends a step")
        return body

    @staticmethod
    def _row(text: Text, label: str, value: str, *, bold: bool = False, end: str = "\n",
             width: int = 29) -> None:
        pad = max(1, width - len(label) - len(value))
        text.append(label, "dim" if not bold else "bold")
        text.append(" " * pad)
        text.append(value, "bold" if bold else "")
        text.append(end)

    def text(self) -> str:
        """Plain text of everything the panel shows (for tests)."""
        return self._head_text.plain + "\n" + self._body_text.plain


def panel_values(s: AnswerStats | None, ctx: dict) -> dict:
    """What the statistics panel shows, as text (None: nothing generated yet)."""
    spec_tps, plain_tps = ctx.get("spec_tps"), ctx.get("plain_tps")
    v = {
        "mode": "plain decoding" if not ctx.get("speculative", True) else "speculative",
        "tau": _fmt(s.tau if s else None, ".2f"),
        "last_step": _fmt(s.last_step if s else None, "d"),
        "steps": _fmt(s.steps if s else None, "d"),
        "tps": _fmt(s.tps if s else None, ".1f"),
        "spec_tps": _fmt(spec_tps, ".1f"),
        "plain_tps": _fmt(plain_tps, ".1f"),
        "speedup": _fmt(spec_tps / plain_tps if spec_tps and plain_tps else None, ".2f", "×"),
        "draft_ms": _fmt(s.mean_draft_ms if s else None, ".2f"),
        "verify_ms": _fmt(s.mean_verify_ms if s else None, ".2f"),
        "tree": _tree_text(ctx.get("tree") or {}),
        "tokens": _fmt(s.tokens if s else None, "d"),
        "session_tokens": _fmt(ctx.get("session_tokens"), "d"),
        "ttft": _fmt(s.ttft_ms if s else None, ".0f", " ms"),
        "prefill": "–",
        "peak_memory": _memory(s.latest.get("peak_memory") if s else None),
    }
    if s and s.latest.get("prompt_tokens") is not None:
        total, new = s.latest["prompt_tokens"], s.new_prompt_tokens
        v["prefill"] = f"{total}" if new is None else f"{new} new / {total}"
    frac = ctx.get("draft_fraction")
    v["draft_share"] = _fmt(frac * 100 if frac is not None else None, ".0f", "%")
    src = s.latest.get("source_tokens") if s else None
    if src:
        shown = [(k, n) for k, n in src.items() if n or k in ("eagle", "ngram", "both")]
        names = {"eagle": "head", "ngram": "n-gram"}
        v["sources_label"] = "/".join(names.get(k, k) for k, _ in shown)
        v["sources"] = " / ".join(str(n) for _, n in shown)
    return v


def _tree_text(tree: dict) -> str:
    if not all(tree.get(k) is not None for k in ("top_k", "depth", "total_tokens")):
        return "engine default"
    return f"k{tree['top_k']} d{tree['depth']} n{tree['total_tokens']}" + (" (chain)" if tree["top_k"] == 1 else "")
