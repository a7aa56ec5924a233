"""Keeping the tree right while it runs: the online tuner.

Contract: :class:`OnlineTuner` observes every response of a generation, counts
the head's share of each speculative step, and between generations
(:meth:`OnlineTuner.maybe_retune`) updates the acceptance correction ``rho``,
re-optimises, switches the engine's tree when the new one is expected to be
``min_gain`` faster, and saves the calibration so the next start uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

from ..hybrid import from_model
from ..treespec import TreeSpec
from .cache import Calibration, calibration_key, load_calibration, save_calibration
from .optimise import evaluate, optimise


class OnlineTuner:
    """Refreshes the acceptance estimate from live step statistics.

    Feed it every response (``observe``); between generations call
    ``maybe_retune()``: once ``every`` new speculative steps were seen it
    compares the observed tau of the current tree with the prediction, updates
    ``rho`` (tau' = 1 + rho (tau - 1), a step-weighted running estimate),
    re-optimises, switches the engine's tree if the new one is expected to be
    ``min_gain`` faster, and stores rho in the cache so the next start uses it.
    """

    def __init__(self, engine, calibration: Calibration, *, every: int = 64, min_gain: float = 0.03,
                 directory: Optional[Path] = None, save: bool = True):
        self.engine, self.cal = engine, calibration
        self.every, self.min_gain, self.directory, self.save = every, min_gain, directory, save
        self._steps = 0
        self._tokens = 0
        self._spec_seen = None
        self._head_run = False

    def observe(self, r):
        """Count the head's share of each step: the bonus token plus the leading
        accepted tokens the head proposed. In a hybrid tree a step that runs on
        along an n-gram continuation would otherwise credit the head with
        acceptance it did not earn, and the tree would be re-picked from it."""
        if not getattr(r, "speculative", True) or r.step_index < 1:
            return
        src = getattr(r, "source", None)   # None: a step summary without per-token sources
        if r.new_step:
            spec = self.engine.spec
            if self._spec_seen is not None and (spec.top_k, spec.depth, spec.num_nodes) != self._spec_seen:
                self._steps = self._tokens = 0
            self._spec_seen = (spec.top_k, spec.depth, spec.num_nodes)
            self._steps += 1
            if src is None:
                self._tokens += r.step_tokens
                self._head_run = False
                return
            self._tokens += 1          # the token the target commits itself
            self._head_run = True
        if src is None:
            return
        if self._head_run and from_model(src):
            self._tokens += 1
        else:
            self._head_run = False

    def observed(self) -> Tuple[int, int]:
        """(speculative steps, tokens credited to the head) since the last retune."""
        return self._steps, self._tokens

    def maybe_retune(self) -> Optional[TreeSpec]:
        if self._steps < self.every:
            return None
        acc = self.cal.acceptance
        spec = self.engine.spec
        tau_obs = self._tokens / self._steps
        tau_pred = acc.expected_tau(spec, raw=True)
        if tau_pred > 1.0 + 1e-6:
            rho_now = min(3.0, max(0.02, (tau_obs - 1.0) / (tau_pred - 1.0)))
            n_old = max(self.cal.online_steps, 1)
            w = self._steps / (self._steps + min(n_old, 4 * self._steps))
            acc.rho = (1 - w) * acc.rho + w * rho_now
        self.cal.online_steps += self._steps
        self._steps = self._tokens = 0
        current = evaluate(spec, self.cal.costs, acc)
        best, _ = optimise(self.cal.costs, acc)
        switch = best.tps > current.tps * (1 + self.min_gain)
        if switch:
            self.engine.set_tree(top_k=best.spec.top_k, depth=best.spec.depth,
                                 total_tokens=best.spec.total_tokens)
            self.cal.choice = best      # saved below: the next start uses the new tree
        if self.save:
            try:
                save_calibration(self.cal, self.directory)
            except OSError:
                pass
        return best.spec if switch else None


def make_tuner(engine, *, directory: Optional[Path] = None, **kw) -> Optional[OnlineTuner]:
    """An :class:`OnlineTuner` for the engine's cached calibration (after
    ``resolve_tree(engine, "auto")``), or None when none is cached. Never measures."""
    cal = load_calibration(calibration_key(engine.model, engine.head), directory)
    return None if cal is None else OnlineTuner(engine, cal, directory=directory, **kw)
