"""MTP as a draft source: the target's own multi-token-prediction module drafts
the same dynamic tree as an EAGLE-3 head (:func:`eagle3_mlx.tree.draft_tree`).

The pairing is the head's: draft position p reads the target's final-normed
hidden state of token p and the embedding of token p + 1, and predicts token
p + 2; deeper levels feed back the module's own output. So the module only
needs to look like a head to the tree builder: :class:`MTPDrafter` adapts
:class:`~eagle3_mlx.mtp.MTPModule` to that interface (``embed``, ``__call__``
with explicit positions and masks, ``make_cache``, ``to_target_ids``) and
draws its logits from the target's lm_head over the full vocabulary.

Tree nodes of one level are drafted together at their depth's position: the
MTP layer's RoPE is wrapped once with the target adapter's per-token
positions, as the target's own layers are.
"""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx

from .mtp import MTPModule, lm_head_logits
from .target import PositionalRope, TargetModel, _PositionState


class MTPDrafter:
    """An :class:`MTPModule` presented to the tree builder as a draft head."""

    kind = "mtp"

    def __init__(self, mtp: MTPModule, target: TargetModel):
        self.mtp, self.target = mtp, target
        V = target.vocab_size
        self.config = SimpleNamespace(kind="mtp", draft_vocab_size=V, vocab_size=V,
                                      aux_layer_ids=None, quantization=None)
        self.d2t = mx.zeros((V,), dtype=mx.int32)   # the draft vocabulary is the target's
        self._state = _PositionState()
        for layer in mtp.layers:
            attn = layer.self_attn
            if not isinstance(attn.rope, PositionalRope):
                attn.rope = PositionalRope(attn.rope, self._state)
            else:
                self._state = attn.rope._state

    # What calibration keys and quantization checks read from a head.
    def parameters(self):
        return self.mtp.parameters()

    def named_modules(self):
        return self.mtp.named_modules()

    def make_cache(self) -> list:
        return self.mtp.make_cache()

    def embed(self, tokens, target_embed=None):
        return self.target.embed(tokens)

    def to_target_ids(self, draft_ids):
        return draft_ids

    def __call__(self, embeddings, hidden, cache=None, mask=None, positions=None, from_target=None,
                 logits_rows=None):
        """As :meth:`Eagle3Head.__call__`: ``positions`` is the first row's position
        under a causal mask, or the one position every row of a tree level has."""
        T = embeddings.shape[1]
        if positions is None:
            positions = cache[0].offset if cache else 0
        if isinstance(mask, str):  # causal: consecutive positions
            pos = mx.arange(positions, positions + T, dtype=mx.int32)
        else:
            pos = mx.full((T,), positions, dtype=mx.int32)
        self._state.positions = pos
        try:
            feedback, normed = self.mtp(embeddings, hidden, cache=cache, mask=mask)
        finally:
            self._state.positions = None
        if logits_rows is not None:
            normed = normed[:, logits_rows]
        return feedback, lm_head_logits(self.target.model, normed)
