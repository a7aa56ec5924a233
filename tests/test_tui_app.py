"""Fast UI tests of `eagle3-mlx chat` with the deterministic fake engine, plus CLI checks."""

from __future__ import annotations

import sys
import threading
import types

import pytest

import eagle3_mlx

from _tui import wait_for

from eagle3_mlx.tui import cli
from eagle3_mlx.tui.app import ChatApp
from eagle3_mlx.tui.errors import ChatSetupError
from eagle3_mlx.tui.fake_engine import FakeEngine
from eagle3_mlx.tui.screens import KEYS, ChatSettings, HelpScreen, SettingsScreen
from eagle3_mlx.tui.widgets import AssistantMessage, NoticeMessage, UserMessage

SIZE = (110, 36)


def fake_app(engine=None, **kw):
    engine = engine or FakeEngine()
    holder = {"engine": engine}
    app = ChatApp(lambda progress: holder["engine"], model_label="fake", clock=lambda: 0.0,
                  animate_loading=False, **kw)
    return app, engine


async def test_enter_sends_shift_enter_and_ctrl_j_insert_newlines(ready_app):
    app, engine = fake_app()
    async with ready_app(app, SIZE) as pilot:
        await pilot.press("a", "shift+enter", "b", "ctrl+j", "c")
        assert app.prompt_input.text == "a\nb\nc"
        assert not engine.calls
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.answers == 1)
        assert engine.calls[0]["prompt"][-1] == {"role": "user", "content": "a\nb\nc"}
        assert app.prompt_input.text == ""
        assert app.query_one(UserMessage).text == "a\nb\nc"
        # empty prompts are not sent
        await pilot.press("enter", " ", "enter")
        await pilot.pause(0.05)
        assert len(engine.calls) == 1


async def test_question_while_loading_is_queued():
    gate = threading.Event()

    def slow_loader(progress):
        progress("Loading fake…", 0.5)
        gate.wait(10)
        return FakeEngine()

    app = ChatApp(slow_loader, animate_loading=False)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: "Loading fake… 50%" in str(app.query_one("#loading").render()))
        assert not app.ready
        await pilot.press(*"hi", "enter")  # the UI does not wait for the model
        assert app.query(AssistantMessage) and "queued" in app.query(NoticeMessage).last().text
        gate.set()
        await wait_for(pilot, lambda: app.answers == 1)
        assert app.query(AssistantMessage).last().text


async def test_settings_screen_edits_sampling_system_prompt_and_tree(ready_app):
    app, engine = fake_app(settings=ChatSettings(max_tokens=64))
    async with ready_app(app, SIZE) as pilot:
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        screen = app.screen
        screen.query_one("#temp").value = "0.7"
        screen.query_one("#top_p").value = "0.9"
        screen.query_one("#max_tokens").value = "7"
        screen.query_one("#top_k_tree").value = "1"
        screen.query_one("#depth").value = "5"
        screen.query_one("#total_tokens").value = "6"
        screen.query_one("#system").text = "Be brief."
        await pilot.click("#save")
        await pilot.pause(0.05)
        assert not isinstance(app.screen, SettingsScreen)
        assert app.settings == ChatSettings(temp=0.7, top_p=0.9, max_tokens=7, system="Be brief.",
                                            top_k_tree=1, depth=5, total_tokens=6)
        await wait_for(pilot, lambda: engine.top_k == 1 and engine.depth == 5)  # set_tree ran
        assert app.stats_panel.values["tree"] == "k1 d5 n6 (chain)"
        await pilot.press(*"hi", "enter")
        await wait_for(pilot, lambda: app.answers == 1)
        call = engine.calls[-1]
        assert call["temp"] == 0.7 and call["top_p"] == 0.9 and call["max_tokens"] == 7
        assert call["prompt"][0] == {"role": "system", "content": "Be brief."}
        # invalid input is refused with a message; escape cancels
        await pilot.press("f2")
        app.screen.query_one("#top_p").value = "3"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        assert "top p" in str(app.screen.query_one("#settings-error").render())
        await pilot.press("escape")
        assert not isinstance(app.screen, SettingsScreen)
        assert app.settings.top_p == 0.9


async def test_help_lists_every_key_and_bindings_exist(ready_app):
    app, _ = fake_app()
    async with ready_app(app, SIZE) as pilot:
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        bound = {k.strip() for b in ChatApp.BINDINGS for k in b.key.split(",")}
        for key in ("escape", "ctrl+n", "ctrl+t", "ctrl+b", "ctrl+s", "f1"):
            assert key in bound
            assert any(key in k for k, _ in KEYS)
        assert any("ctrl+q" in k for k, _ in KEYS) and any("ctrl+p" in k for k, _ in KEYS)
        # Textual's own command palette still opens and lists the chat's commands
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"New chat", "Plain decoding", "Colour by origin", "Settings", "Keys"} <= set(titles)
        assert "Quit the application" in " ".join(c.help for c in app.get_system_commands(app.screen)) \
            or "Quit" in titles


