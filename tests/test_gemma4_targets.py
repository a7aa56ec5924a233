"""Gemma 4 targets (gemma4_text, dense and MoE): per-layer input embeddings,
KV-shared layers that attend over another layer's keys (the tree mask and the
compaction must follow), sliding-window and full layers, soft-capped logits.

Tiny random fp32 models are built here (6 layers, the last 2 KV-shared, window
8). References are mlx-lm's own decoding with its own (rotating) caches.
"""

import mlx.core as mx
import numpy as np
import pytest
from test_hybrid_targets import (N_PROMPTS, _ancestors, _random_trees, prompts_and_refs, run_all,
                                 sequential)

from eagle3_mlx.engine import Engine
from eagle3_mlx.recurrent import TreeShape
from eagle3_mlx.target import TargetModel, UnsupportedModelError, compact_cache
from eagle3_mlx.testing import make_oracle_head

FAMILIES = ["gemma4", "gemma4_moe"]
SCALES = dict(weight_scale=0.3, layer_scale=0.02)


@pytest.fixture
def gemma4(built_target):
    return lambda family: built_target(family, **SCALES)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_target(family, gemma4):
    model, tok = gemma4(family)
    t = TargetModel(model)
    assert t.kv_source[-1] < 4 and not t.has_kv[-1] and 8 in t.windows and None in t.windows
    all_ids, refs = prompts_and_refs(model, tok)
    assert sum(len(ids) > 8 for ids in all_ids) >= N_PROMPTS // 2   # past the window
    oracle = make_oracle_head(model)
    runs = [("eagle", oracle, t) for t in ((1, 6, 7), (2, 3, 8), (4, 4, 16), (2, 7, 14))]
    runs += [("ngram", None, (1, 6, 7)), ("hybrid", oracle, (4, 4, 16))]
    report = {}
    for source, head, tree in runs:
        eng = Engine(model, tok, head, top_k=tree[0], depth=tree[1], total_tokens=tree[2],
                     draft_source=source)
        eng.tokenizer.eos_token_ids = set()
        label = f"{family} {source} {tree}"
        report[label] = run_all(eng, all_ids, refs, label)
    print(f"\n{family}: " + "; ".join(f"{k}: {N_PROMPTS}/{N_PROMPTS} equal, tau {v[0]:.2f}"
                                      for k, v in report.items()))
    assert report[f"{family} hybrid (4, 4, 16)"][0] > 2.0


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_nodes_equal_decoding_along_their_path(family, gemma4):
    """Each node's logits equal one-token decoding along its path, for a deep
    tree whose paths cross the sliding window; compaction to a part-way node
    then continues exactly (the shared layers read the compacted source rows)."""
    model, _ = gemma4(family)
    t = TargetModel(model)
    rng = np.random.default_rng(0)
    prefix = [int(x) for x in rng.integers(3, t.vocab_size, size=11)]

    fresh, decode = sequential(t, prefix)
    worst = scale = 0.0
    for name, parents in _random_trees(rng).items():
        anc, shape = _ancestors(parents), TreeShape(parents)
        T = len(parents)
        tokens = [int(x) for x in rng.integers(3, t.vocab_size, size=T)]
        positions = mx.array([len(prefix) + d for d in shape.depths], mx.int32)
        cache = fresh()
        logits, _ = t.forward(mx.array(tokens)[None], cache, tree_mask=mx.array(anc),
                              positions=positions)
        scale = max(scale, float(mx.abs(logits).max()))
        for i in range(T):
            path = [int(j) for j in np.flatnonzero(anc[i])]
            ref, _ = decode(fresh(), [tokens[j] for j in path])
            worst = max(worst, float(mx.abs(ref[0, -1] - logits[0, i]).max()))
        middle = [n for n in range(T) if shape.depths[n] == 2][0]
        path = [int(j) for j in np.flatnonzero(anc[middle])]
        compact_cache(cache, len(prefix), path)
        ref, _ = decode(fresh(), [tokens[j] for j in path] + [5, 7])
        nxt, _ = decode(cache, [5, 7])
        worst = max(worst, float(mx.abs(ref[0, -1] - nxt[0, -1]).max()))
    # Soft-capped logits reach |30|: 1e-5 relative to their size (fp32 sums of a
    # different batch shape round differently).
    print(f"\n{family}: max |tree - sequential| logits = {worst:.2e} (max |logit| {scale:.1f})")
    assert worst <= 1e-5 * max(1.0, scale)


def test_quantized_kv_is_refused_in_one_line(gemma4):
    model, tok = gemma4("gemma4")
    with pytest.raises(UnsupportedModelError) as e:
        Engine(model, tok, None, kv_bits=8, kv_group_size=16)
    assert "\n" not in str(e.value) and "KV-shared" in str(e.value)
