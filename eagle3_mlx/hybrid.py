"""One verified tree from two draft sources: the EAGLE-3 head and context n-grams.

Contract: :func:`merge_tree` takes the head's draft tree (or none) and the
matcher's candidate continuations and returns one :class:`~.tree.DraftTree`
(root first, parents before children) plus the source of every node. Shared
prefixes are merged, so no parent has two children with the same token: the
recursive rejection rule in ``verify.sample_verify`` needs distinct
candidates per node (see below). Runs on the host over a few dozen nodes.

Ranking: a node's score estimates the probability that the target accepts
the path to it. For a head node that is the head's cumulative draft
probability; for an n-gram node at depth d of a candidate whose context
matched n tokens it is ``f_n * l_n ** (d - 1)``: ``f_n`` the acceptance of a
candidate's first token and ``l_n`` that of each later token once the one
before it was accepted, both measured per match length by
:class:`NgramAcceptance`. A node in both sources keeps the larger score.
Siblings are exclusive, so next to an n-gram child accepted with conditional
probability q a head-only sibling is capped to 1 - q: on a confident copy the
head's guesses give their verify width to the copy. Along any path scores
never rise, so keeping the best nodes keeps every kept node's ancestors.

Why point-mass candidates keep sampling exact: at a node with target
distribution p, candidates x1..xm are fixed before the target runs (functions
of the context only, whichever source proposed them). The rule accepts x1
with probability p(x1); on rejection the next-token law is p restricted to
tokens != x1, renormalised: r1 = p(. | not x1). x2 is then accepted with
probability r1(x2) = p(x2) / (1 - p(x1)), and so on; when all are rejected
the token is drawn from p restricted to the rest. Summing over the branches,
token y != x_i is emitted with probability
prod_i (1 - p(x_i)/(1 - sum_{j<i} p(x_j))) * p(y)/(1 - sum_i p(x_i)) = p(y),
and x_i with probability prod_{j<i}(...) * p(x_i)/(1 - sum_{j<i} p(x_j)) = p(x_i):
exactly p. A duplicated candidate would break the identity (its mass would
be removed twice), which is why merging shares prefixes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .ngram import Candidate
from .tree import DraftTree

EAGLE, NGRAM, MTP = 1, 2, 4  # source bits of a node, OR-ed when several sources propose it
SOURCES = ("eagle", "mtp", "ngram", "hybrid")
_LABELS = {EAGLE: "eagle", NGRAM: "ngram", EAGLE | NGRAM: "both", MTP: "mtp",
           EAGLE | MTP: "eagle+mtp", MTP | NGRAM: "mtp+ngram", EAGLE | MTP | NGRAM: "all"}


def source_label(bits: int) -> str:
    """The one name of a node's sources, as step statistics count accepted
    tokens: "eagle", "ngram", "mtp", "both" (head and n-grams), "eagle+mtp",
    "mtp+ngram", "all"; "" for the bonus token, which no source drafted."""
    return _LABELS.get(bits, "")


def from_model(label: str) -> bool:
    """Was a token with this source label proposed by a model drafter (an
    EAGLE-3 head or an MTP module), not by context n-grams alone?"""
    return bool(label) and label != "ngram"

_DEPTH_TIEBREAK = 1e-3       # as in tree.py: a parent outranks its children on ties


def check_source(source: str, drafters: Sequence[str]) -> str:
    """``source`` checked against the engine's model drafters (names: "eagle"
    for an EAGLE-3 head, "mtp" for the target's MTP module). "hybrid" drafts
    with every model drafter and context n-grams in one tree."""
    if source not in SOURCES:
        raise ValueError(f"draft source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "ngram" or source in drafters or (source == "hybrid" and drafters):
        return source
    if not drafters:
        need = "MTP weights in the model" if source == "mtp" else "an EAGLE-3 head (--draft)"
        raise ValueError(f"draft source {source!r} needs {need}; use 'ngram' to speculate without one")
    have = " and ".join("an EAGLE-3 head" if d == "eagle" else "its MTP module" for d in drafters)
    raise ValueError(f"draft source {source!r} is not available: this engine drafts with {have} "
                     f"(use {', '.join(repr(d) for d in drafters)}, 'ngram' or 'hybrid')")


def uses(source: str, drafters: Sequence[str]) -> List[str]:
    """The model drafters a (checked) source drafts with."""
    return list(drafters) if source == "hybrid" else [d for d in drafters if d == source]


KINDS = ("first", "later")   # a candidate's first token; any token after an accepted one


@dataclass
class NgramAcceptance:
    """Running acceptance of n-gram drafts per match length (Beta posterior
    means), kept apart for a candidate's first token and for the tokens after
    it. The first token is the hard one: on held-out prompts 0.47 of first
    tokens were right against 0.66 of later ones at match length 2
    (``scripts/ngram_ranking_check.py``), so one pooled rate over-rates new
    candidates, which then cost verify width, and under-rates long copies."""

    prior_accepted: float = 2.0
    prior_rejected: float = 1.0
    # kind -> {match_len: [accepted, rejected]} seen in this conversation
    live: dict = field(default_factory=lambda: {k: {} for k in KINDS})
    # kind -> {match_len: (accepted, rejected)} pseudo-counts from calibration;
    # lengths it did not see keep the generic prior above.
    measured_prior: dict = field(default_factory=lambda: {k: {} for k in KINDS})

    def rate(self, match_len: int, later: bool = False) -> float:
        """Acceptance of a candidate's first token, or with ``later`` of a token
        whose predecessor was accepted."""
        kind = KINDS[bool(later)]
        pa, pr = self.measured_prior.get(kind, {}).get(
            match_len, (self.prior_accepted, self.prior_rejected))
        a, r = self.live[kind].get(match_len, (0, 0))
        return (a + pa) / (a + pa + r + pr)

    @classmethod
    def from_measured(cls, counts: dict, weight: float = 32.0) -> "NgramAcceptance":
        """Start from calibration's counts ({kind: {match_len: [accepted, rejected]}}),
        each cell's evidence scaled down to at most ``weight`` events, so the
        live counts of this conversation soon dominate."""
        prior = {k: {} for k in KINDS}
        for kind in KINDS:
            for n, (a, r) in counts.get(kind, {}).items():
                scale = min(1.0, weight / max(a + r, 1.0))
                prior[kind][int(n)] = (a * scale + 1.0, r * scale + 1.0)   # + a uniform Beta(1, 1)
        return cls(measured_prior=prior)

    def forget(self):
        """Drop this conversation's counts; the calibrated prior stays."""
        self.live = {k: {} for k in KINDS}

    def counts(self) -> dict:
        """{kind: {match_len: [accepted, rejected]}} observed (no prior): what calibration stores."""
        return {k: {n: list(c) for n, c in sorted(self.live[k].items())} for k in KINDS}

    def update(self, match_len: int, proposed: Sequence[int], committed: Sequence[int]):
        """One verified candidate: each token up to the first miss was reached,
        and is counted as accepted or (the miss) rejected."""
        for d, (a, b) in enumerate(zip(proposed, committed)):
            cell = self.live[KINDS[d > 0]].setdefault(match_len, [0, 0])
            if a != b:
                cell[1] += 1
                return
            cell[0] += 1