async def test_new_chat_clears_history_and_resets_engine_cache(ready_app):
    app, engine = fake_app()
    async with ready_app(app, SIZE) as pilot:
        await pilot.press(*"one", "enter")
        await wait_for(pilot, lambda: app.answers == 1)
        assert len(app.history) == 2
        engine._cache.append("x")
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: engine._cache == [])
        assert app.history == [] and not app.query(AssistantMessage)
        assert app.stats_panel.values["tau"] == "–"


async def test_toggling_plain_decoding_keeps_the_prompt_cache(ready_app):
    app, engine = fake_app()
    async with ready_app(app, SIZE) as pilot:
        await pilot.press(*"one", "enter")
        await wait_for(pilot, lambda: app.answers == 1)
        cached = list(engine._cache)
        await pilot.press("ctrl+b")
        await pilot.press(*"two", "enter")
        await wait_for(pilot, lambda: app.answers == 2)
        assert engine.calls[-1]["speculative"] is False
        # the second turn re-read only what is new: the conversation so far stayed cached
        assert engine._cache[:len(cached)] == cached
        assert app.last_stats.new_prompt_tokens == len(engine._cache) - len(cached)


async def test_escape_with_slow_engine_freezes_answer(ready_app):
    app, engine = fake_app(FakeEngine("word " * 400, step_delay=0.1), settings=ChatSettings(max_tokens=500))
    async with ready_app(app, SIZE) as pilot:
        await pilot.press(*"go", "enter")
        w = app.query(AssistantMessage).last()
        await wait_for(pilot, lambda: len(w.segments) >= 3)
        await pilot.press("escape")
        kept = w.text
        await wait_for(pilot, lambda: app.turn is None)
        await pilot.pause(0.1)
        assert w.text == kept and app.history[-1]["content"] == kept
        assert len(kept) < len(engine.answer)


async def test_quit_with_ctrl_q_stops_engine_thread(ready_app):
    app, _ = fake_app(FakeEngine(step_delay=0.05), settings=ChatSettings(max_tokens=500))
    async with ready_app(app, SIZE) as pilot:
        await pilot.press(*"go", "enter")
        await pilot.pause(0.1)
        await pilot.press("ctrl+q")
    app.engine_thread.thread.join(2)
    assert not app.engine_thread.thread.is_alive()


# ----------------------------------------------------------------- CLI
def test_cli_parses_all_options():
    p = cli.build_parser()
    a = p.parse_args(["--model", "m", "--draft", "d", "--system", "S", "--temp", "0.5", "--top-p", "0.8",
                      "--max-tokens", "9", "--top-k-tree", "2", "--depth", "3", "--total-tokens", "8"])
    assert cli.tree_kwargs(a) == {"top_k": 2, "depth": 3, "total_tokens": 8}
    s = cli.settings_from_args(a)
    assert (s.temp, s.top_p, s.max_tokens, s.system, s.tree()) == (
        0.5, 0.8, 9, "S", {"top_k": 2, "depth": 3, "total_tokens": 8})
    assert cli.tree_kwargs(p.parse_args(["--depth", "3"])) == {"depth": 3}  # the rest: engine defaults
    with pytest.raises(SystemExit):
        cli._validate(p.parse_args(["--total-tokens", "1"]), p)


def test_no_default_model_says_what_to_pass(monkeypatch):
    monkeypatch.setitem(sys.modules, "eagle3_mlx.default_model", None)  # import fails
    monkeypatch.delattr(eagle3_mlx, "default_model", raising=False)  # an earlier import's attribute
    with pytest.raises(ChatSetupError, match="--model .*--draft"):
        cli.resolve_paths(None, None, lambda *a: None)


def test_default_model_without_head_says_what_to_pass(monkeypatch):
    called = []
    stub = types.SimpleNamespace(
        ensure_default_model=lambda **kw: called.append(kw) or "/x/model",
        default_head_path=lambda: None, DEFAULT_MODEL_NAME="qwen-tiny",
        NO_HEAD_MESSAGE="no trained EAGLE-3 head is shipped")
    monkeypatch.setitem(sys.modules, "eagle3_mlx.default_model", stub)
    monkeypatch.setattr(eagle3_mlx, "default_model", stub, raising=False)
    monkeypatch.setattr(sys.modules["eagle3_mlx"], "default_model", stub, raising=False)
    with pytest.raises(ChatSetupError, match="(?s)no trained EAGLE-3 head.*--draft"):
        cli.resolve_paths(None, None, lambda *a: None)
    assert not called  # the target is not assembled when there is no head
    # a model of the user's own without a head: context n-grams draft
    assert cli.resolve_paths("some/model", None, lambda *a: None) == ("some/model", None)


