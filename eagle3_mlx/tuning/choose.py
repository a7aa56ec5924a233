"""Which tree to draft: ``--tree`` from the command line to the engine.

Contract: :func:`apply_tree` is the one entry point the commands use: it turns
a ``--tree`` value ("auto", "K,D,N", a TreeSpec or a tuple) into a TreeSpec via
:func:`resolve_tree` (for "auto": :func:`calibrate`, which loads the cached
calibration or measures once and caches it), sets it on the engine, and seeds
hybrid drafting from the calibration (:func:`seed_hybrid`).
:func:`auto_tuner` / :func:`finish_run_tuning` attach and settle the online
tuner for runs whose tree is "auto". The ``--tree`` option itself is declared
by :mod:`eagle3_mlx.entry`, which the commands load through.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..treespec import TreeSpec
from . import measure as M
from .acceptance import AcceptanceModel
from .cache import Calibration, calibration_key, load_calibration, save_calibration
from .costs import CostModel, ext_cost, monotone
from .optimise import optimise
from .tuner import make_tuner


def calibrate(engine, *, force: bool = False, quick: bool = False, directory: Optional[Path] = None,
              widths: Optional[Sequence[int]] = None, top_ks: Optional[Sequence[int]] = None,
              draft_depths: Optional[Sequence[int]] = None, levels: Optional[int] = None,
              n_prompts: Optional[int] = None, max_tokens: Optional[int] = None,
              reps: Optional[int] = None, context: Optional[int] = None, save: bool = True,
              log: Optional[Callable] = None) -> Calibration:
    """Measure (or load from the cache) this machine's costs and this head's
    acceptance, and pick the tree. The engine's tree and caches are restored."""
    from ..prompts import calibration_prompts

    log = log or (lambda *a: None)
    key = calibration_key(engine.model, engine.head)
    if not force:
        cal = load_calibration(key, directory)
        if cal is not None:
            if cal.choice is None:
                cal.pick()
            return cal
    s = M.settings(quick, widths=widths, top_ks=top_ks, draft_depths=draft_depths, levels=levels,
                   n_prompts=n_prompts, max_tokens=max_tokens, reps=reps, context=context)
    widths, levels, max_tokens = s["widths"], s["levels"], s["max_tokens"]

    t_start = time.perf_counter()
    saved_spec = engine.spec
    try:
        dev = key["device"]
        log(f"calibrating on {dev.get('backend')} ({dev.get('device_name') or dev.get('cpu')}), "
            f"mlx {key['mlx']}, {key['quantization']}")
        log(f"measuring verify cost for widths {list(widths)} (context {s['context']}) and draft "
            f"cost for top_k {list(s['top_ks'])} x depth {list(s['draft_depths'])} ...")
        verify_ms, draft_fit, draft_raw = M.measure_costs(engine.target, engine.head, s)
        ext_ms = ext_cost(draft_raw)
        log("  " + "  ".join(f"T={t}:{ms:.1f}" for t, ms in sorted(verify_ms.items())) + " ms")
        log("  " + "  ".join(f"k={k}:{a:.1f}+{b:.1f}/level" for k, (a, b) in sorted(draft_fit.items()))
            + f" ms; +{ext_ms:.2f} ms per extra committed token")
        prompts = calibration_prompts(s["n_prompts"])
        log(f"measuring acceptance on {len(prompts)} calibration prompts x {max_tokens} tokens ...")
        # A moderate tree: fast with a trained head, cheap with a useless one (the
        # continuations are the same greedy tokens whatever the tree).
        engine.set_tree(top_k=2, depth=min(3, levels - 1), total_tokens=min(8, max(widths)))
        conts, overhead = M.generate_continuations(engine, prompts, max_tokens, log)
        acc, _ = M.measure_acceptance(engine, prompts, levels=levels, conts=conts)
        ngram = M.measure_ngram_acceptance(conts, max_len=engine.ngram_tokens,
                                           max_candidates=engine.ngram_candidates)
        over = M._median(overhead) if overhead else 0.0
        costs = CostModel(monotone(verify_ms), draft_fit, overhead_ms=max(0.0, over),
                          decode_ms=verify_ms.get(1), ext_ms=ext_ms)
        info = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items() if k != "n_prompts"}
        info.update(prompts=len(prompts), samples=len(acc.samples),
                    verify_raw_ms={str(t): round(v, 3) for t, v in sorted(verify_ms.items())},
                    draft_raw_ms={f"{k},{d}": round(v, 3) for (k, d), v in draft_raw.items()})
        cal = Calibration(key=key, costs=costs, acceptance=acc, info=info, ngram=ngram)
        cal.pick()
        cal.seconds = time.perf_counter() - t_start
    finally:
        engine.spec = saved_spec
        engine.reset()
    if save:
        p = save_calibration(cal, directory)
        log(f"saved {p}")
    return cal


