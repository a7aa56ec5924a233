"""Mixture-of-experts targets (qwen3_moe, gpt_oss): greedy losslessness, exact
tree verification past gpt_oss's sliding window with its attention sinks,
sampling, and the aux id L capture.

Tiny random fp32 models are built here. gpt_oss's window is shrunk (16 in the
greedy and tree tests, 4 in the sampling test) so that prompts longer than the
window stay cheap; its sinks are O(1) random logits (see testing._init_weights).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from test_sampling import chi2_pvalue

from eagle3_mlx.compat import head_target_problems
from eagle3_mlx.engine import Engine
from eagle3_mlx.target import TargetModel, UnsupportedModelError, compact_cache
from eagle3_mlx.testing import PROMPTS, make_oracle_head, make_random_head, make_tiny_target
from eagle3_mlx.verify import SamplingParams, target_probs

FAMILIES = ["qwen3_moe", "gpt_oss"]
TREES = [(1, 5, 7), (2, 3, 8), (4, 4, 16), (3, 5, 24)]  # chain + three tree shapes
N_PROMPTS, N_TOKENS = 20, 64
WINDOW = 16
# Strong embedding/lm_head, weak decoder layers: the oracle head then predicts
# the target often (long acceptances), as in conftest.FAMILY_SCALES. The expert
# blocks move the residual more than a dense MLP, hence the smaller layer scales.
SCALES = {"qwen3_moe": dict(weight_scale=0.5, layer_scale=0.02),
          "gpt_oss": dict(weight_scale=0.5, layer_scale=0.03)}
SIZES = {"qwen3_moe": dict(num_hidden_layers=4), "gpt_oss": dict(num_hidden_layers=4,
                                                                  sliding_window=WINDOW)}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """moe(family) -> (model, tokenizer), built and loaded once."""
    from mlx_lm import load

    made = {}

    def get(family):
        if family not in made:
            d = tmp_path_factory.mktemp(f"target-{family}")
            make_tiny_target(d, family, **SCALES[family], **SIZES[family])
            made[family] = load(str(d))
        return made[family]

    return get


def prompts(family, tok):
    """gpt_oss prompts are made longer than its window, so prefill, verification
    and compaction all happen past it."""
    if family != "gpt_oss":
        return [tok.encode(p) for p in PROMPTS[:N_PROMPTS]]
    n = len(PROMPTS)
    out = [tok.encode(" ".join(PROMPTS[(i + j) % n] for j in range(3))) for i in range(N_PROMPTS)]
    assert min(len(ids) for ids in out) > WINDOW
    return out


def reference_greedy(model, ids, n, kv_bits=None):
    """mlx-lm's own decoding, with its own caches (RotatingKVCache for gpt_oss's
    sliding layers): an independent reference for the engine's window masks."""
    kw = dict(kv_bits=kv_bits, kv_group_size=32, quantized_kv_start=0) if kv_bits else {}
    return [int(y) for y, _ in generate_step(mx.array(ids), model, max_tokens=n, **kw)]


@pytest.mark.parametrize("family,kv_bits", [("qwen3_moe", None), ("qwen3_moe", 8),
                                            ("gpt_oss", None)],
                         ids=["qwen3_moe-kv-fp32", "qwen3_moe-kv-q8", "gpt_oss-kv-fp32"])
def test_greedy_equals_target(family, kv_bits, moe):
    model, tok = moe(family)
    all_ids = prompts(family, tok)
    refs = [reference_greedy(model, ids, N_TOKENS, kv_bits) for ids in all_ids]
    heads = {"oracle": make_oracle_head(model), "random": make_random_head(model, draft_vocab_size=200)}
    if kv_bits:  # as the dense tests: the quantized-KV run covers chain + one tree
        heads.pop("random")
    report = {}
    for head_name, head in heads.items():
        # The head's own trees (chain + three shapes), plus one run of the
        # engine's default source (hybrid: n-gram branches merged into the tree).
        trees = [("eagle", t) for t in (TREES if head_name == "oracle" else TREES[:2])]
        if kv_bits:
            trees = [("eagle", TREES[0]), ("eagle", TREES[2])]
        if head_name == "oracle" and not kv_bits:
            trees.append(("hybrid", TREES[2]))
        for source, (top_k, depth, total) in trees:
            eng = Engine(model, tok, head, top_k=top_k, depth=depth, total_tokens=total,
                         kv_bits=kv_bits, kv_group_size=32, draft_source=source)
            eng.tokenizer.eos_token_ids = set()  # compare full 64-token continuations
            equal, steps, tokens = 0, 0, 0
            for ids, ref in zip(all_ids, refs):
                eng.reset()
                rs = list(eng.stream_generate(ids, max_tokens=N_TOKENS))
                assert [r.token for r in rs] == ref, f"{family} {head_name} {source} {(top_k, depth, total)} {ids}"
                equal += 1
                steps += rs[-1].steps
                tokens += rs[-1].generation_tokens
            report[(head_name, source, top_k, depth, total)] = (equal, tokens / steps)
    print(f"\n{family} kv={kv_bits}: " + ", ".join(
        f"{k[0]} {k[1]} {k[2:]}: {v[0]}/{N_PROMPTS} equal, tau {v[1]:.2f}" for k, v in report.items()))
    # The oracle head must make long acceptances happen, or compaction is untested.
    assert max(v[1] for k, v in report.items() if k[0] == "oracle") > 2.0