def test_default_model_with_head_is_used(monkeypatch):
    seen = {}

    def ensure(cache_dir=None, progress=True, *, dtype=None, log=None):
        seen.update(progress=progress, log=log)
        log("eagle3-mlx: converting")
        return "/cache/model"

    stub = types.SimpleNamespace(ensure_default_model=ensure, default_head_path=lambda: "/heads/h")
    monkeypatch.setitem(sys.modules, "eagle3_mlx.default_model", stub)
    monkeypatch.setattr(eagle3_mlx, "default_model", stub, raising=False)
    monkeypatch.setattr(sys.modules["eagle3_mlx"], "default_model", stub, raising=False)
    notes = []
    assert cli.resolve_paths(None, None, lambda t, f=None: notes.append(t)) == ("/cache/model", "/heads/h")
    assert seen["progress"] is False and "converting" in notes


def test_smoke_mode_reports_setup_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "eagle3_mlx.default_model", None)
    monkeypatch.delattr(eagle3_mlx, "default_model", raising=False)
    assert cli.main(["--smoke", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "--draft" in err


async def test_scroll_pinned_to_bottom_unless_user_scrolls_up(ready_app):
    text = "\n\n".join(f"paragraph {i} " + "word " * 12 for i in range(60))
    app, engine = fake_app(FakeEngine(text, step_delay=0.02), settings=ChatSettings(max_tokens=2000))
    async with ready_app(app, (90, 24)) as pilot:
        await pilot.press(*"go", "enter")
        conv = app.conversation
        await wait_for(pilot, lambda: conv.max_scroll_y > 20, what="overflow")
        await pilot.pause(0.1)
        assert conv.scroll_y >= conv.max_scroll_y - 1  # pinned while streaming
        await pilot.press("pageup", "pageup")
        held = conv.scroll_y
        grown = conv.max_scroll_y
        await wait_for(pilot, lambda: conv.max_scroll_y > grown + 5, what="more text")
        assert conv.scroll_y == held  # the user's position is kept while text arrives
        await pilot.press("escape")
        while conv.scroll_y < conv.max_scroll_y:
            await pilot.press("pagedown")
        assert conv.scroll_y == conv.max_scroll_y
        await pilot.press(*"again", "enter")  # a new question pins it to the bottom again
        await wait_for(pilot, lambda: conv.max_scroll_y > held + 40, what="second answer")
        await pilot.pause(0.1)
        assert conv.scroll_y >= conv.max_scroll_y - 1


async def test_stats_refresh_after_shutdown_is_harmless(ready_app):
    # Quitting while an answer streams: the stats timer can fire once more
    # after the widgets are gone (seen as a flaky NoMatches in CI).
    app, engine = fake_app(FakeEngine("word " * 400, step_delay=0.02))
    async with ready_app(app, SIZE) as pilot:
        await pilot.press(*"go", "enter")
        await wait_for(pilot, lambda: app.chunks_received > 2, what="streaming")
    app._stats_dirty = True
    app._refresh_if_dirty()


def test_readme_chat_section_lists_every_key():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Chat", 1)[1].split("\n## ", 1)[0]
    assert "docs/chat.svg" in section
    for keys, _ in KEYS:
        for key in keys.split(" / "):
            assert f"`{key}`" in section, key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is a Linux feature")
def test_ui_thread_priority_is_lowered_for_that_thread_only():
    import os
    import threading

    from eagle3_mlx.tui.app import UI_NICE, lower_ui_thread_priority

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def ui_thread():
        tid = threading.get_native_id()
        seen["before"] = os.getpriority(os.PRIO_PROCESS, tid)
        lower_ui_thread_priority()
        lower_ui_thread_priority()          # idempotent: not lowered twice
        seen["after"] = os.getpriority(os.PRIO_PROCESS, tid)

    t = threading.Thread(target=ui_thread)
    t.start()
    t.join()
    assert seen["after"] == max(seen["before"], UI_NICE)
    # the other threads (here: the engine's role) keep their priority
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


async def test_app_hands_the_gil_over_quickly_while_it_runs_and_restores_it(ready_app):
    from eagle3_mlx.tui.app import GIL_SWITCH_INTERVAL_S

    before = sys.getswitchinterval()
    assert before > GIL_SWITCH_INTERVAL_S          # CPython's default 5 ms
    app, _ = fake_app()
    async with ready_app(app, SIZE) as pilot:
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() == pytest.approx(before)
