"""mlx-lm-shaped entry points: ``load``, ``generate``, ``stream_generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .engine import Engine, GenerationResponse, Prompt
from .head import load_head


def resolve_path(path_or_repo: str) -> Path:
    """A local directory as is (never touches the network); otherwise a Hugging
    Face repo id, taken from the local cache first and downloaded only when the
    hub is reachable and HF_HUB_OFFLINE is not set."""
    from .hub_cache import fetch

    return fetch(str(path_or_repo))


def load(model_path: str, draft_path: str | None = None, *, model_dtype: str | None = None,
         draft_feedback: str | None = None, tree=None, log=None, **spec_options) -> Engine:
    """Load a target and (optionally) an EAGLE-3 head and return an
    :class:`Engine`. Without a head the engine drafts from context n-grams.

    Both may be directories or Hugging Face repo ids in any layout the
    converter reads: MLX ones load as they are, others are converted once into
    the per-user cache and reused (:mod:`eagle3_mlx.hub_cache`).
    ``draft_feedback`` ("prenorm" or "normed") overrides the state the head
    feeds back between draft steps (EAGLE-3.1 ``norm_output``). ``log``: where
    conversion progress goes (default: stderr).

    ``spec_options``: ``top_k``, ``depth``, ``total_tokens``, ``kv_bits``,
    ``kv_group_size``, ``max_context``, ``aux_layer_ids``, ``draft_source``
    ("eagle", "mtp", "ngram" or "hybrid"; a model that ships MTP weights drafts
    with its MTP module, the head if given, and n-grams by default), ``ngram_tokens``,
    ``ngram_min_score``.
    ``model_dtype``: cast the target's floating weights (e.g. ``"float32"`` on a CPU).
    ``tree``: as the CLI's ``--tree``: ``"auto"`` uses the tree calibrated for
    this machine (measured once, about a minute, then cached) and ranks hybrid
    candidates with the calibration's measured rates; ``"K,D,N"`` or a tuple
    sets the shape (and still uses a cached calibration's rates). Give either
    ``tree`` or ``top_k``/``depth``/``total_tokens``, not both. Without a head
    it does not apply, as on the CLI: n-gram drafts size themselves.
    """
    from mlx_lm import load as mlx_load

    from .console import say
    from .hub_cache import resolve_head, resolve_model

    shape = sorted({"top_k", "depth", "total_tokens"} & spec_options.keys())
    if tree is not None and shape:
        raise ValueError(f"give either tree= or {'/'.join(shape)}=, not both")
    log = log or say
    model_dir = resolve_model(model_path, log=log)
    model, tokenizer = mlx_load(str(model_dir))
    if model_dtype:
        cast_floating(model, model_dtype)
    head = mtp = None
    if draft_path:
        # The target's config settles aux ids that read either way and is
        # checked against the head before the conversion is cached.
        head_dir = resolve_head(draft_path, target_config=model_dir / "config.json", log=log)
        head = load_head(head_dir, feedback=draft_feedback)
    source = spec_options.get("draft_source")
    if source not in ("ngram", "eagle"):
        # The MTP module drafts beside a head too ("hybrid": one tree from both).
        mtp = _load_mtp(model_dir, model, source)
    engine = Engine(model, tokenizer, head, mtp=mtp, **spec_options)
    if tree is not None and engine.head is not None:   # an EAGLE-3 head or the MTP module
        from .tuning.choose import apply_tree

        apply_tree(engine, tree, log=log)
    return engine


def _load_mtp(model_dir: Path, model, source):
    """The target's MTP module (the default drafter of a model that ships one and
    has no head), or None; ``source="mtp"`` without MTP weights is refused in
    one line before anything else loads."""
    import json

    from .mtp import load_mtp, mtp_support_problem

    config = json.loads((model_dir / "config.json").read_text())
    problem = mtp_support_problem(config)
    mtp = None if problem else load_mtp(model_dir, getattr(model, "language_model", model).args)
    if mtp is None and source == "mtp":
        raise ValueError(problem or f"{model_dir}: this model has no MTP weights "
                         "(draft source 'mtp' needs a checkpoint with mtp.* tensors)")
    return mtp


def cast_floating(module, dtype: str):
    """Cast ``module``'s floating-point parameters to ``dtype`` (a name, e.g.
    "float32") in place; integer and packed quantized weights are left alone."""
    import mlx.core as mx

    module.set_dtype(getattr(mx, dtype))
    return module


def stream_generate(engine: Engine, prompt: Prompt, **kwargs) -> Iterator[GenerationResponse]:
    """Yield one :class:`GenerationResponse` per generated token."""
    return engine.stream_generate(prompt, **kwargs)


def generate(engine: Engine, prompt: Prompt, verbose: bool = False, **kwargs) -> str:
    """Generate a complete answer; with ``verbose`` stream it and print statistics."""
    return engine.generate(prompt, verbose=verbose, **kwargs)
