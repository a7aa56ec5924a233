"""The model drafters of an engine: an EAGLE-3 head, the target's MTP module,
or both, each with its own draft cache.

Contract: :func:`model_drafters` turns what was loaded into a list of
:class:`ModelDrafter` (EAGLE-3 head first), each presenting the head
interface that :func:`eagle3_mlx.tree.draft_tree` drives. The target hands
all drafters their inputs in one feature array, [aux states..., final
state]; a drafter that reads only part of it is wrapped in
:class:`FeatureColumns`, so the tree builder and calibration stay unaware of
who else drafts. Every drafter extends its cache with the committed tokens
only when it drafts; ``length`` says how many stable rows it holds, and the
engine re-reads the prompt from the shortest one when a source returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .hybrid import EAGLE, MTP


class FeatureColumns:
    """A draft head that reads only ``columns`` of the target features."""

    def __init__(self, head, columns: slice):
        self._head, self._columns = head, columns

    def __call__(self, embeddings, hidden, *args, from_target=False, **kwargs):
        if from_target:
            hidden = hidden[..., self._columns]
        return self._head(embeddings, hidden, *args, from_target=from_target, **kwargs)

    def __getattr__(self, name):
        # config, embed, make_cache, to_target_ids, parameters, ... are the head's
        return getattr(self._head, name)


@dataclass
class ModelDrafter:
    name: str                     # "eagle" or "mtp": its source name and label
    bit: int                      # hybrid.EAGLE or hybrid.MTP
    head: object                  # the head interface draft_tree drives
    cache: Optional[list] = None  # its KV caches, made on the first prompt
    length: int = 0               # stable rows the cache holds

    def forget(self):
        self.cache, self.length = None, 0


def model_drafters(head, mtp, target) -> List[ModelDrafter]:
    """``head`` (an Eagle3Head or None) and ``mtp`` (an MTPModule or None) as
    drafters over ``target``, whose features were built to hold what each reads:
    the aux states (``len(target.aux_layer_ids)`` x hidden) then the final state."""
    out = []
    aux = len(target.aux_layer_ids) * target.hidden_size
    if head is not None:
        out.append(ModelDrafter("eagle", EAGLE,
                                FeatureColumns(head, slice(0, aux)) if mtp is not None else head))
    if mtp is not None:
        from .mtp_draft import MTPDrafter

        drafter = MTPDrafter(mtp, target)
        out.append(ModelDrafter("mtp", MTP,
                                FeatureColumns(drafter, slice(aux, None)) if head is not None else drafter))
    return out
