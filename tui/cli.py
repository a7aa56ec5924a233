"""`eagle3-mlx chat`: command line of the terminal chat.

    eagle3-mlx chat [--model M] [--draft D] [--draft-source eagle|mtp|ngram|hybrid]
                    [--system TEXT] [--temp T] [--top-p P]
                    [--max-tokens N] [--top-k-tree K --depth D --total-tokens N]
                    [--plain] [--smoke "question"]

Also runnable as ``python -m eagle3_mlx.tui.cli``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from eagle3_mlx.console import say
from eagle3_mlx.entry import (RUN_TUNE_STEPS, EngineOptions, add_model_args, add_sampling_args, add_tree_arg,
                              attach_tuner, finish, load_engine, open_engine, report_load_failure,
                              resolve_target, short_name)

NO_TERMINAL = ("eagle3-mlx chat: error: the chat needs a terminal (stdin and stdout are not one); "
               "for one answer without the UI use --smoke QUESTION, or eagle3-mlx generate / serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eagle3-mlx chat",
        description="Terminal chat that shows EAGLE-3 speculative decoding at work "
                    "(tokens per step, draft vs target tokens, speed against plain decoding).",
    )
    add_model_args(p)
    p.add_argument("--system", default="", help="system prompt")
    add_sampling_args(p, max_tokens=512, short=False)
    tree = p.add_argument_group("draft tree (default: calibrated for this machine)")
    add_tree_arg(tree)
    tree.add_argument("--top-k-tree", type=int, help="children expanded per draft node (1 = chain); "
                                                      "these three override parts of --tree")
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


def resolve_paths(model: str | None, draft: str | None, progress: Callable[..., None]):
    """(model, draft) by the one default-model rule (:func:`eagle3_mlx.entry.resolve_target`)."""
    target = resolve_target(model, draft, progress)
    return target.model, target.draft


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
    has no ``make_tuner`` and is never changed."""
    from eagle3_mlx.tuning.choose import is_auto_tree

    opts = EngineOptions(model=model, draft=draft, draft_source=draft_source, draft_feedback=draft_feedback,
                         tree=tree_arg, shape=dict(tree or {}))

    def loader(progress: Callable[..., None]):
        return load_engine(opts, resolve_target(model, draft, progress), progress)

    if not opts.shape and is_auto_tree(tree_arg):
        loader.make_tuner = lambda engine: attach_tuner(engine, opts, **(tuner_options or {}))
    return loader


def model_label(model: str | None, draft: str | None) -> str:
    if not model:
        return "default model" + (f" + {short_name(draft)}" if draft else "")
    return f"{short_name(model)} + {short_name(draft)}" if draft else short_name(model)


def settings_from_args(args):
    from eagle3_mlx.tui.screens import ChatSettings

    return ChatSettings(temp=args.temp, top_p=args.top_p, max_tokens=args.max_tokens, system=args.system,
                        top_k_tree=args.top_k_tree, depth=args.depth, total_tokens=args.total_tokens)


def smoke(args) -> int:
    """Answer one question without the UI (CI check of the README command)."""
    from eagle3_mlx.runs import collect, format_stats

    opts = EngineOptions.from_args(args, shape=tree_kwargs(args), speculative=not args.plain)
    try:
        # --tree auto: the answer's acceptance refreshes the cached calibration
        engine, tuner = open_engine(opts, progress=say, every=RUN_TUNE_STEPS)
    except Exception as exc:  # noqa: BLE001 - a message, not a traceback
        return report_load_failure("eagle3-mlx chat", exc)
    msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.smoke}]

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
    finish(tuner)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    _validate(args, parser)
    if args.smoke is not None:
        return smoke(args)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # Textual without a terminal would poll a closed input at full speed.
        print(NO_TERMINAL, file=sys.stderr)
        return 2

    from eagle3_mlx.tui.app import ChatApp

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