@dataclass
class NodeCosts:
    """What verifying more nodes costs and what an accepted token is worth, in
    ms, from this machine's calibration. Adding nodes with acceptance
    probabilities p_i at a verify cost dC raises tokens/s exactly when
    sum(p_i) * token_ms > dC, with token_ms = step ms / tokens per step."""

    verify_ms: Dict[int, float]          # tree width -> verify ms, non-decreasing
    token_ms: float

    def __post_init__(self):
        self._ws = sorted(int(w) for w in self.verify_ms)
        self._ms = [float(self.verify_ms[w]) for w in self._ws]

    def verify(self, width: int) -> float:
        ws, ms = self._ws, self._ms
        i = bisect.bisect_left(ws, width)
        if i < len(ws) and ws[i] == width:
            return ms[i]
        if len(ws) == 1:
            return ms[0]
        i = min(max(i, 1), len(ws) - 1)             # interpolate, or extrapolate past the ends
        w0, w1, m0, m1 = ws[i - 1], ws[i], ms[i - 1], ms[i]
        return m0 + (m1 - m0) * (width - w0) / (w1 - w0)


@dataclass
class MergedTree:
    tree: DraftTree
    sources: List[int]                  # per node: EAGLE / NGRAM / MTP bits (root 0)
    proposals: List[tuple]              # (match_len, tokens in the tree) per n-gram candidate


