#!/usr/bin/env python
"""Where a speculative step's time goes: draft / verify / bookkeeping ms per step.

Not a test. Builds random-weight targets in memory (a tiny one and, unless
--tiny-only, a Qwen2.5-0.5B-shaped one: 24 layers, hidden 896, 14/2 heads,
MLP 4864, vocab 151936, tied embeddings) with a random EAGLE-3 head shaped
like the published Qwen2.5 heads (draft vocab 32000), runs the engine for a
few tree shapes and reports medians per step:

  draft       head extension + tree expansion (engine's draft_ms)
  verify      target forward over the tree + verification + KV compaction
              (engine's verify_ms)
  bookkeeping step wall time - draft - verify: emitting the step's tokens
              (detokenizer, response objects), building the next inputs
  step        wall time between the first tokens of consecutive steps

plus plain mlx-lm decoding ms/token of the same model. Random heads accept
~nothing (tau ~1), so these are pure costs; speed-ups need a trained head.

  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
      python scripts/microbench.py [--tokens 32] [--tiny-only] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import mlx.core as mx

from eagle3_mlx import testing
from eagle3_mlx.engine import Engine
from eagle3_mlx.head import Eagle3Head, HeadConfig, d2t_from_used
from eagle3_mlx.tree import TreeSpec

SHAPES = [None, (1, 1, 3), (1, 3, 5), (2, 2, 6), (4, 3, 12), (4, 4, 16), (6, 5, 32), (8, 6, 48)]

QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, head_dim=64, vocab_size=151936, rms_norm_eps=1e-6,
              max_position_embeddings=32768, tie_word_embeddings=True)


def build_target(cfg_over: dict, family: str, seed: int, scale: float, dtype: str):
    from mlx_lm.utils import _get_classes

    cfg = testing.tiny_target_config(family, **cfg_over)
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    testing._init_weights(model, seed, scale)
    if dtype != "float32":
        from eagle3_mlx.api import cast_floating

        cast_floating(model, dtype)
    mx.eval(model.parameters())
    return model, cfg


def build_head(model, *, hidden, inter, heads, kv, head_dim, draft_vocab, seed=1, scale=0.02):
    import numpy as np
    from mlx.utils import tree_flatten

    from eagle3_mlx.target import TargetModel

    t = TargetModel(model)
    cfg = HeadConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                     num_key_value_heads=kv, head_dim=head_dim, vocab_size=t.vocab_size,
                     draft_vocab_size=draft_vocab, target_hidden_size=t.hidden_size,
                     aux_layer_ids=list(t.aux_layer_ids))
    head = Eagle3Head(cfg)
    mx.random.seed(seed)
    new = [(n, mx.ones_like(p) if "norm" in n else mx.random.normal(p.shape) * scale)
           for n, p in tree_flatten(head.parameters()) if n != "d2t"]
    head.load_weights(new, strict=False)
    if draft_vocab < t.vocab_size:
        used = np.sort(np.random.default_rng(seed).choice(t.vocab_size, draft_vocab, replace=False))
        head.set_vocab_mapping(d2t_from_used(used))
    mx.eval(head.parameters())
    return head


def measure(engine: Engine, prompts, tokens: int, spec):
    if spec is not None:
        engine.set_tree(*spec)
    draft, verify, book, step, taus = [], [], [], [], []
    n_tok = n_time = 0.0
    for ids in prompts:
        engine.reset()
        last, first_t, last_t = None, None, None
        for r in engine.stream_generate(ids, max_tokens=tokens, speculative=spec is not None):
            now = time.perf_counter()
            if first_t is None:
                first_t = now
            last_t = now
            if r.new_step:
                if last is not None and r.step_index >= 2:
                    wall = (now - last) * 1000
                    draft.append(r.draft_ms)
                    verify.append(r.verify_ms)
                    step.append(wall)
                    book.append(wall - r.draft_ms - r.verify_ms)
                last = now
            tau = r.tokens_per_step
            gen = r.generation_tokens
        taus.append(tau)
        n_tok += gen - 1
        n_time += last_t - first_t
    med = statistics.median
    return dict(draft=med(draft), verify=med(verify), book=med(book), step=med(step),
                tau=sum(taus) / len(taus), tps=n_tok / n_time if n_time else 0.0, steps=len(step))


def plain_mlx_lm(model, tok, prompts, tokens: int) -> float:
    from mlx_lm import stream_generate

    n = t = 0.0
    for ids in prompts:
        first = last = None
        k = 0
        for r in stream_generate(model, tok, ids, max_tokens=tokens):
            now = time.perf_counter()
            first = first or now
            last = now
            k += 1
        n += k - 1
        t += last - first
    return 1000 * t / n


def bench_model(name, model, tok, head, tokens, n_prompts, prompt_len, vocab):
    engine = Engine(model, tok, head)
    mx.random.seed(3)
    prompts = [mx.random.randint(10, vocab, (prompt_len,)).tolist() for _ in range(n_prompts)]
    # warm-up
    engine.set_tree(4, 4, 16)
    for ids in prompts[:1]:
        for _ in engine.stream_generate(ids, max_tokens=4):
            pass
        for _ in engine.stream_generate(ids, max_tokens=4, speculative=False):
            pass
    plain_ms = plain_mlx_lm(model, tok, prompts, tokens)
    print(f"\n## {name}")
    print(f"plain mlx-lm decoding: {plain_ms:.2f} ms/token ({1000 / plain_ms:.1f} tok/s)")
    print(f"{'tree k,d,T':<12} {'draft':>8} {'verify':>8} {'bookkeep':>9} {'step':>8} {'tau':>5} "
          f"{'tok/s':>7}   (ms per step, medians over {n_prompts} prompts x {tokens} tokens)")
    for spec in SHAPES:
        m = measure(engine, prompts, tokens, spec)
        label = "plain(eng)" if spec is None else f"{spec[0]},{spec[1]},{TreeSpec(*spec).num_nodes}"
        print(f"{label:<12} {m['draft']:8.2f} {m['verify']:8.2f} {m['book']:9.2f} {m['step']:8.2f} "
              f"{m['tau']:5.2f} {m['tps']:7.1f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tiny-only", action="store_true")
    args = ap.parse_args(argv)

    from eagle3_mlx.platform import describe_machine, machine_info

    print(f"machine: {describe_machine(machine_info())}")
    print(f"dtype {args.dtype}; random weights (tau ~1: costs only)")
    with tempfile.TemporaryDirectory() as d:
        tok = testing.make_tokenizer(d + "/tiny", vocab_size=384)
        model, cfg = build_target({}, "qwen2", 0, 0.08, args.dtype)
        head = testing.make_random_head(model)
        bench_model("tiny qwen2 (6 layers, hidden 64, vocab 384)", model, tok, head, args.tokens,
                    args.prompts, args.prompt_len, 384)
        if args.tiny_only:
            return 0
        del model, head
        tok = testing.make_tokenizer(d + "/big", vocab_size=QWEN05["vocab_size"], kind="word")
        model, cfg = build_target(QWEN05, "qwen2", 0, 0.02, args.dtype)
        head = build_head(model, hidden=896, inter=4864, heads=14, kv=2, head_dim=64, draft_vocab=32000)
        bench_model("Qwen2.5-0.5B-shaped random (24 layers, hidden 896, vocab 151936; head draft vocab 32000)",
                    model, tok, head, args.tokens, args.prompts, args.prompt_len, QWEN05["vocab_size"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
