"""Matcher cost per decoding step at a given context length: one ``extend`` of
the committed tokens plus one ``propose``, on real code tokens when a tokenizer
is given (else a repetitive synthetic stream).

    python scripts/ngram_cost.py [--context 1024 8192] [--steps 2000]
"""

import argparse
import random
import time

from eagle3_mlx.ngram import ContextMatcher


def stream(n, seed=0):
    rng = random.Random(seed)
    phrases = [[rng.randrange(32000) for _ in range(rng.randrange(3, 20))] for _ in range(300)]
    out = []
    while len(out) < n:
        out += rng.choice(phrases) if rng.random() < 0.7 else [rng.randrange(32000)]
    return out[:n]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--steps", type=int, default=2000)
    a = p.parse_args()
    for ctx in a.context:
        toks = stream(ctx + 2 * a.steps)
        m = ContextMatcher()
        t0 = time.perf_counter()
        m.extend(toks[:ctx])
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        i = ctx
        for _ in range(a.steps):
            m.extend(toks[i:i + 2])        # ~2 committed tokens per step
            m.propose(12, 3)
            i += 2
        per = (time.perf_counter() - t0) / a.steps
        print(f"context {ctx}: build {build * 1000:.1f} ms, per step (extend 2 + propose) {per * 1e6:.1f} us")


if __name__ == "__main__":
    main()