def merge_tree(root_token: int, candidates: Sequence[Candidate], acceptance: NgramAcceptance,
               max_nodes: int, min_score: float, eagle: Optional[DraftTree] = None,
               costs: Optional[NodeCosts] = None,
               models: Sequence[Tuple[int, DraftTree]] = ()) -> MergedTree:
    """Merge the model drafters' trees (``eagle``: the head's; ``models``: (source
    bit, tree) pairs, e.g. the MTP module's) and the n-gram candidates into at
    most ``max_nodes`` nodes; n-gram nodes scoring below ``min_score`` are not
    worth their verify cost. With ``costs`` (calibrated) the n-gram-only nodes
    are further cut to the best-scoring ones whose expected accepted tokens pay
    for the wider verify. A node two model drafters share keeps the larger of
    their probabilities."""
    tokens, parents, scores, sources = [int(root_token)], [0], [1.0], [0]
    child = {}
    drafted = ([(EAGLE, eagle)] if eagle is not None else []) + list(models)
    for bit, tree in drafted:
        _add_model_tree(tree, bit, tokens, parents, scores, sources, child)
    paths = []
    for cand in candidates:
        first, later = acceptance.rate(cand.match_len), acceptance.rate(cand.match_len, later=True)
        node, s = 0, 1.0
        path = []
        for d, t in enumerate(cand.tokens):
            s *= later if d else first
            if s < min_score:
                break
            nxt = child.get((node, t))
            if nxt is None:
                nxt = len(tokens)
                child[(node, t)] = nxt
                tokens.append(t)
                parents.append(node)
                scores.append(s)
                sources.append(NGRAM)
            else:
                scores[nxt] = max(scores[nxt], s)
                sources[nxt] |= NGRAM
            node = nxt
            path.append(nxt)
        paths.append((cand, path))
    ceded = _cede_to_ngrams(parents, scores, sources)
    if costs is not None:
        tokens, parents, scores, sources, paths = _admit(tokens, parents, scores, sources, paths,
                                                         costs, max_nodes, ceded)
    proposals = [(cand.match_len, tuple(cand.tokens[:len(path)])) for cand, path in paths if path]
    if len(drafted) == 1:
        bit, tree = drafted[0]
        if (len(tokens) == tree.size and tree.size <= max_nodes
                and all(src & bit for src in sources[1:])):
            return MergedTree(tree, sources, proposals)   # one drafter's tree as drafted: keep it on device
    return MergedTree(*_build(tokens, parents, scores, sources, max_nodes), proposals)


def _add_model_tree(tree: DraftTree, bit: int, tokens, parents, scores, sources, child):
    """Add a model drafter's tree under the shared root, sharing prefixes with
    the nodes already there (a node's parent index maps through ``where``)."""
    t_tok, t_par = tree.tokens.tolist(), tree.parents.tolist()
    t_sc = np.exp(np.array(tree.scores.astype(mx.float32))).tolist()
    where = [0] * tree.size
    for i in range(1, tree.size):
        key = (where[t_par[i]], t_tok[i])
        node = child.get(key)
        if node is None:
            node = child[key] = len(tokens)
            tokens.append(t_tok[i])
            parents.append(key[0])
            scores.append(t_sc[i])
            sources.append(bit)
        else:
            scores[node] = max(scores[node], t_sc[i])
            sources[node] |= bit
        where[i] = node


