"""The front door every command goes through: shared options, the default
model, loading, the tree, the online tuner, and the load-failure report.

Contract:
* ``add_*_args`` declare the options generate, chat, serve, bench and
  calibrate share, once, with one meaning.
* :func:`resolve_target` is the ONE default-model rule: without ``--model``
  the default model (:mod:`eagle3_mlx.default_model`) is the target; its
  shipped head drafts unless ``--draft`` names another. With ``--model`` only
  ``--draft`` gives a head; without one the model's MTP module or context
  n-grams draft (the shipped head belongs to the default model alone).
* :func:`open_engine` loads (:func:`eagle3_mlx.api.load`), applies ``--tree``
  and attaches the online tuner for ``--tree auto``; it returns
  ``(engine, tuner)``. :func:`finish` settles a one-shot run's tuner.
* :func:`report_load_failure` turns a load failure into one line on stderr
  and the command's exit status.

Nothing below :mod:`eagle3_mlx.tuning` imports this module: it sits on top.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

from .console import say

USAGE_HINT = (
    "Pass a target model and (optionally) its EAGLE-3 draft head:\n"
    "  eagle3-mlx <command> --model <mlx-lm model dir or HF repo> --draft <EAGLE-3 head dir or HF repo>\n"
    "(--draft takes a head in any published layout; it is converted once and cached)."
)


class SetupError(RuntimeError):
    """A command cannot pick a model; the message says what to pass instead."""


# --------------------------------------------------------------------------- options


def add_model_args(p: argparse.ArgumentParser, *, draft_source: bool = True) -> None:
    """--model, --draft, --draft-source (unless the command declares its own)
    and --draft-feedback."""
    p.add_argument("--model", default=None,
                   help="target model: mlx-lm directory or Hugging Face repo, converted once if it "
                        "is not MLX (default: the default model, with its shipped head)")
    p.add_argument("--draft", default=None,
                   help="EAGLE-3 head: a directory or Hugging Face repo in any published layout "
                        "(converted once, cached); with --model but no --draft, the model's MTP "
                        "module or context n-grams draft")
    if draft_source:
        from .hybrid import SOURCES

        p.add_argument("--draft-source", choices=SOURCES, default=None,
                       help="what drafts the tree: the head (eagle), the model's own MTP module (mtp), "
                            "context n-grams (ngram), or the head or MTP with n-grams in one tree "
                            "(hybrid); default: hybrid with a head or MTP weights, ngram without")
    p.add_argument("--draft-feedback", choices=("prenorm", "normed"), default=None,
                   help="state the head feeds back between draft steps (default: what its config says; "
                        "SpecForge EAGLE-3.1 heads trained before 2026-09 need prenorm)")


def add_dtype_arg(p: argparse.ArgumentParser, default_note: str = "no cast") -> None:
    p.add_argument("--dtype", default=None, help=f"cast the target's weights, e.g. float32 (default: {default_note})")


def add_tree_arg(p) -> None:
    """--tree (``p``: a parser or an argument group)."""
    p.add_argument("--tree", default="auto",
                   help="draft tree: 'auto' (calibrated for this machine, cached) or "
                        "TOP_K,DEPTH,TOTAL_TOKENS, e.g. 4,4,16; TOP_K 1 is a chain")


def add_sampling_args(p: argparse.ArgumentParser, *, max_tokens: int, short: bool = True,
                      top_p: bool = True) -> None:
    """--max-tokens, --temp and --top-p, as the generating commands sample."""
    names = ("--max-tokens", "-m") if short else ("--max-tokens",)
    p.add_argument(*names, type=int, default=max_tokens, help=f"maximum tokens per answer (default {max_tokens})")
    p.add_argument("--temp", type=float, default=0.0,
                   help="sampling temperature (0 = greedy: output identical to plain decoding; default 0)")
    if top_p:
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")


@dataclass
class EngineOptions:
    """What :func:`open_engine` needs, as the commands' options name it."""

    model: Optional[str] = None
    draft: Optional[str] = None
    draft_source: Optional[str] = None
    draft_feedback: Optional[str] = None
    dtype: Optional[str] = None
    kv_bits: Optional[int] = None
    tree: Any = "auto"                          # None: the command sets trees itself (bench, calibrate)
    shape: dict = field(default_factory=dict)   # explicit top_k/depth/total_tokens: no calibration
    speculative: bool = True                    # False: plain decoding, no tree and no tuner
    tree_kw: dict = field(default_factory=dict)  # calibration options (force, quick)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **override) -> "EngineOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in vars(args).items() if k in known}, **override})


# --------------------------------------------------------------------------- the default model


@dataclass
class Target:
    model: str
    draft: Optional[str]
    name: Optional[str] = None    # the default model's name when it is the target


def resolve_target(model: Optional[str], draft: Optional[str],
                   progress: Callable[..., None] = say) -> Target:
    """The one default-model rule (see the module's contract). Raises
    :class:`SetupError` saying what to pass when the default cannot be used."""
    if model:
        return Target(str(model), str(draft) if draft else None)
    try:
        from . import default_model as dm
    except ImportError:
        dm = None
    ensure = getattr(dm, "ensure_default_model", None)
    head_path = getattr(dm, "default_head_path", None)
    if ensure is None or head_path is None:
        raise SetupError(f"No default model is available in this installation.\n{USAGE_HINT}")
    name = getattr(dm, "DEFAULT_MODEL_NAME", "the default model")
    # Check for the head first: no point assembling the target without one.
    head = draft or head_path()
    if not head:
        why = getattr(dm, "NO_HEAD_MESSAGE", "no EAGLE-3 head is shipped for the default model yet")
        raise SetupError(f"The default model ({name}) cannot be used: {why}.\n{USAGE_HINT}")
    try:
        path = ensure(progress=False, log=_preparing_log(name, progress))
    except Exception as exc:  # noqa: BLE001 - DefaultModelError and friends
        raise SetupError(f"The default model ({name}) is not available: {exc}\n{USAGE_HINT}") from exc
    return Target(str(path), str(head), name)


