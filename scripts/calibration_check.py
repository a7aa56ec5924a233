#!/usr/bin/env python
"""Does ``--tree auto`` pick a good tree? Calibration against a measured grid.

Not a test. No trained head exists yet for a real model here, so this uses a
model where acceptance is real: a random llama-shaped target (8 layers, hidden
512) whose decoder layers are weak, with the tests' *oracle* head
(eagle3_mlx.testing.OracleHead: it drafts the target's context-free next token, so most
drafts are accepted, in streaks). It calibrates (verify/draft costs,
teacher-forced acceptance), then runs ``bench``'s measurement (plain mlx-lm vs
speculative, interleaved) for the auto tree and the 14 grid shapes, and prints
the grid, where the auto tree ranks, and predicted vs measured tau per shape.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
      python scripts/calibration_check.py [--prompts 8] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args(argv)

    from eagle3_mlx import bench as B
    from eagle3_mlx.engine import Engine
    from eagle3_mlx.platform import describe_machine, machine_info
    from eagle3_mlx.prompts import load_prompts
    from eagle3_mlx.testing import load_tiny_target, make_oracle_head, make_tiny_target
    from eagle3_mlx.tree import TreeSpec
    from eagle3_mlx.tuning.choose import calibrate
    from eagle3_mlx.tuning.optimise import evaluate
    from eagle3_mlx.tuning.report import format_report

    print(f"machine: {describe_machine(machine_info())}")
    with tempfile.TemporaryDirectory() as d:
        make_tiny_target(d, "llama", weight_scale=0.5, layer_scale=0.004, hidden_size=512,
                         intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64)
        model, tok = load_tiny_target(d)
        eng = Engine(model, tok, make_oracle_head(model))
        cal = calibrate(eng, directory=Path(d) / "cal", log=print)
    print(format_report(cal))
    auto = cal.spec
    lab = B.tree_label(auto)
    trees = [auto] + [TreeSpec(*t) for t in B.DEFAULT_GRID if B.tree_label(TreeSpec(*t)) != lab]
    prompts = load_prompts("mtbench", limit=args.prompts)
    print(f"\nbench: {len(prompts)} MT-bench first turns x {args.max_tokens} tokens, plain + {len(trees)} trees")
    res = B.run_bench(eng, prompts, trees=trees, max_tokens=args.max_tokens, progress=False)
    grid = [{"tree": B.tree_label(t), "summary": res["summary"][B.tree_label(t)]} for t in trees]
    print(B.format_grid(grid, lab))
    best = max(grid, key=lambda g: g["summary"]["spec_tps"])
    a = res["summary"][lab]
    print(f"\nauto {lab}: {a['spec_tps']:.1f} tok/s = {a['spec_tps'] / best['summary']['spec_tps']:.1%} of the "
          f"best grid tree {best['tree']}; speedup {a['speedup']:.2f}x; identical {a['identical']}/{a['compared']}")
    print("\npredicted vs measured tau (tok/s predictions use the calibration-time costs):")
    for g in grid:
        s = TreeSpec(*[int(x) for x in g["tree"].split(",")])
        e = evaluate(s, cal.costs, cal.acceptance)
        print(f"  {g['tree']:<8} tau predicted {e.tau:5.2f} measured {g['summary']['tau']:5.2f} | "
              f"tok/s predicted {e.tps:6.1f} measured {g['summary']['spec_tps']:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
