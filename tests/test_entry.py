"""The front door (eagle3_mlx.entry): one default-model rule for every command,
"Preparing" said only when the default model is prepared, the chat's refusal
without a terminal, and no arrow up from tuning/ to the commands."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest

import eagle3_mlx
from eagle3_mlx import entry


@pytest.fixture
def default_model(monkeypatch):
    """A stub default model whose ensure() logs (prepares) only when told to."""
    state = {"prepare": False, "calls": 0}

    def ensure(cache_dir=None, progress=True, *, dtype=None, log=None):
        state["calls"] += 1
        if state["prepare"]:
            log("eagle3-mlx: assembling")
        return "/cache/default"

    stub = types.SimpleNamespace(ensure_default_model=ensure, default_head_path=lambda: "/heads/shipped",
                                 DEFAULT_MODEL_NAME="tiny-default")
    monkeypatch.setitem(sys.modules, "eagle3_mlx.default_model", stub)
    monkeypatch.setattr(eagle3_mlx, "default_model", stub, raising=False)
    return state


def test_one_default_model_rule(default_model):
    quiet = lambda *a: None  # noqa: E731
    assert entry.resolve_target(None, None, quiet) == entry.Target("/cache/default", "/heads/shipped", "tiny-default")
    assert entry.resolve_target(None, "my/head", quiet).draft == "my/head"
    # the shipped head belongs to the default model only
    assert entry.resolve_target("other/model", None, quiet) == entry.Target("other/model", None)
    assert entry.resolve_target("other/model", "h", quiet) == entry.Target("other/model", "h")
    assert default_model["calls"] == 2


def test_preparing_is_said_only_when_the_default_model_is_prepared(default_model):
    notes: list = []
    entry.resolve_target(None, None, notes.append)
    assert notes == []                                      # cached: nothing to say
    default_model["prepare"] = True
    entry.resolve_target(None, None, notes.append)
    assert notes[0].startswith("Preparing the default model tiny-default") and notes[1] == "assembling"


def test_every_command_declares_the_same_model_options():
    from eagle3_mlx import bench, calibrate, cli
    from eagle3_mlx.server import cli as serve
    from eagle3_mlx.tui import cli as chat

    for parser in (cli.build_generate_parser(), chat.build_parser(), serve.build_parser(),
                   bench.build_parser(), calibrate.build_parser()):
        opts = {o for a in parser._actions for o in a.option_strings}
        assert {"--model", "--draft", "--draft-feedback"} <= opts, parser.prog
        assert next(a for a in parser._actions if "--model" in a.option_strings).default is None


def test_chat_without_a_terminal_refuses_in_one_line(monkeypatch, capsys):
    from eagle3_mlx.tui import cli as chat

    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(isatty=lambda: False))
    assert chat.main(["--model", "m"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a terminal" in err


def test_tuning_imports_no_command_layer():
    root = Path(eagle3_mlx.__file__).parent / "tuning"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
                assert name not in ("..api", "..entry", "eagle3_mlx.api", "eagle3_mlx.entry"), path
