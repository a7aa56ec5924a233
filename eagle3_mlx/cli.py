"""The ``eagle3-mlx`` console script: dispatches to one module per sub-command.

Contract: ``main`` imports only the chosen sub-command's module (each owns its
argparse parser and returns an exit status) after re-executing with OpenBLAS
where that helps; ``generate`` is defined here: one prompt, streamed to stdout,
statistics (:func:`eagle3_mlx.runs.format_stats`) to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .console import say

COMMANDS = {
    "generate": ("eagle3_mlx.cli", "generate_main", "generate text with speculative decoding"),
    "convert": ("eagle3_mlx.convert.cli", "main", "convert a target model or an EAGLE-3 head to MLX"),
    "chat": ("eagle3_mlx.tui.cli", "main", "terminal chat with live speculation statistics"),
    "train": ("eagle3_mlx.train.cli", "main", "train an EAGLE-3 head for a target"),
    "bench": ("eagle3_mlx.bench", "main", "measure speedup against plain mlx-lm decoding"),
    "calibrate": ("eagle3_mlx.tuning.report", "main", "pick the best draft tree for this machine"),
    "serve": ("eagle3_mlx.server.cli", "serve_main", "OpenAI-compatible HTTP server"),
}


def _usage() -> str:
    lines = ["usage: eagle3-mlx <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "Run `eagle3-mlx <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"eagle3-mlx {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"eagle3-mlx: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name in ("generate", "chat", "bench", "calibrate", "train", "serve"):
        try:
            from .platform import maybe_reexec_with_openblas
        except ImportError:  # platform helpers are optional on non-Linux installs
            maybe_reexec_with_openblas = None
        if maybe_reexec_with_openblas is not None:
            maybe_reexec_with_openblas()
    module, func, _ = COMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        print(f"eagle3-mlx: error: command {name!r} is not available ({e})", file=sys.stderr)
        return 2
    rc = getattr(mod, func)(argv[1:])
    return 0 if rc is None else rc


def add_draft_feedback_arg(p: argparse.ArgumentParser):
    """--draft-feedback, as generate, chat, bench and serve take it."""
    p.add_argument("--draft-feedback", choices=("prenorm", "normed"), default=None,
                   help="state the head feeds back between draft steps (default: what its config says; "
                        "SpecForge EAGLE-3.1 heads trained before 2026-09 need prenorm)")


def add_draft_source_arg(p: argparse.ArgumentParser):
    """--draft-source, as generate, chat and serve take it (bench takes a list)."""
    from .hybrid import SOURCES

    p.add_argument("--draft-source", choices=SOURCES, default=None,
                   help="what drafts the tree: the head (eagle), the model's own MTP module (mtp), "
                        "context n-grams (ngram), or the head or MTP with n-grams in one tree "
                        "(hybrid); default: hybrid with a head or MTP weights, ngram without")


def add_model_args(p: argparse.ArgumentParser, model_required: bool = False):
    """--model, --draft, --draft-source and --draft-feedback, as generate, chat and
    serve take them (without --model: the default model and its shipped head)."""
    p.add_argument("--model", required=model_required,
                   help="target model: mlx-lm directory or Hugging Face repo, converted once if it "
                        "is not MLX" + ("" if model_required else " (default: the default model)"))
    p.add_argument("--draft", default=None,
                   help="EAGLE-3 head: a directory or Hugging Face repo in any published layout "
                        "(converted once, cached); with --model but no --draft, context n-grams draft")
    add_draft_source_arg(p)
    add_draft_feedback_arg(p)


def generate_main(argv):
    from .tuning.choose import add_tree_args

    p = argparse.ArgumentParser(prog="eagle3-mlx generate", description="Generate text with EAGLE-3 speculative decoding.")
    add_model_args(p, model_required=True)
    p.add_argument("--prompt", "-p", required=True, help="prompt text ('-' reads stdin)")
    p.add_argument("--max-tokens", "-m", type=int, default=256)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt (chat template)")
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("--no-spec", action="store_true", help="plain decoding (no draft) for comparison")
    p.add_argument("--kv-bits", type=int, default=None)
    p.add_argument("--dtype", default=None, help="cast target weights, e.g. float32")
    add_tree_args(p)
    args = p.parse_args(argv)
    from . import api
    from .runs import collect, format_stats
    from .tuning.choose import RUN_TUNE_STEPS, apply_tree, auto_tuner, finish_run_tuning

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        engine = api.load(args.model, args.draft, model_dtype=args.dtype, kv_bits=args.kv_bits,
                          draft_source=args.draft_source, draft_feedback=args.draft_feedback)
        tuner = None
        if not args.no_spec and engine.head is not None:
            spec = apply_tree(engine, args.tree, log=say)
            print(f"draft tree: {spec}", file=sys.stderr)
            tuner = auto_tuner(engine, args.tree, every=RUN_TUNE_STEPS)
        if not args.ignore_chat_template and engine.tokenizer.chat_template is not None:
            msgs = ([{"role": "system", "content": args.system}] if args.system else [])
            prompt = msgs + [{"role": "user", "content": prompt}]
        def show(r):
            print(r.text, end="", flush=True)
            if tuner is not None:
                tuner.observe(r)

        run = collect(engine.stream_generate(prompt, max_tokens=args.max_tokens, temp=args.temp,
                                             top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                             seed=args.seed, speculative=not args.no_spec),
                      on_response=show)
        print()
        if run.last is not None:
            print("=" * 10, file=sys.stderr)
            print(format_stats(run.last, run.ttft_ms), file=sys.stderr)
        # --tree auto: this run's acceptance refreshes the cached calibration
        finish_run_tuning(tuner, log=say)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"eagle3-mlx generate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
