"""Sampling preserves the target's distribution (chi-square on a tiny vocabulary)."""

import mlx.core as mx
import numpy as np
import pytest
from scipy.stats import chisquare

from eagle3_mlx.engine import Engine
from eagle3_mlx.target import TargetModel
from eagle3_mlx.testing import make_random_head, make_tiny_target
from eagle3_mlx.verify import SamplingParams, target_probs

V = 16
N_RUNS = 1200


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    from mlx_lm import load

    d = tmp_path_factory.mktemp("small-vocab")
    # Small weights keep the next-token distribution spread over many tokens.
    make_tiny_target(d, "llama", tokenizer_kind="word", vocab_size=V, weight_scale=0.25)
    model, tok = load(str(d))
    return model, tok


def exact_first_two(model, prompt, params):
    """Exact distributions of the 1st token and (marginal) 2nd token."""
    t = TargetModel(model)
    logits, _ = t.forward(mx.array(prompt)[None], None)
    p1 = np.array(target_probs(logits[0, -1:], params)[0])
    seqs = mx.array([prompt + [x] for x in range(V)])
    logits2, _ = t.forward(seqs, None)
    p2_given = np.array(target_probs(logits2[:, -1], params))  # [V, V]
    return p1, p1 @ p2_given


def chi2_pvalue(counts, probs):
    counts = np.asarray(counts, dtype=float)
    probs = np.asarray(probs, dtype=float)
    exp = probs / probs.sum() * counts.sum()
    # Merge bins with small expected counts so the test is valid.
    order = np.argsort(exp)
    c_m, e_m, acc_c, acc_e = [], [], 0.0, 0.0
    for i in order:
        acc_c += counts[i]
        acc_e += exp[i]
        if acc_e >= 5:
            c_m.append(acc_c)
            e_m.append(acc_e)
            acc_c = acc_e = 0.0
    if acc_e > 0:
        c_m[-1] += acc_c
        e_m[-1] += acc_e
    return chisquare(c_m, e_m).pvalue


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temp=1.0), SamplingParams(temp=0.7, top_p=0.8)],
    ids=["temp", "temp+top_p"],
)
def test_first_two_tokens_follow_target(small_vocab, params):
    model, tok = small_vocab
    # A draft head that proposes wrong tokens often and right ones sometimes,
    # with several candidates per node so the multi-candidate rule is used.
    head = make_random_head(model, seed=7, weight_scale=0.3)
    eng = Engine(model, tok, head, top_k=3, depth=2, total_tokens=8)
    eng.tokenizer.eos_token_ids = set()
    prompt = [5, 9, 3, 12]
    p1, p2 = exact_first_two(model, prompt, params)
    mx.random.seed(1234)
    c1, c2 = np.zeros(V), np.zeros(V)
    drafted = 0
    for _ in range(N_RUNS):
        rs = list(eng.stream_generate(prompt, max_tokens=2, temp=params.temp, top_p=params.top_p))
        c1[rs[0].token] += 1
        c2[rs[1].token] += 1
        drafted += rs[1].from_draft
    pv1, pv2 = chi2_pvalue(c1, p1), chi2_pvalue(c2, p2)
    print(f"\n{params}: p-values first {pv1:.3f}, second {pv2:.3f}; "
          f"second token from draft in {drafted}/{N_RUNS} runs")
    assert pv1 > 0.01 and pv2 > 0.01
    # Both paths of the rule were exercised: accepted drafts and rejections.
    assert 0.05 * N_RUNS < drafted < 0.95 * N_RUNS


def test_sampling_detects_a_wrong_rule(small_vocab):
    """The chi-square check has power: accepting every draft fails it."""
    model, tok = small_vocab
    params = SamplingParams(temp=1.0)
    _, p2 = exact_first_two(model, [5, 9, 3, 12], params)
    skewed = p2.copy()
    skewed[np.argmax(p2)] += 0.1
    skewed /= skewed.sum()
    rng = np.random.default_rng(0)
    counts = np.bincount(rng.choice(V, size=N_RUNS, p=skewed), minlength=V)
    assert chi2_pvalue(counts, p2) < 0.01
