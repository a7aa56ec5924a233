"""``eagle3-mlx calibrate``: measure, show and report calibrations.

Contract: :func:`format_report` renders a :class:`~.cache.Calibration` as the
text the command prints (machine, costs, acceptance, best trees, the choice);
:func:`main` is the command: it measures through :func:`.choose.calibrate` or,
with ``--show``, prints cached calibrations without measuring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..files import write_atomic
from .cache import Calibration, cache_dir, calibration_key, list_calibrations, load_calibration
from .choose import calibrate
from .optimise import optimise


def format_report(cal: Calibration, *, top: int = 8) -> str:
    c, a = cal.costs, cal.acceptance
    best, cands = optimise(c, a)
    dev = cal.key.get("device", {})
    m = cal.key.get("model", {})
    lines = [
        f"machine : {dev.get('backend')} | {dev.get('device_name') or dev.get('cpu')} | "
        f"{dev.get('cpu_count')} CPUs | BLAS {dev.get('blas', '-')} | mlx {cal.key.get('mlx')}",
        f"model   : {m.get('model_type')} hidden {m.get('hidden_size')} x {m.get('num_layers')} layers, "
        f"vocab {m.get('vocab_size')} ({cal.key.get('quantization')}), digest {m.get('digest')}",
        f"head    : hidden {cal.key.get('head', {}).get('hidden_size')}, draft vocab "
        f"{cal.key.get('head', {}).get('draft_vocab_size')}, digest {cal.key.get('head', {}).get('digest')}",
        "",
        "verify cost (target forward over T tree tokens + verification + KV compaction):",
        "  T   " + " ".join(f"{t:>7d}" for t in sorted(c.verify_ms)),
        "  ms  " + " ".join(f"{c.verify_ms[t]:7.1f}" for t in sorted(c.verify_ms)),
        "  x1  " + " ".join(f"{c.verify_ms[t] / c.verify(1):7.2f}" for t in sorted(c.verify_ms)),
        "draft cost (ms = a + b * depth):  " + ", ".join(
            f"top_k {k}: {ab[0]:.2f} + {ab[1]:.2f}d" for k, ab in sorted(c.draft_ms.items())),
        f"draft extension: +{c.ext_ms:.2f} ms per extra committed token;  "
        f"per-step bookkeeping: {c.overhead_ms:.2f} ms",
        f"plain decode step: {c.baseline_ms:.2f} ms "
        f"({1000 / c.baseline_ms:.1f} tok/s)",
        "",
        f"acceptance ({a.source}, {len(a.samples)} positions; P(level j accepted | levels < j accepted)):",
        "  level      " + " ".join(f"{j + 1:>6d}" for j in range(a.levels)),
        "  top-1      " + " ".join(f"{p:6.3f}" for p in a.top1_rates()),
        f"  top-{a.max_rank:<2d}     " + " ".join(f"{p:6.3f}" for p in a.per_level_rates),
    ]
    if a.rho != 1.0:
        lines.append(f"  online correction rho = {a.rho:.3f} after {cal.online_steps} steps")
    lines += ["", "best trees (expected):", "  top_k depth  nodes    tau  step ms  tok/s  speedup"]
    for cd in cands[:top]:
        s = cd.spec
        mark = "  <- chosen" if (s.top_k, s.depth, s.num_nodes) == (best.spec.top_k, best.spec.depth,
                                                                    best.spec.num_nodes) else ""
        lines.append(f"  {s.top_k:5d} {s.depth:5d} {s.num_nodes:6d} {cd.tau:6.2f} {cd.step_ms:8.1f} "
                     f"{cd.tps:6.1f} {cd.speedup:7.2f}x{mark}")
    if best not in cands[:top]:
        s = best.spec
        lines.append(f"  {s.top_k:5d} {s.depth:5d} {s.num_nodes:6d} {best.tau:6.2f} {best.step_ms:8.1f} "
                     f"{best.tps:6.1f} {best.speedup:7.2f}x  <- chosen (smallest within 0.5%)")
    lines.append("")
    lines.append(f"chosen tree: --tree {best.spec.top_k},{best.spec.depth},{best.spec.num_nodes}  "
                 f"(expected tau {best.tau:.2f}, {best.tps:.1f} tok/s, {best.speedup:.2f}x plain)")
    if best.speedup < 1.0:
        lines.append("note: speculation is not expected to pay off with this head on this machine "
                     "(acceptance too low for the measured costs).")
    if a.per_level_rates and a.per_level_rates[0] < 0.1:
        lines.append("note: the head accepts almost nothing at level 1 — it looks untrained or made "
                     "for another target.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="eagle3-mlx calibrate",
        description="Measure this machine's verify and draft costs and the head's acceptance, and "
                    "pick the draft tree (top_k, depth, total_tokens) with the best expected tok/s. "
                    f"Results are cached in {cache_dir()}.")
    p.add_argument("--model", default=None, help="MLX target (default: the default model)")
    p.add_argument("--draft", default=None, help="MLX EAGLE-3 head (default: the default head)")
    p.add_argument("--dtype", default=None, help="cast the target, e.g. float32 (default: platform default)")
    p.add_argument("--show", action="store_true",
                   help="show cached calibrations (this model's with --model, else all) without measuring")
    p.add_argument("--force", action="store_true", help="measure again even if cached")
    p.add_argument("--quick", action="store_true", help="fewer widths, prompts and repetitions")
    p.add_argument("--prompts", type=int, default=None, help="built-in calibration prompts for acceptance (default 4, at most 8; not MT-bench)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per acceptance prompt (default 64)")
    p.add_argument("--json", default=None, help="also write the calibration record to this file")
    args = p.parse_args(argv)

    if args.show and not args.model:
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

    from ..api import load
    from ..default_model import default_paths
    from ..platform import default_dtype

    try:
        model, draft = default_paths(args.model, args.draft)
        engine = load(model, draft, model_dtype=args.dtype or default_dtype())
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"eagle3-mlx calibrate: error: {e}", file=sys.stderr)
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
