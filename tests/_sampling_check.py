"""The two-token chi-square check shared by the newer family tests: the first
two sampled tokens of an engine follow the target's own distribution (computed
with mlx-lm's forward and caches), and the second is often drafted."""

import mlx.core as mx
import numpy as np
from test_sampling import chi2_pvalue

from eagle3_mlx.verify import SamplingParams, target_probs


def first_two_tokens(model, engine, prompt, vocab: int, runs: int, seed: int, temp: float = 1.0):
    """Returns (p-value first token, p-value second token, runs whose second token was drafted)."""
    from mlx_lm.models.cache import make_prompt_cache

    params = SamplingParams(temp=temp)

    def probs(seqs):
        logits = model(mx.array(seqs), cache=make_prompt_cache(model))
        return np.array(target_probs(logits[:, -1], params))

    p1 = probs([prompt])[0]
    p2 = p1 @ probs([prompt + [x] for x in range(vocab)])
    engine.tokenizer.eos_token_ids = set()
    mx.random.seed(seed)
    c1, c2 = np.zeros(vocab), np.zeros(vocab)
    drafted = 0
    for _ in range(runs):
        rs = list(engine.stream_generate(prompt, max_tokens=2, temp=params.temp))
        c1[rs[0].token] += 1
        c2[rs[1].token] += 1
        drafted += rs[1].from_draft
    return chi2_pvalue(c1, p1), chi2_pvalue(c2, p2), drafted