def _cede_to_ngrams(parents, scores, sources) -> set:
    """Siblings are exclusive: at most one child of a node is the target's
    token. Where an n-gram child is accepted with conditional probability q
    (measured in this conversation), a head-only sibling can be right at most
    1 - q of the time, however sure the head is; its score, and its subtree's,
    is capped to that. Head probabilities are the head's own, not measured, so
    the cap goes this way only. Returns the head nodes whose score was capped:
    on a confident copy they no longer pay for their verify width."""
    ngram_q = {}
    for i in range(1, len(parents)):
        p = parents[i]
        if sources[i] == NGRAM and scores[p] > 0:
            ngram_q[p] = max(ngram_q.get(p, 0.0), scores[i] / scores[p])
    if not ngram_q:
        return set()
    factor, ceded = [1.0] * len(parents), set()
    for i in range(1, len(parents)):            # parents precede children
        if sources[i] & NGRAM:     # only nodes no n-gram proposed cede
            continue
        p = parents[i]
        f = factor[p]
        if p in ngram_q and scores[i] > 0:     # p holds an n-gram child, so p itself was not capped
            f = min(f, (1.0 - ngram_q[p]) * scores[p] / scores[i])
        if f < 1.0:
            factor[i] = f
            scores[i] *= f
            ceded.add(i)
    return ceded


def _admit(tokens, parents, scores, sources, paths, costs: NodeCosts, max_nodes: int,
           ceded: set = frozenset()):
    """Keep the optional nodes worth their verify cost -- n-gram-only nodes and
    head nodes that ceded to an n-gram sibling: the m best by score (parents
    first: scores never rise along a path) maximising
    sum(score) * token_ms - (verify(T0 + m) - verify(T0)), T0 the other nodes."""
    extra = [i for i in range(1, len(tokens)) if sources[i] == NGRAM or i in ceded]
    if not extra:
        return tokens, parents, scores, sources, paths
    depth = [0] * len(tokens)
    for i in range(1, len(tokens)):
        depth[i] = depth[parents[i]] + 1
    extra.sort(key=lambda i: (-scores[i], depth[i], i))
    base = min(len(tokens) - len(extra), max_nodes)
    best_m, best_gain, gain = 0, 0.0, 0.0
    for m, i in enumerate(extra[:max(0, max_nodes - base)], start=1):
        gain += scores[i] * costs.token_ms
        net = gain - (costs.verify(base + m) - costs.verify(base))
        if net > best_gain:
            best_m, best_gain = m, net
    drop = set(extra[best_m:])
    keep = [i for i in range(len(tokens)) if i not in drop]      # parents before children still
    new = {old: j for j, old in enumerate(keep)}
    paths = [(cand, [new[n] for n in _prefix_kept(path, drop)]) for cand, path in paths]
    return ([tokens[i] for i in keep], [new[parents[i]] if i else 0 for i in keep],
            [scores[i] for i in keep], [sources[i] for i in keep], paths)


def _prefix_kept(path, drop):
    out = []
    for n in path:
        if n in drop:
            break
        out.append(n)
    return out


def _build(tokens, parents, scores, sources, max_nodes):
    T = len(tokens)
    depth = [0] * T
    for i in range(1, T):           # parents precede children
        depth[i] = depth[parents[i]] + 1
    keep = list(range(T))
    if T > max_nodes:
        ranked = sorted(range(1, T), key=lambda i: -(scores[i] - _DEPTH_TIEBREAK * depth[i]))
        keep = [0] + ranked[:max_nodes - 1]
    keep.sort(key=lambda i: (depth[i], i))
    new = {old: j for j, old in enumerate(keep)}
    n = len(keep)
    par = [0] + [new[parents[i]] for i in keep[1:]]
    anc = np.zeros((n, n), dtype=bool)
    for j in range(n):
        anc[j] = anc[par[j]]
        anc[j, j] = True
    tree = DraftTree(
        tokens=mx.array([tokens[i] for i in keep], dtype=mx.int32),
        parents=mx.array(par, dtype=mx.int32),
        ancestors=mx.array(anc),
        depths=mx.array([depth[i] for i in keep], dtype=mx.int32),
        size=n,
        is_chain=all(par[j] == j - 1 for j in range(1, n)),
    )
    return tree, [sources[i] for i in keep]