def _preparing_log(name: str, progress: Callable[..., None]) -> Callable[[str], None]:
    """The default model's log: it speaks only when it assembles and converts
    (a cached model says nothing), so "Preparing" is said before its first line."""
    said = []

    def log(message):
        if not said:
            said.append(True)
            progress(f"Preparing the default model {name} (the first run assembles and converts it)…")
        progress(str(message).removeprefix("eagle3-mlx: "))

    return log


def short_name(path: Any) -> str:
    """A model's directory name, or the repo id as given."""
    s = str(path).rstrip("/")
    return Path(s).name if "/" in s and Path(s).exists() else s


# --------------------------------------------------------------------------- loading


def load_engine(opts: EngineOptions, target: Target, progress: Callable[..., None] = say):
    """:func:`eagle3_mlx.api.load` with the options, then the tree applied."""
    from . import distributed
    from .api import load

    progress(f"Loading {short_name(target.model)} with draft head {short_name(target.draft)}…"
             if target.draft else f"Loading {short_name(target.model)} (no draft head)…")
    with distributed.lazy_load():
        engine = load(target.model, target.draft, model_dtype=opts.dtype, draft_source=opts.draft_source,
                      draft_feedback=opts.draft_feedback, log=_quiet_prefix(progress),
                      **({"kv_bits": opts.kv_bits} if opts.kv_bits is not None else {}), **opts.shape)
    distributed.shard(engine, progress)   # under mlx.launch only: tensor parallel, in place
    apply_options_tree(engine, opts, progress)
    return engine


def apply_options_tree(engine, opts: EngineOptions, progress: Callable[..., None] = say):
    """``--tree`` on the loaded engine (None when it does not apply: plain
    decoding, explicit shape options, or no head or MTP to draft a tree)."""
    if opts.tree is None or not opts.speculative or opts.shape or engine.head is None:
        return None
    from .distributed import apply_tree

    progress("Choosing the draft tree for this machine…")
    return apply_tree(engine, opts.tree, log=progress, **opts.tree_kw)


def attach_tuner(engine, opts: EngineOptions, **tuner_options):
    """The online tuner for ``--tree auto`` (None for an explicit tree or shape,
    plain decoding, or no cached calibration)."""
    from .distributed import group

    # Sharded: no online retuning (it would retune from each rank's own timings).
    if opts.tree is None or not opts.speculative or opts.shape or group() is not None:
        return None
    from .tuning.choose import auto_tuner

    return auto_tuner(engine, opts.tree, **tuner_options)


def open_engine(opts: EngineOptions, *, progress: Callable[..., None] = say, target: Optional[Target] = None,
                **tuner_options):
    """Resolve (unless ``target`` is given), load, apply the tree, attach the
    tuner: ``(engine, tuner)``."""
    target = target or resolve_target(opts.model, opts.draft, progress)
    engine = load_engine(opts, target, progress)
    return engine, attach_tuner(engine, opts, **tuner_options)


def _quiet_prefix(progress: Callable[..., None]) -> Callable[[str], None]:
    """Conversion logs for ``progress``: stderr keeps their prefix, a UI drops it."""
    if progress is say:
        return say
    return lambda text: progress(str(text).removeprefix("eagle3-mlx: "))


# A one-shot run (generate, chat --smoke) refreshes the cached acceptance only
# when it saw at least this many speculative steps: fewer say little.
RUN_TUNE_STEPS = 16


def finish(tuner, log: Callable[[str], None] = say):
    """End of a one-shot run: the tuner refreshes the cached acceptance from
    what it observed (one line only when the tree changed)."""
    from .tuning.choose import finish_run_tuning

    return finish_run_tuning(tuner, log=log)


# --------------------------------------------------------------------------- failures


def describe_error(exc: BaseException) -> str:
    """A one-paragraph, user-facing description of an engine failure."""
    name = type(exc).__name__
    text = str(exc).strip() or name
    low = text.lower()
    if isinstance(exc, MemoryError) or "out of memory" in low or "malloc" in low or "oom" in low.split():
        return (f"Out of memory ({text}). Try a smaller --max-tokens, a smaller tree "
                "(settings), or start a new chat (ctrl+n).")
    if "context" in low and ("limit" in low or "length" in low or "exceed" in low):
        return f"Context limit reached ({text}). Start a new chat with ctrl+n."
    return f"{name}: {text}"


def describe_load_error(exc: BaseException) -> str:
    if isinstance(exc, SetupError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"Could not load the model: {exc}. Check the --model and --draft paths."
    return f"Could not load the model: {describe_error(exc)}"


def report_load_failure(prog: str, exc: BaseException) -> int:
    """One line on stderr saying why the model did not load, for a command
    (``prog``) that then exits with the returned status: 2 for a setup error
    (the message says what to pass instead), 1 when loading itself failed."""
    print(f"{prog}: error: {describe_load_error(exc)}", file=sys.stderr)
    return 2 if isinstance(exc, SetupError) else 1
