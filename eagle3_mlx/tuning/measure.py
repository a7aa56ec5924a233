"""Measuring on MLX what the tuning model needs: verify and draft costs, acceptance.

Contract: every function here runs the real thing and times or records it, and
returns plain numbers for :mod:`.costs` and :mod:`.acceptance`:
:func:`measure_verify_costs` times the engine's own verify and decode steps
(:func:`eagle3_mlx.engine.verify_step`, :func:`~eagle3_mlx.engine.decode_step`)
per tree width; :func:`measure_draft_costs` times :func:`eagle3_mlx.tree.draft_tree`
per shape; :func:`generate_continuations` collects the target's greedy answers
through the engine; :func:`measure_ranks` replays them through the head
*teacher-forced* (each draft level fed the true previous tokens, exactly what
the head sees when its earlier levels were accepted), giving the rank of the
target's token at draft levels 1..L; :func:`measure_ngram_acceptance` scores
the context matcher on the same answers. Acceptance is measured on built-in
prompts (:func:`eagle3_mlx.prompts.calibration_prompts`), never on benchmark sets.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..treespec import TreeSpec
from .acceptance import DEFAULT_LEVELS, DEFAULT_MAX_RANK, AcceptanceModel
from .costs import fit_draft_costs

# Every width a small tree can have is measured, not interpolated: on a CPU the
# verify cost is a staircase (SIMD/BLAS blocking), so interpolating between 4
# and 8 nodes once picked an 8-node tree where a 6-node one paid better.
DEFAULT_WIDTHS = tuple(range(1, 17)) + (20, 24, 32, 48, 64)
DEFAULT_TOP_KS = (1, 2, 3, 4, 6, 8)
DEFAULT_DRAFT_DEPTHS = (1, 3, 6)
QUICK = dict(widths=tuple(range(1, 9)), top_ks=(1, 2, 4), draft_depths=(1, 3), levels=5,
             n_prompts=1, max_tokens=24, reps=3, context=32)
_FULL = dict(widths=DEFAULT_WIDTHS, top_ks=DEFAULT_TOP_KS, draft_depths=DEFAULT_DRAFT_DEPTHS,
             levels=DEFAULT_LEVELS, n_prompts=4, max_tokens=64, reps=3, context=256)
_BRANCHING = 4      # the timed trees are heap-shaped, four children a node


def settings(quick: bool = False, **given) -> dict:
    """Measurement settings: the full (or ``quick``) defaults, with every
    argument in ``given`` that is not None taking their place."""
    out = dict(QUICK if quick else _FULL)
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def measure_costs(target, head, s: dict):
    """Verify and draft costs with settings ``s`` (see :func:`settings`).
    Returns (verify {T: ms}, draft fit, draft raw timings)."""
    verify_ms, feats = measure_verify_costs(target, s["widths"], context=s["context"], reps=s["reps"])
    fit, raw = measure_draft_costs(head, target, feats, top_ks=s["top_ks"], depths=s["draft_depths"],
                                   reps=s["reps"])
    return verify_ms, fit, raw


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def measure_verify_costs(target, widths: Sequence[int] = DEFAULT_WIDTHS, *, context: int = 256,
                         reps: int = 3, seed: int = 0) -> Tuple[Dict[int, float], "object"]:
    """Median ms of one verification step over T tree tokens after a
    ``context``-token prefix, run by the engine's own step functions:
    :func:`~eagle3_mlx.engine.verify_step` (target forward under the tree mask,
    greedy verification, KV compaction) on a fixed heap-shaped tree, and
    :func:`~eagle3_mlx.engine.decode_step` for T = 1 (a plain decoding step).
    Each tree's first draft is the target's own next token, so every step
    accepts at least one draft and compacts the cache as a real step does.
    Returns ({T: ms}, features of the prefix)."""
    import mlx.core as mx

    from ..engine import decode_step, verify_step
    from ..target import trim_cache
    from ..tree import tree_from_parents
    from ..verify import SamplingParams

    V = target.vocab_size
    greedy = SamplingParams()
    mx.random.seed(seed)
    cache = target.make_cache()
    prefix = mx.random.randint(0, V, (1, context)).astype(mx.int32)
    _, feats = target.forward(prefix, cache, logits_rows=slice(-1, None))
    mx.eval(feats, [c.state for c in cache])
    root = mx.random.randint(0, V, (1,)).astype(mx.int32)
    _, next_tok, _ = decode_step(target, cache, root, greedy)
    trim_cache(cache, context)
    steps = {}
    for T in sorted(set(int(w) for w in widths)):
        if T == 1:
            def step():
                _, _, f = decode_step(target, cache, root, greedy)
                mx.eval(f, [c.state for c in cache])
        else:
            toks = [int(root.item()), next_tok] + mx.random.randint(0, V, (T - 2,)).tolist()
            tree = tree_from_parents(toks, [0] + [(i - 1) // _BRANCHING for i in range(1, T)])
            mx.eval(tree.tokens, tree.ancestors, tree.depths)

            def step(tree=tree):
                *_, f = verify_step(target, cache, tree, context, greedy)
                mx.eval(f, [c.state for c in cache])
        steps[T] = step
    times = {T: [] for T in steps}
    # One warm-up round, then interleaved rounds so drift hits every width alike.
    for r in range(reps + 1):
        for T, step in steps.items():
            t0 = time.perf_counter()
            step()
            dt = (time.perf_counter() - t0) * 1000
            trim_cache(cache, context)
            if r:
                times[T].append(dt)
    out = {T: _median(ts) for T, ts in times.items()}
    return out, feats


def measure_draft_costs(head, target, feats, *, top_ks: Sequence[int] = DEFAULT_TOP_KS,
                        depths: Sequence[int] = DEFAULT_DRAFT_DEPTHS, reps: int = 3,
                        ext_len: int = 1, long_ext: int = 8,
                        seed: int = 0) -> Tuple[Dict[int, Tuple[float, float]], dict]:
    """Median ms of ``draft_tree`` per (top_k, depth) on a head cache filled
    with ``feats`` (target features [1, context, 3H]), extending the cache by
    ``ext_len`` tokens first; fitted with :func:`fit_draft_costs`. The raw
    dict also holds ("ext", long_ext): the smallest shape with a ``long_ext``
    token extension, for :func:`ext_cost`. Returns (fit, raw)."""
    import mlx.core as mx

    from ..tree import draft_tree

    V = target.vocab_size
    mx.random.seed(seed)
    context = feats.shape[1]
    embed = lambda ids: head.embed(ids, target.embed_tokens)  # noqa: E731
    dcache = head.make_cache()
    ids = mx.random.randint(0, V, (1, context)).astype(mx.int32)
    n0 = context - max(ext_len, long_ext)
    head(embed(ids[:, :n0]), feats[:, :n0], cache=dcache, mask="causal", from_target=True)
    mx.eval([c.state for c in dcache])
    stable = dcache[0].offset
    exts = {ext_len: (ids[:, n0 : n0 + ext_len], feats[:, n0 : n0 + ext_len]),
            long_ext: (ids[:, n0 : n0 + long_ext], feats[:, n0 : n0 + long_ext])}
    root = ids[0, -1:]
    # A node cannot have more children than the draft vocabulary has tokens.
    top_ks = [k for k in top_ks if k <= head.config.draft_vocab_size] or [1]
    shapes = [(k, d, ext_len) for k in sorted(set(top_ks)) for d in sorted(set(depths))]
    probe = (min(top_ks), min(depths), long_ext)
    shapes.append(probe)
    times = {s: [] for s in shapes}
    for r in range(reps + 1):
        for k, d, e in shapes:
            spec = TreeSpec(k, d, min(64, k + d * k * k + 1))
            ext_ids, ext_f = exts[e]
            t0 = time.perf_counter()
            tree = draft_tree(head, embed, dcache, ext_ids, ext_f, root, spec)
            mx.eval(tree.tokens, tree.ancestors)
            dt = (time.perf_counter() - t0) * 1000
            for c in dcache:
                c.trim(c.offset - stable)
            if r:
                times[(k, d, e)].append(dt)
    raw = {(k, d): _median(times[(k, d, e)]) for k, d, e in shapes if (k, d, e) != probe}
    raw[("ext", long_ext)] = _median(times[probe])
    raw[("ext", ext_len)] = raw[probe[:2]]
    return fit_draft_costs(raw), raw


def _encode_chat(engine, text: str) -> list:
    tok = engine.tokenizer
    if getattr(tok, "chat_template", None) is not None:
        return engine.encode([{"role": "user", "content": text}])
    return engine.encode(text)


def generate_continuations(engine, prompts: Sequence[str], max_tokens: int,
                           log: Optional[Callable] = None) -> Tuple[List[Tuple[list, list]], List[float]]:
    """The target's greedy continuations (via the engine; lossless), and the
    per-step bookkeeping time observed on the way (step wall time minus draft
    minus verify)."""
    from ..runs import collect

    out, overhead = [], []
    for i, text in enumerate(prompts):
        ids = _encode_chat(engine, text)
        engine.reset()
        last_t = None

        def step_overhead(r):
            nonlocal last_t
            if r.new_step:
                now = time.perf_counter()
                if last_t is not None and r.step_index >= 2:
                    overhead.append((now - last_t) * 1000 - r.draft_ms - r.verify_ms)
                last_t = now

        run = collect(engine.stream_generate(ids, max_tokens=max_tokens, temp=0.0,
                                             draft_source=engine.drafter),
                      on_response=step_overhead)
        out.append((ids, run.tokens))
        if log and run.last is not None:
            log(f"  prompt {i + 1}/{len(prompts)}: {len(run.tokens)} tokens, "
                f"tau {run.last.tokens_per_step:.2f}")
    engine.reset()
    return out, overhead


def _target_to_draft(head, V: int):
    """int32 [V]: the draft id of each target id, -1 where not in the draft vocab."""
    import mlx.core as mx
    import numpy as np

    d2t = np.array(head.d2t, dtype=np.int64)
    out = np.full((V,), -1, dtype=np.int32)
    out[np.arange(len(d2t)) + d2t] = np.arange(len(d2t), dtype=np.int32)
    return mx.array(out)


def measure_ranks(target, head, prompt_ids: list, continuation: list, *, levels: int = DEFAULT_LEVELS,
                  max_rank: int = DEFAULT_MAX_RANK) -> List[List[int]]:
    """Teacher-forced draft ranks at every committed position of a greedy
    continuation: for the root x_n (n >= len(prompt)), the rank of the target's
    token x_{n+j} among the head's candidates at draft level j = 1..levels,
    with the head fed the true tokens x_{n+1..n+j-1} and its own hidden states
    (as in tree.py). Sequences stop at the first rank > ``max_rank``; only
    roots with all ``levels`` true tokens available are counted.

    All roots are processed at once: level 1 is the head's causal pass over
    the whole sequence; each further level is one batched call whose query for
    root n sees the stable rows < n plus its own chain rows."""
    import mlx.core as mx

    seq = list(prompt_ids) + list(continuation)
    S, L = len(seq), len(prompt_ids)
    R = S - 1                      # draft rows p = 0..S-2 (root n = p + 1)
    first = max(L - 1, 0)          # rows whose root is a generated token
    last = S - 2 - levels          # rows with x_{p+1+levels} available
    if last < first:
        return []
    x = mx.array(seq, dtype=mx.int32)
    tcache = target.make_cache()
    _, feats = target.forward(x[None], tcache, logits_rows=slice(0, 0))
    del tcache
    embed = lambda ids: head.embed(ids, target.embed_tokens)  # noqa: E731
    V = target.vocab_size
    t2d = _target_to_draft(head, V)

    dcache = head.make_cache()
    hidden, logits = head(embed(x[None, 1:]), feats[:, :-1], cache=dcache, mask="causal", positions=0,
                          from_target=True)
    rows = mx.arange(R)
    stable_mask = rows[None, :] <= rows[:, None]
    eye = rows[None, :] == rows[:, None]
    ranks = []
    for j in range(1, levels + 1):
        # logits row p now predict x_{p+1+j}
        tgt_idx = mx.minimum(rows + 1 + j, S - 1)
        true_tok = x[tgt_idx]
        d = t2d[true_tok]
        lg = logits[0].astype(mx.float32)
        true_logit = mx.take_along_axis(lg, mx.maximum(d, 0)[:, None], axis=-1)
        rank = (lg > true_logit).sum(axis=-1) + 1
        rank = mx.where(d < 0, max_rank + 1, rank)
        ranks.append(rank)
        if j == levels:
            break
        tok_in = x[mx.minimum(rows + 1 + j, S - 1)]
        mask = mx.concatenate([stable_mask] + [eye] * j, axis=1)
        hidden, logits = head(embed(tok_in[None]), hidden, cache=dcache, mask=mask,
                              positions=rows + j, from_target=False)
        mx.eval(hidden, logits, ranks[-1])
    table = mx.stack(ranks, axis=1)[first : last + 1].tolist()
    out = []
    for row in table:
        s = []
        for r in row:
            if r > max_rank:
                break
            s.append(int(r))
        out.append(s)
    return out


def measure_acceptance(engine, prompts: Sequence[str], *, max_tokens: int = 64,
                       levels: int = DEFAULT_LEVELS, max_rank: int = DEFAULT_MAX_RANK,
                       log: Optional[Callable] = None, conts=None) -> Tuple[AcceptanceModel, List[float]]:
    overhead = []
    if conts is None:
        conts, overhead = generate_continuations(engine, prompts, max_tokens, log)
    runs = [measure_ranks(engine.target, engine.head, ids, toks, levels=levels, max_rank=max_rank)
            for ids, toks in conts]
    return AcceptanceModel.from_runs([r for r in runs if r], levels, max_rank), overhead


def measure_ngram_acceptance(conts: Sequence[Tuple[list, list]], *, max_len: int = 12,
                             max_candidates: int = 3) -> dict:
    """The second source's acceptance on the same continuations: at every
    generated position the context matcher proposes what it would in the
    engine, and each candidate is scored against the target's true tokens
    (accepted until the first miss), per match length. Returns
    {"first"|"later": {match_len: [accepted, rejected]}} (NgramAcceptance's counts)."""
    from ..hybrid import NgramAcceptance
    from ..ngram import ContextMatcher

    acc = NgramAcceptance()
    for ids, toks in conts:
        m = ContextMatcher()
        m.extend(ids)
        for i, t in enumerate(toks):
            m.extend((t,))
            truth = toks[i + 1:i + 1 + max_len]
            if not truth:
                break
            for cand in m.propose(max_len, max_candidates):
                acc.update(cand.match_len, cand.tokens[:len(truth)], truth)
    return acc.counts()
