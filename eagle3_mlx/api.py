"""mlx-lm-shaped entry points: ``load``, ``generate``, ``stream_generate``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from .engine import Engine, GenerationResponse, Prompt
from .head import load_head


def resolve_path(path_or_repo: str) -> Path:
    """A local directory as is (never touches the network); otherwise a Hugging
    Face repo id, taken from the local cache first and downloaded only when the
    hub is reachable and HF_HUB_OFFLINE is not set."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path_or_repo), local_files_only=True))
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise FileNotFoundError(
                f"{path_or_repo}: not a local directory and not in the Hugging Face cache "
                "(HF_HUB_OFFLINE is set)"
            ) from None
    try:
        return Path(snapshot_download(str(path_or_repo)))
    except Exception as e:
        raise FileNotFoundError(f"{path_or_repo}: not a local directory and not downloadable ({e})") from None


def load(model_path: str, draft_path: str | None = None, *, model_dtype: str | None = None,
         **spec_options) -> Engine:
    """Load an MLX target and (optionally) an MLX EAGLE-3 head and return an
    :class:`Engine`. Without a head the engine drafts from context n-grams.

    ``spec_options``: ``top_k``, ``depth``, ``total_tokens``, ``kv_bits``,
    ``kv_group_size``, ``max_context``, ``aux_layer_ids``, ``draft_source``
    ("eagle", "ngram" or "hybrid"), ``ngram_tokens``, ``ngram_min_score``.
    ``model_dtype``: cast the target's floating weights (e.g. ``"float32"`` on a CPU).
    """
    from mlx_lm import load as mlx_load

    model, tokenizer = mlx_load(str(resolve_path(model_path)))
    if model_dtype:
        cast_floating(model, model_dtype)
    head = load_head(resolve_path(draft_path)) if draft_path else None
    return Engine(model, tokenizer, head, **spec_options)


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