def parse_tree(text: str) -> Optional[TreeSpec]:
    """'auto' -> None; 'K,D,N' -> TreeSpec."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    parts = [p for p in str(text).replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3:
        raise ValueError(f"--tree must be 'auto' or 'TOP_K,DEPTH,TOTAL_TOKENS' (e.g. 4,4,16), got {text!r}")
    try:
        k, d, n = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--tree values must be integers, got {text!r}") from None
    return TreeSpec(k, d, n)


def resolve_tree(engine_or_model_and_head, tree_arg="auto", *, force: bool = False,
                 quick: bool = False, directory: Optional[Path] = None,
                 log: Optional[Callable] = None) -> TreeSpec:
    """The tree to use.

    ``engine_or_model_and_head``: an :class:`~eagle3_mlx.engine.Engine`, or a
    tuple ``(model, tokenizer, head)`` (a temporary engine is built), or
    ``(model, head)`` (costs are measured; acceptance falls back to a generic
    prior and is not cached).
    ``tree_arg``: ``"auto"``/None (calibrate, cached per machine),
    ``"K,D,N"``, a :class:`TreeSpec`, or a (top_k, depth, total_tokens) tuple.
    """
    if isinstance(tree_arg, TreeSpec):
        return tree_arg
    if isinstance(tree_arg, (tuple, list)):
        return TreeSpec(*[int(v) for v in tree_arg])
    spec = parse_tree(tree_arg)
    if spec is not None:
        return spec
    obj = engine_or_model_and_head
    if isinstance(obj, (tuple, list)):
        if len(obj) == 3:
            from ..engine import Engine

            engine = Engine(obj[0], obj[1], obj[2])
        elif len(obj) == 2:
            return _resolve_without_tokenizer(obj[0], obj[1], force=force, quick=quick,
                                              directory=directory, log=log)
        else:
            raise TypeError("pass an Engine, (model, tokenizer, head) or (model, head)")
    else:
        engine = obj
    return calibrate(engine, force=force, quick=quick, directory=directory, log=log).spec


def _resolve_without_tokenizer(model, head, *, force, quick, directory, log) -> TreeSpec:
    from ..target import TargetModel

    key = calibration_key(model, head)
    cal = None if force else load_calibration(key, directory)
    if cal is not None:
        return cal.spec
    verify_ms, fit, raw = M.measure_costs(TargetModel(model, head.config.aux_layer_ids), head,
                                          M.settings(quick))
    if log:
        log("no tokenizer: acceptance not measured, using a generic prior (not cached)")
    best, _ = optimise(CostModel(monotone(verify_ms), fit, decode_ms=verify_ms.get(1), ext_ms=ext_cost(raw)),
                       AcceptanceModel.prior())
    return best.spec


def apply_tree(engine, tree_arg="auto", **kw) -> TreeSpec:
    """resolve_tree + engine.set_tree; returns the spec set. When a calibration
    is cached (also with an explicit tree) its measured n-gram acceptance seeds
    the engine's ranking of n-gram against head candidates."""
    spec = resolve_tree(engine, tree_arg, **kw)
    engine.set_tree(top_k=spec.top_k, depth=spec.depth, total_tokens=spec.total_tokens)
    seed_hybrid(engine, directory=kw.get("directory"))
    return spec


def seed_hybrid(engine, calibration: Optional[Calibration] = None,
                directory: Optional[Path] = None) -> bool:
    """Give the engine what hybrid trees are ranked and sized with: the n-gram
    acceptance calibration measured, and this machine's verify cost per width
    with the chosen tree's ms per token (True if a calibration was there)."""
    from ..hybrid import NgramAcceptance, NodeCosts

    cal = calibration or load_calibration(calibration_key(engine.model, engine.head), directory)
    if cal is None:
        return False
    if cal.ngram:
        engine.ngram_acceptance = NgramAcceptance.from_measured(cal.ngram)
    choice = cal.choice or cal.pick()[0]
    engine.node_costs = NodeCosts(cal.costs.verify_ms, choice.step_ms / max(choice.tau, 1.0))
    return True


def is_auto_tree(tree_arg) -> bool:
    """True when a --tree value asks for the calibrated tree ('auto' or nothing)."""
    return tree_arg is None or str(tree_arg).strip().lower() == "auto"


def auto_tuner(engine, tree_arg, **kw):
    """An :class:`~eagle3_mlx.tuning.tuner.OnlineTuner` for an engine whose tree
    came from ``--tree auto`` (call after :func:`apply_tree`); None for an
    explicit tree (never changed) or when no calibration is cached."""
    if not is_auto_tree(tree_arg) or engine.head is None:
        return None
    return make_tuner(engine, **kw)


def finish_run_tuning(tuner, log=None):
    """End of a one-shot run: refresh the acceptance from the steps the tuner
    observed and save it for the next run. Logs one line only when the tree
    changed (or tuning failed); returns the new TreeSpec or None."""
    if tuner is None:
        return None
    log = log or (lambda m: None)
    try:
        spec = tuner.maybe_retune()
    except Exception as e:  # noqa: BLE001 - the answer is already out; never fail the run
        log(f"tree: online tuning skipped ({type(e).__name__}: {e})")
        return None
    if spec is not None:
        log(f"tree: retuned to {spec.top_k},{spec.depth},{spec.total_tokens} for the next run")
    return spec
