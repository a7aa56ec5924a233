"""``eagle3-mlx calibrate``: measure this machine and a head, show the result.

Contract: :func:`main` is the command. It loads the engine through
:mod:`eagle3_mlx.entry` (the default model and its head when neither is
given) and measures through :func:`eagle3_mlx.tuning.choose.calibrate`, or
with ``--show`` prints cached calibrations without measuring; the text is
:func:`eagle3_mlx.tuning.report.format_report`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .files import write_atomic
from .tuning.cache import Calibration, cache_dir, calibration_key, list_calibrations, load_calibration
from .tuning.report import format_report


def build_parser() -> argparse.ArgumentParser:
    from .entry import add_dtype_arg, add_model_args

    p = argparse.ArgumentParser(
        prog="eagle3-mlx calibrate",
        description="Measure this machine's verify and draft costs and the head's acceptance, and "
                    "pick the draft tree (top_k, depth, total_tokens) with the best expected tok/s. "
                    f"Results are cached in {cache_dir()}.")
    add_model_args(p, draft_source=False)
    add_dtype_arg(p, "platform default")
    p.add_argument("--show", action="store_true",
                   help="show cached calibrations (this model's with --model, else all) without measuring")
    p.add_argument("--force", action="store_true", help="measure again even if cached")
    p.add_argument("--quick", action="store_true", help="fewer widths, prompts and repetitions")
    p.add_argument("--prompts", type=int, default=None,
                   help="built-in calibration prompts for acceptance (default 4, at most 8; not MT-bench)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per acceptance prompt (default 64)")
    p.add_argument("--json", default=None, help="also write the calibration record to this file")
    return p


def show_all() -> int:
    entries = list_calibrations()
    if not entries:
        print(f"no calibrations cached in {cache_dir()}")
        return 0
    for path, rec in entries:
        print(f"== {path}")
        try:
            print(format_report(Calibration.from_dict(rec)))
        except (KeyError, TypeError, ValueError) as e:
            print(f"  unreadable ({e})")
        print()
    return 0


def main(argv=None) -> int:
    from .entry import EngineOptions, load_engine, report_load_failure, resolve_target
    from .platform import default_dtype
    from .tuning.choose import calibrate

    args = build_parser().parse_args(argv)
    if args.show and not args.model:
        return show_all()
    # the command measures the trees itself: none is applied on load
    opts = EngineOptions.from_args(args, dtype=args.dtype or default_dtype(), tree=None)
    try:
        engine = load_engine(opts, resolve_target(args.model, args.draft))
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        return report_load_failure("eagle3-mlx calibrate", e)
    if engine.head is None:
        print("eagle3-mlx calibrate: error: nothing drafts a tree for this model: pass --draft HEAD "
              "(or a model with MTP weights)", file=sys.stderr)
        return 1
    if args.show:
        cal = load_calibration(calibration_key(engine.model, engine.head))
        if cal is None:
            print("no calibration cached for this model, head and machine; run `eagle3-mlx calibrate`")
            return 1
    else:
        cal = calibrate(engine, force=args.force, quick=args.quick, n_prompts=args.prompts,
                        max_tokens=args.max_tokens, log=lambda s: print(s, flush=True))
    print(format_report(cal))
    if args.json:
        write_atomic(Path(args.json), json.dumps(cal.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
