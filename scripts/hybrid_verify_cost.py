"""Verify cost of a tree on a Gated DeltaNet hybrid, per recurrent design.

Builds a random Qwen3.5-0.8B-shaped target (mlx-lm's ``qwen3_5`` module: 24
layers, 18 linear-attention + 6 full-attention, hidden 1024, tied 248k
vocabulary; fp32 on a CPU), fills a context, and times one plain decoding step
and the tree verification (``engine.verify_step``: forward under the tree mask,
acceptance, commit) for several tree shapes with each strategy of
``eagle3_mlx.recurrent``. Medians over repeats, all in one run.

    python scripts/hybrid_verify_cost.py --out benchmarks/hybrid-verify-cost-linux-cpu.txt
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

QWEN3_5_0_8B = dict(
    model_type="qwen3_5", hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, vocab_size=248320,
    linear_num_value_heads=16, linear_num_key_heads=16, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
    tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=32768,
    rope_parameters=dict(rope_type="default", rope_theta=10000000.0, partial_rotary_factor=0.25),
)

# (label, parents): chains and trees of the widths a step verifies.
def shapes():
    def chain(n):
        return [0] + list(range(n - 1))

    def ktree(k, depth, total):
        parents, level = [0], [0]
        while len(parents) < total and depth:
            nxt = []
            for p in level:
                for _ in range(k):
                    if len(parents) < total:
                        parents.append(p)
                        nxt.append(len(parents) - 1)
            level, depth = nxt[:k], depth - 1
        return parents

    return [("chain 2", chain(2)), ("chain 4", chain(4)), ("chain 7", chain(7)),
            ("tree 2x3 (8)", ktree(2, 3, 8)), ("tree 4x4 (16)", ktree(4, 4, 16)),
            ("tree 4x6 (24)", ktree(4, 6, 24))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from mlx_lm.utils import _get_classes

    from eagle3_mlx.engine import decode_step, verify_step
    from eagle3_mlx.platform import device_description
    from eagle3_mlx.recurrent import STRATEGIES
    from eagle3_mlx.target import TargetModel, trim_cache
    from eagle3_mlx.tree import tree_from_parents
    from eagle3_mlx.verify import SamplingParams

    model_cls, args_cls = _get_classes(QWEN3_5_0_8B)
    model = model_cls(args_cls.from_dict(dict(QWEN3_5_0_8B)))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    target = TargetModel(model)
    greedy = SamplingParams()
    cache = target.make_cache()
    rng = np.random.default_rng(0)
    ctx = mx.array(rng.integers(0, 1000, size=args.context), dtype=mx.int32)[None]
    target.forward(ctx, cache)
    mx.eval([c.state for c in cache])

    def timed(fn):
        fn()
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
            trim_cache(cache, args.context)
        return statistics.median(out)

    root = mx.array([7], dtype=mx.int32)

    def plain():
        decode_step(target, cache, root, greedy)
        trim_cache(cache, args.context)

    plain_ms = timed(plain)
    lines = [f"# Tree verify cost on a random Qwen3.5-0.8B-shaped target (fp32), context {args.context}",
             "# machine: " + ", ".join(f"{k} {v}" for k, v in device_description().items()) + f"; median of {args.repeats}",
             f"# plain decoding step: {plain_ms:.1f} ms",
             "| shape | nodes | depth | " + " | ".join(f"{s} ms (x plain)" for s in STRATEGIES) + " |",
             "|---|---|---|" + "---|" * len(STRATEGIES)]
    print("\n".join(lines), flush=True)
    for label, parents in shapes():
        tree = tree_from_parents(rng.integers(0, 1000, size=len(parents)).tolist(), parents)
        cells = []
        for s in STRATEGIES:
            target.recurrent_strategy = s

            def verify():
                verify_step(target, cache, tree, args.context, greedy)
                trim_cache(cache, args.context)

            ms = timed(verify)
            cells.append(f"{ms:.1f} ({ms / plain_ms:.2f}x)")
        depth = int(max(np.array(tree.depths.tolist())))
        row = f"| {label} | {len(parents)} | {depth} | " + " | ".join(cells) + " |"
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
