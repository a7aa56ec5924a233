"""`eagle3-mlx chat`: command line of the terminal chat.

    eagle3-mlx chat [--model M] [--draft D] [--draft-source eagle|mtp|ngram|hybrid]
                    [--system TEXT] [--temp T] [--top-p P]
                    [--max-tokens N] [--top-k-tree K --depth D --total-tokens N]
                    [--plain] [--smoke "question"]

Also runnable as ``python -m eagle3_mlx.tui.cli``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from eagle3_mlx.console import say

from .errors import ChatSetupError

USAGE_HINT = (
    "Start the chat with a target model and its EAGLE-3 draft head:\n"
    "  eagle3-mlx chat --model <mlx-lm model dir or HF repo> --draft <EAGLE-3 head dir or HF repo>\n"
    "(--draft takes a head in any published layout; it is converted once and cached)."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eagle3-mlx chat",
        description="Terminal chat that shows EAGLE-3 speculative decoding at work "
                    "(tokens per step, draft vs target tokens, speed against plain decoding).",
    )
    from eagle3_mlx.cli import add_model_args

    add_model_args(p)
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy; default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--max-tokens", type=int, default=512, help="maximum tokens per answer (default 512)")
    tree = p.add_argument_group("draft tree (default: calibrated for this machine)")
    tree.add_argument("--tree", default="auto",
                      help="'auto' (calibrated for this machine, cached) or TOP_K,DEPTH,TOTAL_TOKENS; "
                           "the three options below override parts of it")
    tree.add_argument("--top-k-tree", type=int, help="children expanded per draft node (1 = chain)")
    tree.add_argument("--depth", type=int, help="draft levels after the first")
    tree.add_argument("--total-tokens", type=int,
                      help="tree size verified per target step, root included (>= 2)")
    p.add_argument("--plain", action="store_true", help="start with plain decoding (no speculation)")
    p.add_argument("--smoke", metavar="QUESTION",
                   help="no UI: load, answer QUESTION once, print the answer and a statistics line, exit")
    return p


def _validate(args, parser) -> None:
    tree = [args.top_k_tree, args.depth, args.total_tokens]
    if any(t is not None and t < 1 for t in tree):
        parser.error("tree options must be positive")
    if args.total_tokens is not None and args.total_tokens < 2:
        parser.error("--total-tokens must be at least 2 (the root and one draft token)")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be positive")
    if not 0.0 <= args.top_p <= 1.0:
        parser.error("--top-p must be in [0, 1]")
    if args.temp < 0:
        parser.error("--temp must be >= 0")


def tree_kwargs(args) -> dict:
    """The tree options given on the command line (the engine keeps its defaults for the rest)."""
    given = {"top_k": args.top_k_tree, "depth": args.depth, "total_tokens": args.total_tokens}
    return {k: v for k, v in given.items() if v is not None}


def _name(path: Any) -> str:
    s = str(path).rstrip("/")
    return Path(s).name if "/" in s and Path(s).exists() else s


def resolve_paths(model: str | None, draft: str | None, progress: Callable[..., None]):
    """Model and draft paths; the default model (eagle3_mlx.default_model) when
    neither is given.  Raises ChatSetupError with what to pass instead."""
    if model and draft:
        return model, draft
    if draft and not model:
        raise ChatSetupError(f"--draft was given without --model.\n{USAGE_HINT}")
    if model and not draft:
        return model, None          # no head: the engine speculates from context n-grams
    try:
        from eagle3_mlx import default_model as dm
    except ImportError:
        dm = None
    ensure = getattr(dm, "ensure_default_model", None)
    head_path = getattr(dm, "default_head_path", None)
    if ensure is None or head_path is None:
        raise ChatSetupError(f"No default model is available in this installation.\n{USAGE_HINT}")
    # Check for the head first: no point assembling the target without it.
    head = head_path()
    name = getattr(dm, "DEFAULT_MODEL_NAME", "the default model")
    if not head:
        why = getattr(dm, "NO_HEAD_MESSAGE", "no EAGLE-3 head is shipped for the default model yet")
        raise ChatSetupError(f"The default model ({name}) cannot be used: {why}.\n{USAGE_HINT}")
    progress(f"Preparing the default model {name} (the first run assembles and converts it)…")
    params = _params(ensure)
    kw = {}
    if "log" in params:
        kw["log"] = lambda m: progress(str(m).removeprefix("eagle3-mlx: "))
    if "progress" in params:
        kw["progress"] = False  # a bool there: no tqdm bars on the terminal Textual owns
    try:
        model_path = ensure(**kw)
    except Exception as exc:  # noqa: BLE001 - DefaultModelError and friends
        raise ChatSetupError(f"The default model ({name}) is not available: {exc}\n{USAGE_HINT}") from exc
    return str(model_path), str(head)


def make_loader(model: str | None, draft: str | None, tree: dict | None = None,
                tree_arg: str = "auto", tuner_options: dict | None = None,
                draft_source: str | None = None, draft_feedback: str | None = None):
    """A loader for EngineThread: runs on the engine thread, returns the engine.
    Explicit tree options win; otherwise ``tree_arg`` ('auto' calibrates once per
    machine and model, then reads the cache).

    With the calibrated tree ('auto' and no explicit options) the loader also
    carries ``make_tuner(engine)``: the engine thread builds an OnlineTuner
    with it (``tuner_options``: its keyword arguments, e.g. ``every``) that
    refreshes the acceptance estimate while the chat runs.  An explicit tree
    has no ``make_tuner`` and is never changed.  ``draft_source``: "eagle",
    "ngram" or "hybrid" (default: the engine's, hybrid with a head)."""
    tree = dict(tree or {})

    def loader(progress: Callable[..., None]):
        m, d = resolve_paths(model, draft, progress)
        progress(f"Loading {_name(m)} with draft head {_name(d)}…" if d
                 else f"Loading {_name(m)} (no draft head: context n-grams draft)…")
        from eagle3_mlx.api import load

        engine = load(m, d, draft_source=draft_source, draft_feedback=draft_feedback,
                      log=lambda t: progress(str(t).removeprefix("eagle3-mlx: ")), **tree)
        if not tree and engine.head is not None:
            from eagle3_mlx.tuning.choose import apply_tree

            progress("Choosing the draft tree for this machine…")
            apply_tree(engine, tree_arg, log=progress)
        return engine

    from eagle3_mlx.tuning.choose import auto_tuner, is_auto_tree

    if not tree and is_auto_tree(tree_arg):
        options = dict(tuner_options or {})

        def make_tuner(engine):
            return auto_tuner(engine, tree_arg, **options)

        loader.make_tuner = make_tuner
    return loader


def _params(fn) -> dict:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def model_label(model: str | None, draft: str | None) -> str:
    if not model and not draft:
        return "default model"
    if model and draft:
        return f"{_name(model)} + {_name(draft)}"
    return _name(model or draft)


def settings_from_args(args):
    from .screens import ChatSettings

    return ChatSettings(temp=args.temp, top_p=args.top_p, max_tokens=args.max_tokens, system=args.system,
                        top_k_tree=args.top_k_tree, depth=args.depth, total_tokens=args.total_tokens)


def smoke(args) -> int:
    """Answer one question without the UI (CI check of the README command)."""
    from eagle3_mlx.runs import collect, format_stats

    def progress(text, fraction=None):
        say(text)

    from eagle3_mlx.tuning.choose import RUN_TUNE_STEPS, finish_run_tuning

    loader = make_loader(args.model, args.draft, tree_kwargs(args), args.tree,
                         tuner_options={"every": RUN_TUNE_STEPS}, draft_source=args.draft_source,
                         draft_feedback=args.draft_feedback)
    try:
        engine = loader(progress)
    except Exception as exc:  # noqa: BLE001 - a message, not a traceback
        from .engine_thread import report_load_failure

        return report_load_failure("eagle3-mlx chat", exc)
    msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.smoke}]
    # --tree auto: the answer's acceptance refreshes the cached calibration
    make_tuner = getattr(loader, "make_tuner", None)
    tuner = make_tuner(engine) if make_tuner is not None and not args.plain else None

    def show(r):
        sys.stdout.write(r.text)
        sys.stdout.flush()
        if tuner is not None:
            tuner.observe(r)

    run = collect(engine.stream_generate(msgs, max_tokens=args.max_tokens, temp=args.temp,
                                         top_p=args.top_p, speculative=not args.plain),
                  on_response=show)
    print()
    if run.last is not None:
        print(format_stats(run.last, run.ttft_ms))
    finish_run_tuning(tuner, log=say)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    _validate(args, parser)
    if args.smoke is not None:
        return smoke(args)

    from .app import ChatApp

    app = ChatApp(make_loader(args.model, args.draft, tree_kwargs(args), args.tree,
                              draft_source=args.draft_source, draft_feedback=args.draft_feedback),
                  settings=settings_from_args(args), model_label=model_label(args.model, args.draft))
    app.plain = args.plain
    app.run()
    if app.load_error:
        print(f"eagle3-mlx chat: {app.load_error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
