"""Greedy losslessness and exact tree verification on tiny fp32 targets."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from eagle3_mlx.engine import Engine
from eagle3_mlx.target import TargetModel, compact_cache
from eagle3_mlx.testing import PROMPTS, make_random_head

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]
TREES = [(1, 5, 7), (2, 3, 8), (4, 4, 16), (3, 5, 24)]  # chain + three tree shapes
N_PROMPTS, N_TOKENS = 20, 64


def reference_greedy(model, ids, n, kv_bits=None):
    kw = dict(kv_bits=kv_bits, kv_group_size=32, quantized_kv_start=0) if kv_bits else {}
    out = []
    for y, _ in generate_step(mx.array(ids), model, max_tokens=n, **kw):
        out.append(int(y))
    return out


@pytest.fixture(scope="module")
def references(tiny):
    cache = {}

    def get(family, kv_bits):
        key = (family, kv_bits)
        if key not in cache:
            model, tok = tiny(family)
            if family == "gemma3" and kv_bits:
                # mlx-lm cannot quantize gemma3's rotating sliding-window caches;
                # the reference is then the engine's own plain one-token decoding.
                eng = Engine(model, tok, make_random_head(model), kv_bits=kv_bits, kv_group_size=32)
                eng.tokenizer.eos_token_ids = set()
                cache[key] = [
                    [r.token for r in eng.stream_generate(tok.encode(p), max_tokens=N_TOKENS,
                                                          speculative=False)]
                    for p in PROMPTS[:N_PROMPTS]
                ]
            else:
                cache[key] = [
                    reference_greedy(model, tok.encode(p), N_TOKENS, kv_bits)
                    for p in PROMPTS[:N_PROMPTS]
                ]
        return cache[key]

    return get


@pytest.mark.parametrize("kv_bits", [None, 8], ids=["kv-fp32", "kv-q8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_target(family, kv_bits, tiny, oracle_head, references):
    model, tok = tiny(family)
    refs = references(family, kv_bits)
    heads = {"oracle": oracle_head(family), "random": make_random_head(model, draft_vocab_size=200)}
    if kv_bits:  # keep CI time in check: the quantized-KV run covers chain + one tree
        heads.pop("random")
    report = {}
    for head_name, head in heads.items():
        trees = TREES if head_name == "oracle" else TREES[:2]
        if kv_bits:
            trees = [TREES[0], TREES[2]]
        for top_k, depth, total in trees:
            eng = Engine(model, tok, head, top_k=top_k, depth=depth, total_tokens=total,
                         kv_bits=kv_bits, kv_group_size=32)
            eng.tokenizer.eos_token_ids = set()  # compare full 64-token continuations
            equal, steps, tokens = 0, 0, 0
            for p, ref in zip(PROMPTS[:N_PROMPTS], refs):
                eng.reset()
                rs = list(eng.stream_generate(tok.encode(p), max_tokens=N_TOKENS))
                got = [r.token for r in rs]
                assert got == ref, f"{family} {head_name} tree {(top_k, depth, total)} prompt {p!r}"
                equal += 1
                steps += rs[-1].steps
                tokens += rs[-1].generation_tokens
            report[(head_name, top_k, depth, total)] = (equal, tokens / steps)
    print(f"\n{family} kv={kv_bits}: " + ", ".join(
        f"{k[0]} {k[1:]}: {v[0]}/{N_PROMPTS} equal, tau {v[1]:.2f}" for k, v in report.items()))
    # The oracle head must make long acceptances happen, or compaction is untested.
    assert max(v[1] for k, v in report.items() if k[0] == "oracle") > 2.0


def _random_tree(T, rng):
    parents = [0] + [int(rng.integers(0, i)) for i in range(1, T)]
    anc = np.eye(T, dtype=bool)
    depth = [0] * T
    for i in range(1, T):
        anc[i] = anc[parents[i]]
        anc[i, i] = True
        depth[i] = depth[parents[i]] + 1
    return parents, anc, depth


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("kv_bits", [None, 8])
def test_tree_verify_logits_equal_sequential(family, kv_bits, tiny):
    model, tok = tiny(family)
    t = TargetModel(model)
    rng = np.random.default_rng(0)
    # Prefix long enough that gemma3's sliding window (12) is full.
    prefix = [int(x) for x in rng.integers(3, t.vocab_size, size=17)]
    T = 12
    parents, anc, depth = _random_tree(T, rng)
    tokens = [int(x) for x in rng.integers(3, t.vocab_size, size=T)]

    cache = t.make_cache(kv_bits=kv_bits, kv_group_size=32)
    t.forward(mx.array(prefix)[None], cache)
    off = cache[0].offset
    logits, feats = t.forward(
        mx.array(tokens)[None], cache, tree_mask=mx.array(anc),
        positions=mx.array([off + d for d in depth], dtype=mx.int32),
    )
    worst = 0.0
    for i in range(T):
        path = [j for j in range(T) if anc[i, j]]
        seq_cache = t.make_cache(kv_bits=kv_bits, kv_group_size=32)
        t.forward(mx.array(prefix)[None], seq_cache)
        for j in path:  # one token at a time, as plain decoding does
            ref_logits, ref_feats = t.forward(mx.array([[tokens[j]]]), seq_cache)
        worst = max(worst, float(mx.abs(ref_logits[0, -1] - logits[0, i]).max()))
        assert mx.allclose(ref_feats[0, -1], feats[0, i], atol=1e-5)
    print(f"\n{family} kv={kv_bits}: max |tree - sequential| logits = {worst:.2e}")
    assert worst <= 1e-5

    # Compaction: keep the path to the deepest node, then decoding continues
    # exactly as if only that path had been fed.
    leaf = int(np.argmax(depth))
    path = [j for j in range(T) if anc[leaf, j]]
    compact_cache(cache, off, path)
    assert cache[0].offset == off + len(path)
    seq_cache = t.make_cache(kv_bits=kv_bits, kv_group_size=32)
    t.forward(mx.array(prefix)[None], seq_cache)
    for tk in [tokens[j] for j in path] + [5, 7]:
        ref, _ = t.forward(mx.array([[tk]]), seq_cache)
    t.forward(mx.array([[5]]), cache)
    nxt, _ = t.forward(mx.array([[7]]), cache)
    # Quantized KV can flip a rounding bucket between a batched and a one-token
    # pass, so its bound is looser; fp32 KV rows must match to rounding level.
    tol = 1e-5 if kv_bits is None else 1e-3
    assert float(mx.abs(ref[0, -1] - nxt[0, -1]).max()) <= tol


def test_aux_features_are_hf_hidden_state_inputs(tiny):
    """Feature k is the residual stream entering decoder layer k (HF index)."""
    model, _ = tiny("llama")
    t = TargetModel(model, aux_layer_ids=[0, 1, 5])
    ids = mx.array([[5, 9, 11, 4]])
    _, feats = t.forward(ids, None)
    H = t.hidden_size
    h = t.embed(ids)
    assert mx.allclose(feats[..., :H], h)
    h1 = t.layers[0](h, "causal", None)
    assert mx.allclose(feats[..., H : 2 * H], h1, atol=1e-6)
    for layer in t.layers[1:5]:
        h1 = layer(h1, "causal", None)
    assert mx.allclose(feats[..., 2 * H :], h1, atol=1e-5)


def test_quantized_head_runs_dequantized_on_cpu(tiny):
    """On the CPU backend an 8-bit head for an unquantized target is dequantized
    once (CPU quantized matmuls are slow): the same draft logits the quantized
    head computes, float32 weights, and the output still equals plain greedy."""
    import mlx.nn as nn

    from eagle3_mlx.head import quantize_head

    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("dequantizing is a CPU-backend policy")
    model, tok = tiny("qwen2")
    head = quantize_head(make_random_head(model, seed=3, intermediate_size=64), bits=8,
                         group_size=32)
    emb = mx.random.normal((1, 3, head.config.hidden_size))
    feats = mx.random.normal((1, 3, 3 * model.args.hidden_size))
    before = head(emb, feats)[1]
    eng = Engine(model, tok, head, top_k=2, depth=3, total_tokens=8)
    assert head.config.quantization is None
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in head.named_modules())
    assert head.fc.weight.dtype == mx.float32
    np.testing.assert_allclose(np.array(head(emb, feats)[1]), np.array(before), atol=1e-4)
    eng.tokenizer.eos_token_ids = set()
    ids = tok.encode(PROMPTS[0])
    got = [r.token for r in eng.stream_generate(ids, max_tokens=24)]
    assert got == reference_greedy(model, ids, 24)
