"""Context n-gram drafting: the matcher against a brute-force scan, the merged
tree's structure, and greedy losslessness with n-gram and hybrid trees."""

import random

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from eagle3_mlx.engine import Engine
from eagle3_mlx.hybrid import EAGLE, NGRAM, NgramAcceptance, merge_tree
from eagle3_mlx.ngram import Candidate, ContextMatcher
from eagle3_mlx.testing import PROMPTS
from eagle3_mlx.tree import TreeSpec, draft_tree


def brute_force_propose(toks, max_len, max_candidates, max_ngram, min_ngram, occurrences):
    """Rescan the whole context: every earlier place its tail occurred."""
    end = len(toks)
    out, seen = [], set()
    for n in range(min(max_ngram, end), min_ngram - 1, -1):
        tail = toks[end - n:]
        starts = [j for j in range(n, end + 1) if toks[j - n:j] == tail][-occurrences:]
        for start in reversed(starts):
            cont = tuple(toks[start:start + max_len])
            if start >= end or cont in seen:
                continue
            seen.add(cont)
            out.append(Candidate(n, cont))
            if len(out) >= max_candidates:
                return out
    return out


@pytest.mark.parametrize("kind", ["random", "repetitive"])
def test_matcher_equals_brute_force_and_rebuild(kind):
    rng = random.Random(0 if kind == "random" else 1)
    for trial in range(30):
        if kind == "random":
            toks = [rng.randrange(6) for _ in range(rng.randrange(1, 120))]
        else:  # copies of a few phrases with edits, like code being edited
            phrases = [[rng.randrange(50) for _ in range(rng.randrange(2, 9))] for _ in range(4)]
            toks = []
            while len(toks) < 150:
                p = list(rng.choice(phrases))
                if rng.random() < 0.3:
                    p[rng.randrange(len(p))] = rng.randrange(50)
                toks += p
        m = ContextMatcher(max_ngram=5, min_ngram=1, occurrences=3)
        for i, t in enumerate(toks):      # incremental, checked at every length
            m.extend([t])
            if i % 7 == 0 or i == len(toks) - 1:
                want = brute_force_propose(toks[:i + 1], 6, 4, 5, 1, 3)
                assert m.propose(6, 4) == want, (trial, i)
        rebuilt = ContextMatcher(max_ngram=5, min_ngram=1, occurrences=3)
        rebuilt.reset(toks)
        assert rebuilt._follow == m._follow
        s = ContextMatcher(max_ngram=5, min_ngram=1, occurrences=3)
        s.sync(toks[: len(toks) // 2])
        s.sync(toks)                      # continues: extended, not rebuilt
        assert s._follow == m._follow
        s.sync(toks[:3] + [99])           # diverges: rebuilt
        assert s.tokens == toks[:3] + [99]


def test_matcher_finds_copied_span():
    m = ContextMatcher()
    m.extend([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3])
    cands = m.propose(4)
    assert cands[0] == Candidate(3, (4, 5, 6, 7))


def test_merge_shares_prefixes_and_respects_budget():
    acc = NgramAcceptance()
    cands = [Candidate(4, (5, 6, 7, 8)), Candidate(2, (5, 6, 9)), Candidate(2, (3,))]
    m = merge_tree(1, cands, acc, max_nodes=16, min_score=0.0)
    toks, par = m.tree.tokens.tolist(), m.tree.parents.tolist()
    kids = {}
    for i in range(1, m.tree.size):
        assert par[i] < i
        assert (par[i], toks[i]) not in kids, "duplicate child token under one parent"
        kids[(par[i], toks[i])] = i
    assert m.tree.size == 1 + 4 + 1 + 1        # 5,6 shared
    anc = np.array(m.tree.ancestors)
    assert (anc.sum(1) - 1).tolist() == m.tree.depths.tolist()
    small = merge_tree(1, cands, acc, max_nodes=4, min_score=0.0)
    assert small.tree.size == 4
    # Kept nodes keep their ancestors.
    p = small.tree.parents.tolist()
    assert all(p[i] < i for i in range(1, 4))
    # Low scores drop deep n-gram nodes.
    short = merge_tree(1, cands[:1], acc, max_nodes=16, min_score=acc.rate(4) ** 2 - 1e-6)
    assert short.tree.size == 1 + 2 and short.proposals == [(4, (5, 6))]
    assert short.tree.is_chain


def test_merge_with_eagle_tree_marks_both_sources(tiny, oracle_head):
    model, tok = tiny("llama")
    eng = Engine(model, tok, oracle_head("llama"), top_k=2, depth=2, total_tokens=6)
    ids = tok.encode(PROMPTS[0])
    _, feats, _ = eng._prefill(ids)
    root = mx.array([ids[-1]], dtype=mx.int32)
    ext = mx.array(ids[1:] + [ids[-1]], dtype=mx.int32)[None]
    eagle = draft_tree(eng.head, eng._head_embed, eng._dcache, ext, feats, root, eng.spec)
    mx.eval(eagle.tokens, eagle.scores)
    first = eagle.tokens.tolist()[1]
    cands = [Candidate(3, (first, 7, 8)), Candidate(2, (9,))]
    m = merge_tree(ids[-1], cands, NgramAcceptance(), 20, 0.0, eagle)
    assert m.tree.size == eagle.size + 2 + 1
    assert m.sources[m.tree.tokens.tolist().index(first)] == EAGLE | NGRAM
    assert m.sources.count(NGRAM) == 3 and m.sources.count(EAGLE) == eagle.size - 2


def copy_prompts(tok, n):
    """Prompts that repeat a random span, so the n-gram drafts long correct runs,
    mixed with ones where its proposals are mostly wrong."""
    rng = np.random.default_rng(5)
    V = tok.vocab_size if hasattr(tok, "vocab_size") else 500
    out = []
    for i in range(n):
        if i % 2 == 0:
            span = [int(x) for x in rng.integers(3, min(V, 400), size=24)]
            out.append(span + span[:6])
        else:
            out.append(tok.encode(PROMPTS[i % len(PROMPTS)]))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_greedy_equals_target_with_ngram_and_hybrid(family, tiny, oracle_head):
    model, tok = tiny(family)
    prompts = copy_prompts(tok, 20)
    refs = [[int(y) for y, _ in generate_step(mx.array(p), model, max_tokens=64)] for p in prompts]
    taus = {}
    # "eagle" too: hybrid is the engine's default with a head, so the lossless
    # tests' default engines no longer cover head-only trees
    for source, head, tree in [("ngram", None, (4, 4, 16)), ("hybrid", oracle_head(family), (2, 3, 8)),
                               ("hybrid", oracle_head(family), (1, 5, 7)),
                               ("eagle", oracle_head(family), (2, 3, 8))]:
        eng = Engine(model, tok, head, top_k=tree[0], depth=tree[1], total_tokens=tree[2],
                     draft_source=source, ngram_min_score=0.0)
        eng.tokenizer.eos_token_ids = set()
        used = {"eagle": 0, "ngram": 0, "both": 0}
        steps = tokens = 0
        for p, ref in zip(prompts, refs):
            eng.reset()
            rs = list(eng.stream_generate(p, max_tokens=64))
            assert [r.token for r in rs] == ref, f"{family} {source} {tree} prompt {p[:8]}"
            for k, v in rs[-1].source_tokens.items():
                used[k] += v
            steps += rs[-1].steps
            tokens += rs[-1].generation_tokens
        taus[(source, tree)] = tokens / steps
        if source == "eagle":
            assert used["ngram"] + used["both"] == 0 and used["eagle"] > 0
            continue
        assert used["ngram"] + used["both"] > 0
        if source == "hybrid":
            assert used["eagle"] > 0
    print(f"\n{family}: " + ", ".join(f"{k}: tau {v:.2f}" for k, v in taus.items()))
    # The copied spans must give long n-gram acceptances, or compaction over them is untested.
    assert taus[("ngram", (4, 4, 16))] > 1.5


def test_engine_without_head_rejects_head_sources(tiny, oracle_head):
    model, tok = tiny("llama")
    with pytest.raises(ValueError, match="needs an EAGLE-3 head"):
        Engine(model, tok, None, draft_source="hybrid")
    eng = Engine(model, tok, None)
    assert eng.draft_source == "ngram"
    assert Engine(model, tok, oracle_head("llama")).draft_source == "hybrid"   # default with a head
    with pytest.raises(ValueError, match="draft source must be one of"):
        list(eng.stream_generate([5, 6, 7], max_tokens=2, draft_source="suffix"))
