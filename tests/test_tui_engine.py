"""Pilot tests of `eagle3-mlx chat` driving the REAL engine on a tiny offline model.

The engine is built on the chat's own engine thread (as the app always does);
the test only wraps it in a recorder that keeps every response the engine
yielded, so the panel can be checked against the engine's own statistics.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from _tui import Recorder, ask, wait_for

from eagle3_mlx.tui.app import ChatApp
from eagle3_mlx.tui.cli import make_loader
from eagle3_mlx.tui.screens import ChatSettings, HelpScreen
from eagle3_mlx.tui.widgets import DRAFT_STYLE, TARGET_STYLE, AssistantMessage, NoticeMessage

SIZE = (120, 40)


def visible(text: str) -> str:
    """``text`` without the control characters Rich drops (tiny models emit some)."""
    return "".join(c for c in text if c in "\n\t" or ord(c) >= 32 and not 127 <= ord(c) < 160)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def recording_loader(model, draft, holder: dict, **engine_kw):
    def loader(progress):
        if engine_kw:
            from mlx_lm import load as mlx_load

            from eagle3_mlx.engine import Engine
            from eagle3_mlx.head import load_head

            m, tok = mlx_load(str(model))
            engine = Engine(m, tok, load_head(draft), **engine_kw)
        else:
            engine = make_loader(str(model), str(draft), tree_arg="4,4,16")(progress)
        holder["rec"] = Recorder(engine)
        return holder["rec"]

    return loader


def make_app(demo_dirs, holder, settings=None, **engine_kw) -> ChatApp:
    model, draft = demo_dirs
    return ChatApp(recording_loader(model, draft, holder, **engine_kw),
                   settings=settings or ChatSettings(max_tokens=48), model_label="tiny",
                   animate_loading=False)


async def test_prompt_streams_answer_and_panel_matches_engine(demo_dirs, ready_app):
    holder: dict = {}
    app = make_app(demo_dirs, holder, ChatSettings(max_tokens=96))
    app.engine_thread._flush_interval = 0.0  # one post per token: proves streaming
    async with ready_app(app, SIZE) as pilot:
        widget = await ask(pilot, app, "hello there")
        rec = holder["rec"]
        final = rec.answers[-1][-1]
        # the prompt went to the engine as a chat message list
        assert rec.calls[-1]["prompt"] == [{"role": "user", "content": "hello there"}]
        assert rec.calls[-1]["speculative"] is True
        # streamed: many chunks, and the shown text is exactly what the engine produced
        assert app.chunks_received > 5
        produced = "".join(r.text for r in rec.answers[-1])
        assert produced and widget.text == produced
        assert widget.markdown.source == produced
        # the panel shows the engine's own figures for this answer
        v = app.stats_panel.values
        assert v["tau"] == f"{final.tokens_per_step:.2f}"
        assert v["tps"] == f"{final.generation_tps:.1f}"
        assert v["tokens"] == str(final.generation_tokens)
        assert v["steps"] == str(final.steps)
        shown = app.stats_panel.text()
        assert f"{final.tokens_per_step:.2f}" in shown and f"{final.generation_tps:.1f}" in shown
        stats = app.last_stats
        assert sum(stats.histogram().values()) == final.steps
        # each step's committed length (the last one may be cut by max_tokens)
        assert sum(stats.step_lengths[:-1]) < final.generation_tokens <= sum(stats.step_lengths)
        assert stats.last_step == final.step_tokens
        assert final.tokens_per_step > 1.0  # the tiny head's drafts are accepted at times
        assert v["tree"] == "k4 d4 n16"
        assert v["ttft"].endswith(" ms") and v["peak_memory"].endswith("B")


async def test_escape_stops_at_once_and_next_prompt_works(demo_dirs, ready_app):
    holder: dict = {}
    app = make_app(demo_dirs, holder, ChatSettings(max_tokens=3000))
    async with ready_app(app, SIZE) as pilot:
        await pilot.press(*"Tell me a story", "enter")
        widget = app.query(AssistantMessage).last()
        await wait_for(pilot, lambda: len(widget.segments) >= 5, what="first tokens")
        await pilot.press("escape")
        assert not app.generating and widget.finished  # frozen at once
        kept = widget.text
        assert kept
        rec = holder["rec"]
        await wait_for(pilot, lambda: app.turn is None, what="engine to notice the cancel")
        final = rec.answers[-1][-1]
        assert final.finish_reason == "cancelled"
        assert final.generation_tokens < 3000
        assert widget.text == kept  # nothing appended after escape
        assert any(n.text == "(stopped)" for n in app.query(NoticeMessage))
        assert app.history[-1] == {"role": "assistant", "content": kept}
        # the next prompt works and the cancelled answer is part of the context
        app.settings = dataclasses.replace(app.settings, max_tokens=16)
        widget2 = await ask(pilot, app, "hi")
        assert widget2 is not widget and widget2.text
        assert rec.answers[-1][-1].finish_reason in ("length", "stop")
        assert rec.calls[-1]["prompt"][1] == {"role": "assistant", "content": kept}


async def test_second_turn_reuses_prompt_cache(demo_dirs, ready_app):
    holder: dict = {}
    app = make_app(demo_dirs, holder, ChatSettings(max_tokens=24))
    async with ready_app(app, SIZE) as pilot:
        await ask(pilot, app, "hello there")
        rec = holder["rec"]
        p1 = rec.prompt_tokens_processed
        await ask(pilot, app, "What is MLX?")
        p2 = rec.prompt_tokens_processed
        conversation = rec.calls[-1]["prompt"]
        assert len(conversation) == 3
        req = app.engine_thread.call(lambda e: len(e.encode(conversation)))
        await wait_for(pilot, req.done.is_set, what="encode on the engine thread")
        full = req.result
        assert 0 < p2 - p1 < full, (p1, p2, full)
        # the panel says how much of the prompt was new
        assert app.stats_panel.values["prefill"] == f"{p2 - p1} new / {full}"


async def test_colour_toggle_shows_token_origin(demo_dirs, ready_app):
    holder: dict = {}
    app = make_app(demo_dirs, holder, ChatSettings(max_tokens=64))
    async with ready_app(app, SIZE) as pilot:
        widget = await ask(pilot, app, "hello there")
        rs = [r for r in holder["rec"].answers[-1] if r.text]
        assert widget.markdown.display and not widget.origin_view.display
        await pilot.press("ctrl+t")
        assert app.coloured and app.screen.has_class("-origin")
        assert widget.origin_view.display and not widget.markdown.display
        spans = widget._origin.spans
        draft = [s for s in spans if str(s.style) == DRAFT_STYLE]
        target = [s for s in spans if str(s.style) == TARGET_STYLE]
        assert len(draft) == sum(r.from_draft for r in rs) > 0
        assert len(target) == sum(not r.from_draft for r in rs) > 0
        assert widget._origin.plain == visible(widget.text)
        assert " draft " in app.stats_panel.text()  # legend
        # a new answer streams coloured too
        widget2 = await ask(pilot, app, "hi")
        assert widget2.origin_view.display and widget2._origin.plain == visible(widget2.text)
        await pilot.press("ctrl+t")
        assert not app.coloured and widget.markdown.display and not widget.origin_view.display


async def test_plain_decoding_toggle_compares_speed(demo_dirs, ready_app):
    holder: dict = {}
    app = make_app(demo_dirs, holder, ChatSettings(max_tokens=24))
    async with ready_app(app, SIZE) as pilot:
        await ask(pilot, app, "hello there")
        rec = holder["rec"]
        spec_final = rec.answers[-1][-1]
        await pilot.press("ctrl+b")
        assert app.plain
        widget = await ask(pilot, app, "What is MLX?")
        assert rec.calls[-1]["speculative"] is False
        plain = rec.answers[-1]
        assert all(not r.from_draft and r.step_tokens == 1 for r in plain)
        assert not widget.speculative
        v = app.stats_panel.values
        assert v["mode"] == "plain decoding"
        assert v["tau"] == "1.00"
        assert v["plain_tps"] == f"{plain[-1].generation_tps:.1f}"
        assert v["spec_tps"] == f"{spec_final.generation_tps:.1f}"
        assert v["speedup"] == f"{spec_final.generation_tps / plain[-1].generation_tps:.2f}×"
        await pilot.press("ctrl+b")
        assert not app.plain
        await ask(pilot, app, "hi")
        assert rec.calls[-1]["speculative"] is True
        assert app.stats_panel.values["mode"] == "speculative"


async def test_engine_error_is_shown_and_app_keeps_working(demo_dirs, ready_app):
    holder: dict = {}
    app = make_app(demo_dirs, holder, ChatSettings(max_tokens=16))
    async with ready_app(app, SIZE) as pilot:
        holder["rec"].fail_next = RuntimeError("[metal::malloc] Attempting to allocate 99 GB: out of memory")
        before = len(app.errors)
        await pilot.press(*"hello there", "enter")
        await wait_for(pilot, lambda: len(app.errors) > before and app.turn is None, what="error")
        errs = [n for n in app.query(NoticeMessage) if n.is_error]
        assert errs and "Out of memory" in errs[-1].text
        assert app.history == []  # the failed turn is not sent as context
        widget = await ask(pilot, app, "hi")
        assert widget.text and app.history[-1]["content"] == widget.text


async def test_context_limit_is_reported_and_new_chat_recovers(demo_dirs, ready_app):
    holder: dict = {}
    app = make_app(demo_dirs, holder, ChatSettings(max_tokens=200), max_context=48)
    async with ready_app(app, SIZE) as pilot:
        await ask(pilot, app, "hello there")
        assert holder["rec"].answers[-1][-1].finish_reason == "context"
        assert any("Context limit" in n.text for n in app.query(NoticeMessage) if n.is_error)
        # the conversation no longer fits: the engine refuses, the chat says so
        before = len(app.errors)
        await pilot.press(*"more please", "enter")
        await wait_for(pilot, lambda: len(app.errors) > before and app.turn is None, what="error")
        assert "Context limit" in app.errors[-1]
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: not app.query(AssistantMessage), what="new chat")
        assert app.history == []
        widget = await ask(pilot, app, "hi")
        assert widget.text


async def test_bad_model_path_is_a_message_not_a_crash(tmp_path):
    app = ChatApp(make_loader(str(tmp_path / "no-model"), str(tmp_path / "no-head")),
                  model_label="bad", animate_loading=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.load_error is not None, what="load failure")
        assert "no-model" in app.load_error
        errs = [n for n in app.query(NoticeMessage) if n.is_error]
        assert errs and "Could not load the model" in errs[0].text
        await pilot.press(*"hello", "enter")
        await pilot.pause(0.1)
        assert "No model is loaded" in [n for n in app.query(NoticeMessage) if n.is_error][-1].text
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        assert app.is_running


def test_engine_runs_on_one_thread(demo_dirs, ready_app):
    """Loading and every generation happen on the same long-lived thread."""
    seen = []

    async def run():
        holder: dict = {}
        model, draft = demo_dirs
        base = recording_loader(model, draft, holder)

        def loader(progress):
            import threading

            seen.append(("load", threading.get_ident()))
            return base(progress)

        app = ChatApp(loader, settings=ChatSettings(max_tokens=8), animate_loading=False)
        orig = Recorder.stream_generate

        def spy(self, prompt, **kw):
            import threading

            seen.append(("gen", threading.get_ident()))
            return orig(self, prompt, **kw)

        Recorder.stream_generate = spy
        try:
            async with ready_app(app, SIZE) as pilot:
                await ask(pilot, app, "hi")
                await ask(pilot, app, "hello")
                ui = app._thread_id
        finally:
            Recorder.stream_generate = orig
        return ui

    ui_thread = asyncio.run(run())
    threads = {t for _, t in seen}
    assert len(seen) == 3 and len(threads) == 1 and ui_thread not in threads


async def test_settings_change_the_real_engines_tree(demo_dirs, ready_app):
    holder: dict = {}
    app = make_app(demo_dirs, holder, ChatSettings(max_tokens=12))
    async with ready_app(app, SIZE) as pilot:
        assert app.stats_panel.values["tree"] == "k4 d4 n16"  # read from the engine
        await pilot.press("ctrl+s")
        for name, value in (("top_k_tree", "1"), ("depth", "3"), ("total_tokens", "4")):
            app.screen.query_one(f"#{name}").value = value
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.stats_panel.values["tree"] == "k1 d3 n4 (chain)", what="tree")
        spec = holder["rec"].spec
        assert (spec.top_k, spec.depth, spec.total_tokens) == (1, 3, 4)
        widget = await ask(pilot, app, "hello there")
        assert widget.text
        # a tree the engine refuses is reported, and the panel keeps the real one
        app._apply_settings(dataclasses.replace(app.settings, top_k_tree=-1))
        await wait_for(pilot, lambda: any("Could not change the tree" in e for e in app.errors), what="refusal")
        assert app.stats_panel.values["tree"] == "k1 d3 n4 (chain)"


def test_smoke_mode_answers_once_and_prints_statistics(demo_dirs, capsys):
    from eagle3_mlx.tui import cli

    model, draft = demo_dirs
    rc = cli.main(["--model", str(model), "--draft", str(draft), "--max-tokens", "12", "--smoke", "hello there"])
    out = capsys.readouterr().out
    assert rc == 0
    stats = out.strip().splitlines()[-1]
    assert stats.startswith("[12 tokens · ") and "tokens/step" in stats and "tok/s" in stats
    assert "finish length" in stats
