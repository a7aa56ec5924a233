"""Sampling with hybrid trees keeps the target's distribution (chi-square), with
n-gram and head candidates on the same tree level and sharing nodes."""

import mlx.core as mx
import numpy as np
import pytest

from eagle3_mlx.engine import Engine
from eagle3_mlx.hybrid import EAGLE, NGRAM
from eagle3_mlx.ngram import ContextMatcher
from eagle3_mlx.testing import make_random_head
from eagle3_mlx.verify import SamplingParams
from test_sampling import N_RUNS, chi2_pvalue, exact_first_two, small_vocab  # noqa: F401


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temp=1.0), SamplingParams(temp=0.7, top_p=0.8)],
    ids=["temp", "temp+top_p"],
)
def test_hybrid_sampling_follows_target(small_vocab, params):
    model, tok = small_vocab
    head = make_random_head(model, seed=7, weight_scale=0.3)
    eng = Engine(model, tok, head, top_k=3, depth=2, total_tokens=8, draft_source="hybrid",
                 ngram_min_score=0.0, ngram_candidates=3)
    eng.tokenizer.eos_token_ids = set()
    # Every token occurs twice, followed by different tokens, and 1-grams count:
    # whatever the first token, the n-gram proposes candidates at level 1 next
    # to the head's three (sometimes the same token as one of the head's).
    eng.matcher = ContextMatcher(min_ngram=1)
    rng = np.random.default_rng(2)
    prompt = [int(x) for x in np.concatenate([rng.permutation(16), rng.permutation(16)])]
    seen = {"shared": 0, "same_level": 0}
    draft = eng._draft

    def recording_draft(*a):
        tree, merged = draft(*a)
        depths = tree.depths.tolist()
        src = merged.sources
        seen["shared"] += any(s == EAGLE | NGRAM for s in src)
        for d in set(depths[1:]):
            kinds = {src[i] for i in range(tree.size) if depths[i] == d}
            seen["same_level"] += EAGLE in kinds and NGRAM in kinds
        return tree, merged

    eng._draft = recording_draft
    p1, p2 = exact_first_two(model, prompt, params)
    mx.random.seed(4321)
    c1, c2 = np.zeros(len(p1)), np.zeros(len(p1))
    drafted = 0
    for _ in range(N_RUNS):
        eng.ngram_acceptance.forget()  # each run sees the same prior ranking
        rs = list(eng.stream_generate(prompt, max_tokens=2, temp=params.temp, top_p=params.top_p))
        c1[rs[0].token] += 1
        c2[rs[1].token] += 1
        drafted += rs[1].from_draft
    pv1, pv2 = chi2_pvalue(c1, p1), chi2_pvalue(c2, p2)
    print(f"\n{params}: p-values {pv1:.3f}, {pv2:.3f}; drafted {drafted}/{N_RUNS}; {seen}")
    assert pv1 > 0.01 and pv2 > 0.01
    assert 20 < drafted < 0.95 * N_RUNS   # both branches of the rule ran
    assert seen["shared"] > 0 and seen["same_level"] > 0
