"""The ``eagle3-mlx`` console script: dispatches to one module per sub-command.

Contract: ``main`` imports only the chosen sub-command's module (each owns its
argparse parser and returns an exit status) after re-executing with OpenBLAS
where that helps; ``generate`` is defined here: one prompt, streamed to stdout,
statistics (:func:`eagle3_mlx.runs.format_stats`) to stderr. Every command
loads its engine through :mod:`eagle3_mlx.entry`.
"""

from __future__ import annotations

import argparse
import importlib
import sys


COMMANDS = {
    "generate": ("eagle3_mlx.cli", "generate_main", "generate text with speculative decoding"),
    "convert": ("eagle3_mlx.convert.cli", "main", "convert a target model or an EAGLE-3 head to MLX"),
    "chat": ("eagle3_mlx.tui.cli", "main", "terminal chat with live speculation statistics"),
    "train": ("eagle3_mlx.train.cli", "main", "train an EAGLE-3 head for a target"),
    "bench": ("eagle3_mlx.bench", "main", "measure speedup against plain mlx-lm decoding"),
    "calibrate": ("eagle3_mlx.calibrate", "main", "pick the best draft tree for this machine"),
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
    from . import distributed

    refused = distributed.setup(name)   # under mlx.launch only: join the group, rank 0 prints
    if refused:
        print(f"eagle3-mlx {name}: error: {refused}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        print(f"eagle3-mlx: error: command {name!r} is not available ({e})", file=sys.stderr)
        return 2
    rc = distributed.run(name, lambda: getattr(mod, func)(argv[1:]))
    return 0 if rc is None else rc


def build_generate_parser() -> argparse.ArgumentParser:
    from .entry import add_dtype_arg, add_model_args, add_sampling_args, add_tree_arg

    p = argparse.ArgumentParser(prog="eagle3-mlx generate", description="Generate text with EAGLE-3 speculative decoding.")
    add_model_args(p)
    p.add_argument("--prompt", "-p", required=True, help="prompt text ('-' reads stdin)")
    add_sampling_args(p, max_tokens=256)
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt (chat template)")
    p.add_argument("--ignore-chat-template", action="store_true")
    p.add_argument("--no-spec", action="store_true", help="plain decoding (no draft) for comparison")
    p.add_argument("--kv-bits", type=int, default=None)
    add_dtype_arg(p)
    add_tree_arg(p)
    return p


def generate_main(argv):
    from .entry import RUN_TUNE_STEPS, EngineOptions, finish, open_engine, report_load_failure
    from .runs import collect, format_stats

    args = build_generate_parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        engine, tuner = open_engine(EngineOptions.from_args(args, speculative=not args.no_spec),
                                    every=RUN_TUNE_STEPS)
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        return report_load_failure("eagle3-mlx generate", e)
    if not args.no_spec and engine.head is not None:
        print(f"draft tree: {engine.spec}", file=sys.stderr)
    if not args.ignore_chat_template and engine.tokenizer.chat_template is not None:
        msgs = [{"role": "system", "content": args.system}] if args.system else []
        prompt = msgs + [{"role": "user", "content": prompt}]

    def show(r):
        print(r.text, end="", flush=True)
        if tuner is not None:
            tuner.observe(r)

    try:
        run = collect(engine.stream_generate(prompt, max_tokens=args.max_tokens, temp=args.temp,
                                             top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                                             seed=args.seed, speculative=not args.no_spec),
                      on_response=show)
    except (ValueError, OSError) as e:
        print(f"eagle3-mlx generate: error: {e}", file=sys.stderr)
        return 1
    print()
    if run.last is not None:
        print("=" * 10, file=sys.stderr)
        print(format_stats(run.last, run.ttft_ms), file=sys.stderr)
    finish(tuner)   # --tree auto: this run's acceptance refreshes the cached calibration
    return 0


if __name__ == "__main__":
    sys.exit(main())
