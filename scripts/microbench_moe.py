"""Verify cost per tree width: mixture-of-experts targets vs dense ones of the
same active size, on this machine.

Random fp32 models shaped like Qwen3-30B-A3B (128 experts, 8 per token) and
gpt-oss-20b (32 experts, 4 per token, sinks, sliding/full layers), with only a
few decoder layers so memory and time fit, against dense models whose MLP has
the same active width (experts per token x expert width) and the same
attention. Each width T = 1, 2, 4, 8, 16 is one tree-masked verify through
eagle3_mlx's TargetModel.forward over a filled context, median of repeats,
decoder stack only (the lm_head is the same for both and is left out).

Why it matters: a dense verify reads each weight once whatever T is, so a wider
tree is nearly free on a memory-bound machine; T MoE tokens route to up to
T x k different experts, so the weights read grow with T until every expert is
touched.

Usage: flock /tmp/cpu.lock python scripts/microbench_moe.py [--layers 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import subprocess
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import _get_classes

from eagle3_mlx.target import TargetModel, trim_cache

WIDTHS = (1, 2, 4, 8, 16)
VOCAB = 1024  # the lm_head is not timed; a small vocabulary keeps memory down

QWEN_ATTN = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
                 tie_word_embeddings=False)
OSS_ATTN = dict(hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                rms_norm_eps=1e-5)

# name -> (config, real depth, family label)
MODELS = {
    "qwen3-30b-a3b-shaped (MoE 128x768, top-8)": (dict(
        model_type="qwen3_moe", **QWEN_ATTN, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, intermediate_size=6144, decoder_sparse_step=1,
        mlp_only_layers=[], norm_topk_prob=True), 48),
    "dense, same active size (MLP 6144)": (dict(
        model_type="qwen3", **QWEN_ATTN, intermediate_size=8 * 768), 48),
    "gpt-oss-20b-shaped (MoE 32x2880, top-4)": (dict(
        model_type="gpt_oss", **OSS_ATTN, num_local_experts=32, num_experts_per_tok=4,
        intermediate_size=2880, sliding_window=128, rope_theta=150000,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                          original_max_position_embeddings=4096)), 24),
    "dense, same active size (MLP 11520)": (dict(
        model_type="llama", **OSS_ATTN, intermediate_size=4 * 2880, attention_bias=True,
        rope_theta=150000, max_position_embeddings=131072, tie_word_embeddings=False), 24),
}


def cpu_name() -> str:
    """lscpu's model name, and whether the CPU has AVX-512F."""
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
        avx = "avx512f" if " avx512f" in flags else "no avx512f"
    except OSError:
        avx = "avx512f unknown"
    return f"{model} ({avx}, {mx.default_device()})"


def build(cfg: dict, layers: int):
    cfg = dict(cfg, num_hidden_layers=layers, vocab_size=VOCAB)
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    mx.eval(model.parameters())  # mlx's default random init, fp32
    return model


def binary_tree(T: int):
    """Ancestor-or-self matrix and depths of a heap-shaped tree of T nodes (a
    tree-shaped verify: per-token positions and a tree mask, as the engine)."""
    parents = [0] + [(i - 1) // 2 for i in range(1, T)]
    anc = [[j == i for j in range(T)] for i in range(T)]
    depth = [0] * T
    for i in range(1, T):
        anc[i] = [a or b for a, b in zip(anc[parents[i]], anc[i])]
        depth[i] = depth[parents[i]] + 1
    return mx.array(anc), mx.array(depth, dtype=mx.int32)


def time_widths(model, context: int, repeats: int) -> dict:
    """Median seconds of one verify forward per width (stack only)."""
    t = TargetModel(model, aux_layer_ids=[0, 1, len(model.layers)])  # any valid ids: few layers
    cache = t.make_cache()
    ctx = mx.random.randint(3, VOCAB, (1, context)).astype(mx.int32)
    t.forward(ctx, cache, logits_rows=slice(0, 0))
    mx.eval([c.state for c in cache])
    out = {}
    for T in WIDTHS:
        anc, depth = binary_tree(T)
        times = []
        for r in range(repeats + 2):  # two warm-ups
            toks = mx.random.randint(3, VOCAB, (1, T)).astype(mx.int32)
            mx.eval(toks)
            tic = time.perf_counter()
            _, feats = t.forward(toks, cache, tree_mask=anc, positions=context + depth,
                                 logits_rows=slice(0, 0))
            mx.eval(feats, [c.state for c in cache])
            if r >= 2:
                times.append(time.perf_counter() - tic)
            trim_cache(cache, context)
        out[T] = statistics.median(times)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers built (default 2)")
    ap.add_argument("--context", type=int, default=512, help="tokens already in the KV cache")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/moe-verify-cost-linux-cpu.txt")
    args = ap.parse_args()

    rows = []
    for name, (cfg, depth) in MODELS.items():
        tic = time.perf_counter()
        model = build(cfg, args.layers)
        per_layer = {T: s / args.layers for T, s in time_widths(model, args.context, args.repeats).items()}
        rows.append((name, depth, per_layer))
        print(f"{name}: " + ", ".join(f"T={T} {v * 1e3:.2f} ms/layer" for T, v in per_layer.items())
              + f" ({time.perf_counter() - tic:.0f} s)", flush=True)
        del model
        gc.collect()
        mx.clear_cache()

    lines = [
        "Verify cost per tree width: MoE vs dense of the same active size (scripts/microbench_moe.py)",
        f"CPU: {cpu_name()}; mlx {mx.__version__}; fp32 random weights; {args.layers} decoder layers "
        f"built, context {args.context} tokens, tree-masked verify, median of {args.repeats}; "
        "decoder stack only (lm_head excluded)",
        "",
        f"{'model':44s} {'T':>3s} {'ms/layer':>9s} {'x T=1':>6s} {'ms/token':>9s} {'full depth ms':>14s}",
    ]
    for name, depth, per_layer in rows:
        base = per_layer[1]
        for T, v in per_layer.items():
            lines.append(f"{name if T == 1 else '':44s} {T:3d} {v * 1e3:9.2f} {v / base:6.2f} "
                         f"{v * 1e3 / T:9.3f} {v * depth * 1e3:14.1f}")
        lines.append("")
    lines.append("x T=1: verify cost at width T over the one-token cost; full depth ms: ms/layer "
                 "x the real model's layer count (48 and 24), without embedding and lm_head.")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
