"""Acceptance (tau) of a trained head on held-out prompts, through the engine."""

from __future__ import annotations

import time

import numpy as np


def measure_tau(model, tokenizer, head_dir, prompts, *, max_tokens: int = 128,
                check_lossless: int = 0, **tree) -> dict:
    """Greedy generation with the engine's default tree; tau = generated tokens /
    target forwards (bonus included). ``check_lossless``: for that many prompts
    also decode without speculation and compare the token ids."""
    from ..engine import Engine
    from ..head import load_head
    from ..runs import collect

    head = load_head(head_dir)
    eng = Engine(model, tokenizer, head, **tree)
    per, toks, steps = [], 0, 0
    lossless = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        msgs = [{"role": "user", "content": p["text"]}]
        eng.reset()
        run = collect(eng.stream_generate(msgs, max_tokens=max_tokens, temp=0.0))
        if run.last is not None:
            per.append(run.last.tokens_per_step)
            toks += run.last.generation_tokens
            steps += run.steps
        if i < check_lossless:
            eng.reset()
            ref = collect(eng.stream_generate(msgs, max_tokens=max_tokens, temp=0.0, speculative=False))
            lossless.append(ref.tokens == run.tokens)
    out = dict(tau=toks / max(steps, 1), tau_mean_per_prompt=float(np.mean(per)) if per else 0.0,
               prompts=len(prompts), tokens=toks, steps=steps,
               seconds=round(time.perf_counter() - t0, 1))
    if check_lossless:
        out["lossless"] = all(lossless)
    return out
