#!/usr/bin/env python
"""Quick acceptance check of a candidate head against a stored bench run.

Runs only the speculative side (no plain decoding) of the first N MT-bench
first turns (bench's round-robin order) with the baseline's tree (or ``--tree``) and compares τ
(tokens / target forwards, bench's definition) per prompt with the rows of a
``eagle3-mlx bench --json`` file made with the shipped head. About half the
time of a bench over the same prompts; a screen for new heads, not a
replacement for the full 80-prompt bench.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
      python scripts/compare_head_tau.py runs/qwen-v5/head_ship --prompts 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "benchmarks" / "bench-linux-cpu-qwen2.5-coder-0.5b-shipped-head-v7.json"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("head", help="MLX head directory to measure")
    ap.add_argument("--prompts", type=int, default=8, help="first N MT-bench first turns")
    ap.add_argument("--tree", default=None,
                    help="TOP_K,DEPTH,TOTAL (default: the tree the baseline run used)")
    ap.add_argument("--baseline", type=Path, default=BASELINE, help="bench --json file to compare with")
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args(argv)

    from eagle3_mlx import api
    from eagle3_mlx.bench import encode_messages, run_spec
    from eagle3_mlx.default_model import default_model_dir
    from eagle3_mlx.prompts import load_prompts

    try:
        bench = json.loads(args.baseline.read_text())
        base = {r["id"]: r for r in bench["prompts"] if r.get("turn", 1) == 1}
        if args.tree is None:
            t = bench["config"]["tree"]
            args.tree = f"{t['top_k']},{t['depth']},{t['total_tokens']}"
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"--baseline {args.baseline}: cannot read bench rows ({e})")
    try:
        top_k, depth, total = (int(x) for x in args.tree.split(","))
    except ValueError:
        sys.exit(f"--tree: expected TOP_K,DEPTH,TOTAL, got {args.tree!r}")
    eng = api.load(str(default_model_dir(dtype="float32")), args.head, model_dtype="float32",
                   top_k=top_k, depth=depth, total_tokens=total)
    new_tok = new_fwd = old_tok = old_fwd = 0
    print(f"{'id':>4} {'category':<11} {'tau':>5} {'base':>5} tokens")
    for p in load_prompts("mtbench", limit=args.prompts):
        old = base.get(p.id)
        if old is None:  # before generating, so a wrong baseline costs nothing
            sys.exit(f"--baseline {args.baseline}: no row for prompt {p.id}")
        ids = encode_messages(eng, [{"role": "user", "content": p.turns[0]}])
        r = run_spec(eng, ids, args.max_tokens)
        new_tok += len(r.tokens)
        new_fwd += r.steps
        old_tok += old["tokens"]
        old_fwd += old["target_forwards"]
        print(f"{p.id:>4} {p.category:<11} {len(r.tokens) / r.steps:5.2f} {old['tau']:5.2f} "
              f"{len(r.tokens)} (base {old['tokens']})", flush=True)
    print(f"{args.prompts} prompts, tree {args.tree}: tau {new_tok / new_fwd:.3f}, "
          f"baseline {old_tok / old_fwd:.3f}")


if __name__ == "__main__":
    main()