def _tree(parents):
    T = len(parents)
    anc = np.eye(T, dtype=bool)
    depth = [0] * T
    for i in range(1, T):
        anc[i] = anc[parents[i]]
        anc[i, i] = True
        depth[i] = depth[parents[i]] + 1
    return anc, depth


def _trees(rng):
    """A bushy random tree, and a deep one (a 20-node chain with side branches)
    whose deepest nodes have tree ancestors outside gpt_oss's 16-token window."""
    bushy = [0] + [int(rng.integers(0, i)) for i in range(1, 12)]
    deep = [0] + list(range(19)) + [3, 9, 17, 18]
    return {"bushy": _tree(bushy), "deep": _tree(deep)}


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_verify_logits_equal_sequential(family, moe):
    model, _ = moe(family)
    t = TargetModel(model)
    if family == "gpt_oss":
        assert WINDOW in t.windows and None in t.windows and t.has_sinks
        sinks = np.array(t.layers[0].self_attn.sinks)
        assert np.abs(sinks).max() > 0.5  # the sinks take a real share of attention
    rng = np.random.default_rng(0)
    prefix = [int(x) for x in rng.integers(3, t.vocab_size, size=21)]  # > WINDOW: window full
    worst = 0.0
    for name, (anc, depth) in _trees(rng).items():
        T = len(depth)
        tokens = [int(x) for x in rng.integers(3, t.vocab_size, size=T)]
        cache = t.make_cache()
        t.forward(mx.array(prefix)[None], cache)
        off = cache[0].offset
        logits, feats = t.forward(mx.array(tokens)[None], cache, tree_mask=mx.array(anc),
                                  positions=mx.array([off + d for d in depth], dtype=mx.int32))
        for i in range(T):
            seq_cache = t.make_cache()
            t.forward(mx.array(prefix)[None], seq_cache)
            for j in np.flatnonzero(anc[i]):  # one token at a time, as plain decoding does
                ref_logits, ref_feats = t.forward(mx.array([[tokens[j]]]), seq_cache)
            worst = max(worst, float(mx.abs(ref_logits[0, -1] - logits[0, i]).max()))
            assert mx.allclose(ref_feats[0, -1], feats[0, i], atol=1e-5), (name, i)

        # Compaction to the deepest path, then decoding continues as if only that
        # path had been fed (for the deep tree: across the window boundary).
        leaf = int(np.argmax(depth))
        path = [int(j) for j in np.flatnonzero(anc[leaf])]
        compact_cache(cache, off, path)
        seq_cache = t.make_cache()
        t.forward(mx.array(prefix)[None], seq_cache)
        for tk in [tokens[j] for j in path] + [5, 7]:
            ref, _ = t.forward(mx.array([[tk]]), seq_cache)
        t.forward(mx.array([[5]]), cache)
        nxt, _ = t.forward(mx.array([[7]]), cache)
        worst = max(worst, float(mx.abs(ref[0, -1] - nxt[0, -1]).max()))
    print(f"\n{family}: max |tree - sequential| logits = {worst:.2e}")
    assert worst <= 1e-5


