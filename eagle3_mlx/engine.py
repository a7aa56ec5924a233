"""The speculative generation loop.

Each step: the head drafts a tree from the target features of the tokens
committed last step (draft), the target runs the whole tree once under a tree
mask (verify), the accepted path and a bonus token are committed and the target
KV cache is compacted (commit), and statistics are updated (stats).

The engine keeps its caches between calls and reuses the longest common token
prefix of the next prompt, so a chat passes its whole conversation each turn.
All MLX work must stay on the thread that runs the engine.

Contract: ``Engine.stream_generate`` yields one :class:`GenerationResponse` per
committed token, every one a real token; the last carries the finish reason
("stop", "length", "context" or "cancelled"). Greedy output is token-identical
to the target's own greedy decoding and sampled output follows the target's
distribution exactly, whatever the tree or draft source. :func:`verify_step`
and :func:`decode_step` are the step's two halves as functions, so the tuning
measurements time exactly what a step runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .head import Eagle3Head, HeadError
from .drafters import model_drafters
from .hybrid import (EAGLE, NGRAM, NgramAcceptance, NodeCosts, check_source, merge_tree, source_label,
                     uses)
from .ngram import ContextMatcher
from .recurrent import TreeShape
from .target import TargetModel, compact_cache, trim_cache
from .tree import TreeSpec, draft_tree
from .verify import SamplingParams, choose, greedy_verify, sample_verify

Prompt = Union[str, Sequence[int], Sequence[dict]]


class ContextLimitError(ValueError):
    pass


@dataclass
class GenerationResponse:
    """One generated token, shaped like mlx-lm's response plus step statistics."""

    text: str
    token: int
    from_draft: bool
    step_index: int
    new_step: bool
    step_tokens: int
    draft_ms: float
    verify_ms: float
    tokens_per_step: float
    steps: int
    prompt_tokens: int
    prompt_tps: float
    prompt_ms: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None
    speculative: bool = True
    source: str = ""              # drafted token: its hybrid.source_label; "" for the bonus
    source_tokens: Optional[dict] = None  # accepted drafted tokens so far, per source label
    drafter: str = "eagle"        # the engine's first model drafter: "eagle" (a head) or "mtp"


def check_compatible(head: Eagle3Head, target: TargetModel):
    """Refuse a head that cannot drive this target (one line naming the sizes)."""
    from .compat import head_target_problems

    dims = dict(hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                num_hidden_layers=target.num_layers)
    cfg = head.config
    problems = head_target_problems(
        dict(hidden_size=cfg.hidden_size, target_hidden_size=cfg.target_hidden_size,
             vocab_size=cfg.vocab_size, draft_vocab_size=cfg.draft_vocab_size,
             has_embedding="embed_tokens" in head, aux_layer_ids=target.aux_layer_ids,
             num_aux_hidden_states=cfg.num_aux_hidden_states),
        dims,
    )
    if problems:
        raise HeadError("draft head does not fit the target: " + "; ".join(problems))


def match_head_dtype(head: Eagle3Head, target: TargetModel):
    """Cast an unquantized head to the target's compute dtype, in place: a
    float16 head shipped for size then runs float32 on a CPU (where float16
    matmuls are slow) and float16/bfloat16 on a GPU, without a cast per step.
    On the CPU backend a quantized head is also dequantized when the target is
    not quantized: MLX's CPU quantized matmuls are several times slower than
    float32 ones, so there the bits only save disk space."""
    emb = target.embed_tokens
    target_quantized = hasattr(emb, "scales")
    if head.config.quantization:
        from .platform import mlx_backend

        if target_quantized or mlx_backend() != "cpu":
            return
        from mlx_lm.utils import dequantize_model

        dequantize_model(head)
        head.config.quantization = None
    dt = emb.scales.dtype if target_quantized else emb.weight.dtype
    if head.fc.weight.dtype != dt:
        head.set_dtype(dt)


class Engine:
    """``head`` (an EAGLE-3 head) and ``mtp`` (the target's MTP module) may each
    be None: without both the engine drafts from context n-grams only.

    ``draft_source``: "eagle" (head only), "mtp" (MTP only), "ngram" (context
    n-grams only) or "hybrid" (every model drafter and n-grams in one tree).
    Default: "hybrid" with a model drafter, "ngram" without. ``ngram_tokens``:
    longest n-gram continuation drafted; ``ngram_min_score``: an n-gram node
    joins the tree only when its estimated path acceptance is at least this
    (each node widens the verify; on a CPU that costs a few % of a step)."""

    def __init__(self, model, tokenizer, head: Optional[Eagle3Head] = None, *, top_k: int = 4,
                 depth: int = 4, total_tokens: int = 16, aux_layer_ids=None,
                 kv_bits: Optional[int] = None, kv_group_size: int = 64,
                 max_context: Optional[int] = None, prefill_step_size: int = 512,
                 draft_source: Optional[str] = None, ngram_tokens: int = 12,
                 ngram_candidates: int = 3, ngram_min_score: float = 0.1, mtp=None):
        self.model = model
        self.tokenizer = tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
        aux = aux_layer_ids or (head.config.aux_layer_ids if head is not None else None)
        # An EAGLE-3 head reads aux layers, MTP the final-normed state; with
        # neither, the final state (no aux layers to capture).
        self.target = TargetModel(model, aux, final_features=mtp is not None or head is None,
                                  aux_features=head is not None)
        if head is not None:
            check_compatible(head, self.target)
            match_head_dtype(head, self.target)
        self.drafters: list = model_drafters(head, mtp, self.target)
        # The first model drafter: what calibration measures and the tree shape fits.
        self.head = self.drafters[0].head if self.drafters else None
        self.drafter = self.drafters[0].name if self.drafters else "eagle"
        names = [d.name for d in self.drafters]
        self.draft_source = draft_source or ("hybrid" if names else "ngram")
        check_source(self.draft_source, names)
        if not isinstance(ngram_tokens, int) or ngram_tokens < 1:
            raise ValueError(f"ngram_tokens must be a positive integer, got {ngram_tokens!r}")
        self.ngram_tokens, self.ngram_candidates = ngram_tokens, ngram_candidates
        self.ngram_min_score = ngram_min_score
        self.ngram_acceptance = NgramAcceptance()
        # Calibrated verify costs: n-gram nodes then join a hybrid tree only when
        # their expected accepted tokens pay for the wider verify (see hybrid.py).
        self.node_costs: Optional[NodeCosts] = None
        self.matcher = ContextMatcher()
        self.spec = self._check_tree(TreeSpec(top_k, depth, total_tokens))
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.target.check_kv_bits(kv_bits)    # e.g. gpt_oss's attention sinks: refused now, not mid-answer
        if kv_bits:
            args = self.target.args
            hd = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
            if hd % kv_group_size:
                raise ValueError(
                    f"kv_group_size {kv_group_size} does not divide the target's head_dim {hd}"
                )
        self.max_context = max_context or self.target.max_position_embeddings
        self.prefill_step_size = prefill_step_size
        self.prompt_tokens_processed = 0
        self.reset()

    # -- state ---------------------------------------------------------------------

    def reset(self):
        """Forget the conversation: drop both KV caches."""
        self._tokens: list = []       # tokens whose KV the target cache holds
        self._tcache = None
        for d in self.drafters:
            d.forget()

    def set_tree(self, top_k: Optional[int] = None, depth: Optional[int] = None,
                 total_tokens: Optional[int] = None):
        s = self.spec
        self.spec = self._check_tree(TreeSpec(
            s.top_k if top_k is None else top_k,
            s.depth if depth is None else depth,
            s.total_tokens if total_tokens is None else total_tokens,
        ))

    def _check_tree(self, spec: TreeSpec) -> TreeSpec:
        vd = min((d.head.config.draft_vocab_size for d in self.drafters), default=spec.top_k)
        if spec.top_k > vd:
            raise ValueError(f"tree top_k {spec.top_k} exceeds the head's draft vocabulary size {vd}")
        return spec

    def _embedder(self, head):
        return lambda ids: head.embed(ids, self.target.embed_tokens)

    # The first model drafter's embedding and cache, as tests and tools read them.
    def _head_embed(self, ids):
        return self._embedder(self.head)(ids)

    @property
    def _dcache(self):
        return self.drafters[0].cache if self.drafters else None

    # -- prompts -------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list:
        tok = self.tokenizer
        if isinstance(prompt, str):
            add_special = tok.bos_token is None or not prompt.startswith(tok.bos_token)
            return list(tok.encode(prompt, add_special_tokens=add_special))
        prompt = list(prompt)
        if prompt and isinstance(prompt[0], dict):
            text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return list(tok.encode(text, add_special_tokens=False))
        if not all(isinstance(t, int) for t in prompt):
            raise TypeError("prompt must be a string, a list of token ids, or a list of chat messages")
        return prompt

    # -- prefill with prefix reuse -----------------------------------------------------

    def _prefill(self, ids: list):
        """Process ``ids`` reusing the cached common prefix. Returns the logits of
        the last prompt position and the target features of the newly processed
        positions, plus the index of the first of those positions."""
        if self._tcache is None:
            self._tcache = self.target.make_cache()
            self._tokens = []
            for d in self.drafters:
                d.cache, d.length = d.head.make_cache(), 0
        common = 0
        for a, b in zip(self._tokens, ids):
            if a != b:
                break
            common += 1
        # Keep one position back: its features are needed to re-extend the draft,
        # and the draft row at p also depends on token p+1.
        c = max(0, min(common - 1, len(ids) - 1, *(d.length for d in self.drafters)))
        c = trim_cache(self._tcache, c)   # a hybrid target may only go back further
        for d in self.drafters:
            trim_cache(d.cache, c)
            d.length = c
        rest = mx.array(ids[c:], dtype=mx.int32)[None]
        n = rest.shape[1]
        feats = []
        # Like mlx-lm: all but the last prompt token in chunks, then (with
        # kv_bits) the cache is quantized, then the last token gives the logits.
        for s in range(0, n - 1, self.prefill_step_size):
            chunk = rest[:, s : min(s + self.prefill_step_size, n - 1)]
            _, f = self.target.forward(chunk, self._tcache, logits_rows=slice(0, 0))
            feats.append(f)
            mx.eval(f, [cc.state for cc in self._tcache if cc is not None])
        self._quantize_cache()
        if hasattr(self._tcache, "pin"):
            self._tcache.pin()   # a hybrid target can come back to its prompt's end
        logits, f = self.target.forward(rest[:, n - 1 :], self._tcache)
        feats.append(f)
        self.prompt_tokens_processed += n
        self._tokens = list(ids)
        return logits[0, -1], mx.concatenate(feats, axis=1), c

    def _quantize_cache(self):
        if not self.kv_bits:
            return
        for i, c in enumerate(self._tcache):
            if hasattr(c, "to_quantized") and c.keys is not None:
                self._tcache[i] = c.to_quantized(group_size=self.kv_group_size, bits=self.kv_bits)

    # -- generation ------------------------------------------------------------------

    def stream_generate(self, prompt: Prompt, max_tokens: int = 256, temp: float = 0.0,
                        top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                        stop: Optional[Sequence[str]] = None, speculative: bool = True,
                        cancel=None, repetition_penalty: Optional[float] = None,
                        seed: Optional[int] = None,
                        draft_source: Optional[str] = None) -> Iterator[GenerationResponse]:
        source = check_source(draft_source or self.draft_source, [d.name for d in self.drafters])
        if repetition_penalty not in (None, 1.0) and speculative:
            raise ValueError(
                "repetition_penalty is not supported with speculative decoding (it would "
                "change the target's distribution per tree node); use speculative=False / --no-spec"
            )
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
        params = SamplingParams(temp, top_p, top_k, min_p)
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if self.max_context and len(ids) >= self.max_context:
            raise ContextLimitError(
                f"prompt has {len(ids)} tokens but the context limit is {self.max_context}"
            )
        if max_tokens == 0:
            return
        if seed is not None:
            mx.random.seed(seed)
        if repetition_penalty not in (None, 1.0):
            from mlx_lm.sample_utils import make_repetition_penalty

            penalty = make_repetition_penalty(repetition_penalty)
        else:
            penalty = None

        from mlx_lm.generate import wired_limit

        with wired_limit(self.model):
            yield from self._generate(ids, max_tokens, params, stop or (), speculative, cancel,
                                      penalty, source)

    def _draft(self, source, drafters, ext_ids, feats, root, root_h, cur_len):
        """The step's tree from the chosen source(s), plus what merging recorded
        (None when one model drafter's tree is verified as drafted)."""
        trees = []
        for d in drafters:
            if d.length + ext_ids.shape[1] != cur_len:
                raise RuntimeError(f"{d.name} draft cache out of sync with the target")
            trees.append((d.bit, draft_tree(d.head, self._embedder(d.head), d.cache, ext_ids,
                                             feats, root, self.spec)))
            d.length = cur_len
        if source != "hybrid" and source != "ngram":
            tree = trees[0][1]
            mx.eval(tree.tokens, tree.ancestors)
            return tree, None
        cands = self.matcher.propose(self.ngram_tokens, self.ngram_candidates)
        mx.eval([(t.tokens, t.parents, t.scores) for _, t in trees])
        merged = merge_tree(root_h, cands, self.ngram_acceptance, self.max_tree_nodes(source),
                            self.ngram_min_score, costs=self.node_costs, models=trees)
        return merged.tree, merged

    def max_tree_nodes(self, source: str) -> int:
        """Largest tree a step can verify: the drafters' tree shape, widened to
        hold one full n-gram continuation when n-grams draft too."""
        head_nodes = self.spec.num_nodes if source != "ngram" else 1
        return head_nodes if source in ("eagle", "mtp") else max(head_nodes, 1 + self.ngram_tokens)

    def _source_keys(self, source) -> dict:
        """Accepted drafted tokens per label, zero for every label this engine's
        sources can give (so counts read the same across sources)."""
        # Without a model drafter the counts keep the head engine's keys (eagle 0).
        bits = [d.bit for d in self.drafters] or [EAGLE]
        bits.append(NGRAM)
        combos = {0}
        for b in bits:
            combos |= {c | b for c in combos}
        # single sources first, model drafters before n-grams: eagle, mtp, ngram, both, ...
        order = sorted((c for c in combos if c), key=lambda c: (bin(c).count("1"), bool(c & NGRAM), c))
        return {source_label(c): 0 for c in order}

    def _generate(self, ids, max_tokens, params, stops, speculative, cancel, penalty, source):
        tok = self.tokenizer
        eos = tok.eos_token_ids
        detok = tok.detokenizer
        detok.reset()

        tic = time.perf_counter()
        last_logits, feats, start = self._prefill(ids)
        history = list(ids)
        if penalty is not None:
            last_logits = penalty(mx.array(history)[None], last_logits[None])[0]
        root = choose(last_logits, params).reshape(1)
        mx.eval(root, feats)
        names = uses(source, [d.name for d in self.drafters]) if speculative else []
        drafting = [d for d in self.drafters if d.name in names]
        uses_ngram = speculative and source in ("ngram", "hybrid")
        if uses_ngram:
            # indexing the prompt is prompt work (~170 ms at 8k tokens), not a decode step's
            self.matcher.sync(ids)
        prompt_ms = (time.perf_counter() - tic) * 1000
        n_prompt = len(ids) - start
        prompt_tps = n_prompt / max(prompt_ms / 1000, 1e-9)

        # Draft extension inputs: features of the new positions paired with the
        # next token (shifted by one), ending with the root.
        ext_ids = mx.concatenate([mx.array(ids[start + 1 :], dtype=mx.int32), root])[None]
        cur_len = len(ids)
        text, emitted = "", 0
        n_gen, steps = 0, 1                     # the prefill forward produced the root
        gen_tic = time.perf_counter()
        pending = [(int(root.item()), "")]
        draft_ms = verify_ms = 0.0
        source_tokens = self._source_keys(source)

        while True:
            # ---- emit the tokens committed by the last step ----
            step_tokens = len(pending)
            # When the next step's tree would not fit in the context, this
            # step's last token ends the answer (finish reason "context").
            T = self.max_tree_nodes(source) if speculative else 1
            full = bool(self.max_context) and cur_len + T > self.max_context
            for j, (t, src) in enumerate(pending):
                finish = None
                if t in eos:
                    finish = "stop"
                else:
                    detok.add_token(t)
                    text += detok.last_segment
                n_gen += 1
                if finish is None and n_gen >= max_tokens:
                    finish = "length"
                if finish is None and cancel is not None and cancel.is_set():
                    finish = "cancelled"
                if finish is None and full and j == step_tokens - 1:
                    finish = "context"
                if finish is not None:
                    detok.finalize()
                    text += detok.last_segment
                out, hit = _release_text(text, emitted, stops, final=finish is not None)
                if hit:
                    finish = "stop"
                emitted += len(out)
                el = time.perf_counter() - gen_tic
                if src:
                    source_tokens[src] += 1
                yield GenerationResponse(
                    text=out, token=t, from_draft=bool(src), step_index=steps - 1,
                    new_step=j == 0, step_tokens=step_tokens, draft_ms=draft_ms,
                    verify_ms=verify_ms, tokens_per_step=n_gen / steps, steps=steps,
                    prompt_tokens=len(ids), prompt_tps=prompt_tps, prompt_ms=prompt_ms,
                    generation_tokens=n_gen, generation_tps=n_gen / max(el, 1e-9),
                    peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish,
                    speculative=speculative, source=src, source_tokens=dict(source_tokens),
                    drafter=self.drafter,
                )
                if finish is not None:
                    self._finish(history, cur_len)
                    return
                history.append(t)
                if uses_ngram:
                    self.matcher.extend((t,))

            # ---- one step: draft, verify, commit ----
            steps += 1
            t0 = time.perf_counter()
            if speculative:
                tree, merged = self._draft(source, drafting, ext_ids, feats, root, history[-1],
                                           cur_len)
                t1 = time.perf_counter()
                path, tokens_h, bonus, bonus_h, feats = verify_step(
                    self.target, self._tcache, tree, cur_len, params)
                accepted = [tokens_h[i] for i in path[1:]]
                if merged is not None:
                    srcs = [source_label(merged.sources[i]) for i in path[1:]]
                    for n, proposed in merged.proposals:
                        self.ngram_acceptance.update(n, proposed, accepted + [bonus_h])
                else:
                    srcs = [drafting[0].name] * len(accepted)
                t2 = time.perf_counter()
            else:
                t1 = t0
                bonus, bonus_h, _ = decode_step(self.target, self._tcache, root, params, penalty,
                                                history)
                accepted, path = [], [0]
                t2 = time.perf_counter()
            draft_ms = (t1 - t0) * 1000
            verify_ms = (t2 - t1) * 1000
            cur_len += len(path)
            ext_ids = mx.array(accepted + [bonus_h], dtype=mx.int32)[None]
            root = bonus
            pending = list(zip(accepted, srcs if speculative else [])) + [(bonus_h, "")]
            step_tokens = len(pending)

    def _finish(self, history, cur_len):
        # The target cache holds cur_len positions: the prompt plus every
        # committed token except the last, not yet processed one.
        self._tokens = history[:cur_len]
        for d in self.drafters:
            d.length = min(d.length, cur_len)

    def generate(self, prompt: Prompt, verbose: bool = False, **kwargs) -> str:
        text, last = "", None
        for r in self.stream_generate(prompt, **kwargs):
            text += r.text
            last = r
            if verbose:
                print(r.text, end="", flush=True)
        if verbose and last is not None:
            from .runs import format_stats

            print()
            print(format_stats(last))
        return text