def test_gpt_oss_refuses_quantized_kv(moe):
    model, tok = moe("gpt_oss")
    with pytest.raises(UnsupportedModelError) as e:
        TargetModel(model).make_cache(kv_bits=8, kv_group_size=32)
    msg = str(e.value)
    assert "\n" not in msg and "gpt_oss" in msg and "sinks" in msg
    # The engine refuses it when built, before any prompt runs.
    with pytest.raises(UnsupportedModelError, match="sinks"):
        Engine(model, tok, make_random_head(model), kv_bits=8, kv_group_size=32)


def test_unsupported_model_type_is_named(moe):
    model, _ = moe("qwen3_moe")
    model.model_type = "mixtral"
    try:
        with pytest.raises(UnsupportedModelError, match="'mixtral'"):
            TargetModel(model)
    finally:
        model.model_type = "qwen3_moe"


V = 16
N_RUNS = 1200


def test_sampling_follows_target_gpt_oss(tmp_path):
    """Chi-square as tests/test_sampling.py, on gpt_oss with a 4-token window so
    the tree of a 4-token prompt crosses it, and with sinks."""
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    make_tiny_target(tmp_path, "gpt_oss", tokenizer_kind="word", vocab_size=V, weight_scale=0.25,
                     sliding_window=4)
    model, tok = load(str(tmp_path))
    params = SamplingParams(temp=1.0)
    prompt = [5, 9, 3, 12]

    def probs(seqs):  # mlx-lm's own forward with its own (rotating) caches
        logits = model(mx.array(seqs), cache=make_prompt_cache(model))
        return np.array(target_probs(logits[:, -1], params))

    p1 = probs([prompt])[0]
    p2 = p1 @ probs([prompt + [x] for x in range(V)])
    head = make_random_head(model, seed=7, weight_scale=0.3)
    eng = Engine(model, tok, head, top_k=3, depth=2, total_tokens=8, draft_source="eagle")
    eng.tokenizer.eos_token_ids = set()
    mx.random.seed(1234)
    c1, c2 = np.zeros(V), np.zeros(V)
    drafted = 0
    for _ in range(N_RUNS):
        rs = list(eng.stream_generate(prompt, max_tokens=2, temp=params.temp))
        c1[rs[0].token] += 1
        c2[rs[1].token] += 1
        drafted += rs[1].from_draft
    pv1, pv2 = chi2_pvalue(c1, p1), chi2_pvalue(c2, p2)
    print(f"\ngpt_oss sampling: p-values first {pv1:.3f}, second {pv2:.3f}; "
          f"second token from draft in {drafted}/{N_RUNS} runs")
    assert pv1 > 0.01 and pv2 > 0.01
    assert 0.05 * N_RUNS < drafted < 0.95 * N_RUNS


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "gpt_oss"])
def test_aux_id_L_is_last_layer_output(family, moe, tiny):
    """Aux id L = the output of the last decoder layer, before the final norm.
    Reference: mlx-lm's own model forward with its final norm replaced by the
    identity (its own masks, windows included)."""
    model, _ = tiny(family) if family == "qwen3" else moe(family)
    L = len(model.layers)
    t = TargetModel(model, aux_layer_ids=[0, L - 1, L])
    ids = mx.array([[int(x) for x in np.random.default_rng(1).integers(3, 384, size=WINDOW + 9)]])
    logits, feats = t.forward(ids, None)
    H = t.hidden_size
    norm = model.model.norm
    model.model.norm = nn.Identity()
    try:
        last = model.model(ids)
    finally:
        model.model.norm = norm
    assert mx.allclose(feats[..., 2 * H :], last, atol=1e-5)
    assert not mx.allclose(feats[..., H : 2 * H], last, atol=1e-3)  # id L-1 is a different state
    assert mx.allclose(feats[..., :H], t.embed(ids))
    assert mx.allclose(logits, model(ids), atol=1e-4)
    # The converter's fit check takes id L and refuses L+1, naming the range.
    cfg = dict(hidden_size=H, target_hidden_size=H, vocab_size=t.vocab_size, has_embedding=False)
    dims = dict(hidden_size=H, vocab_size=t.vocab_size, num_hidden_layers=L)
    assert head_target_problems({**cfg, "aux_layer_ids": [0, L - 1, L]}, dims) == []
    (msg,) = head_target_problems({**cfg, "aux_layer_ids": [0, L - 1, L + 1]}, dims)
    assert f"valid: 0..{L}" in msg
    with pytest.raises(UnsupportedModelError, match=f"0..{L}"):
        TargetModel(model, aux_layer_ids=[0, 1, L + 1])