def verify_step(target: TargetModel, cache, tree, offset: int, params: SamplingParams):
    """One verification of a drafted tree, as every speculative step runs it.

    The target runs ``tree`` after ``offset`` cached positions under the tree's
    ancestor mask; the accepted path and the bonus token are chosen (greedy: one
    blocking host transfer); the cache is compacted to the path. Returns
    (path node indices, node tokens as a host list, bonus [1] int32, bonus id,
    target features of the path rows [1, len(path), 3H])."""
    positions = (offset + tree.depths).astype(mx.int32)
    # A chain runs causally, except on hybrid targets: their linear layers need
    # one state per node so a part-way rejection rolls back exactly.
    as_tree = not tree.is_chain or target.is_hybrid
    logits, fts = target.forward(
        tree.tokens[None], cache,
        tree_mask=tree.ancestors if as_tree else None,
        positions=positions if as_tree else None,
        tree_shape=TreeShape(tree.parents.tolist()) if target.is_hybrid else None,
    )
    logits = logits[0]
    if params.greedy:
        path_mask, bonus = greedy_verify(tree, logits)
        mx.eval(path_mask, bonus)  # the step's one blocking transfer
        tokens_h, path_h, bonus_h = (a.tolist() for a in (tree.tokens, path_mask, bonus))
        path = [i for i in range(tree.size) if path_h[i]]
        bonus = mx.array([bonus_h], dtype=mx.int32)
    else:
        path, bonus = sample_verify(tree, logits, params)
        tokens_h = tree.tokens.tolist()
        bonus_h = int(bonus.item())
        bonus = bonus.reshape(1)
    compact_cache(cache, offset, path)
    return path, tokens_h, bonus, bonus_h, fts[:, mx.array(path, dtype=mx.int32)]


def decode_step(target: TargetModel, cache, root, params: SamplingParams, penalty=None,
                history=None):
    """One plain decoding step (no draft): the target runs ``root`` [1] and the
    next token is chosen. Returns (token [1] int32, token id, features [1, 1, 3H])."""
    logits, fts = target.forward(root[None], cache)
    row = logits[0, -1]
    if penalty is not None:
        row = penalty(mx.array(history)[None], row[None])[0]
    bonus = choose(row, params).reshape(1)
    return bonus, int(bonus.item()), fts


def _release_text(text: str, emitted: int, stops, final: bool):
    """Text that may be shown now, and whether a stop string was hit. Holds back
    a tail that could be the start of a stop string until it is decided."""
    for st in stops:
        i = text.find(st, max(0, emitted - len(st) + 1))
        if i != -1:
            return text[emitted:max(i, emitted)], True
    if final or not stops:
        return text[emitted:], False
    hold = 0
    for st in stops:
        for k in range(min(len(st) - 1, len(text)), 0, -1):
            if text.endswith(st[:k]):
                hold = max(hold, k)
                break
    return text[emitted:max(emitted, len(text) - hold)], False
