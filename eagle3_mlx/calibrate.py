"""Per-machine draft-tree calibration (``eagle3-mlx calibrate`` and ``--tree auto``).

The speed of one speculative step is

    tokens/s = E[tau](tree) / (t_draft(top_k, depth) + t_verify(T) + t_overhead)

(docs: ../shared/docs/mlx-notes.md section 10). ``t_verify(T)`` is one target
forward over the T tree tokens plus greedy verification and KV compaction;
``t_draft`` is the head's extension call plus ``depth`` expansion calls;
``t_overhead`` is the per-step bookkeeping outside both. They are measured on
this machine, with this model, quantization and mlx version.

Acceptance is measured once per (target, head): the target's own greedy
continuations of a few built-in prompts (not MT-bench questions) are replayed through the head
*teacher-forced* (each draft level fed the true previous tokens, exactly what
the head sees when its earlier levels were accepted). For every committed
position that gives the rank of the target's token in the head's distribution
at draft levels 1..L. A tree shape (top_k, depth, total_tokens) is simulated in
"rank space" the way ``tree.py`` builds it (level 1: top_k ranks; each level
expands the top_k most likely frontier nodes by top_k ranks; the best
``total_tokens - 1`` of the pool are kept), and its expected tau is the mean
accepted length of the measured rank sequences on that shape.

:func:`optimise` (pure, no MLX) combines the two and returns the best tree.
Results are cached per (target, head, quantization, device, mlx version) in
``$EAGLE3_MLX_HOME/calibration`` (default ``~/.cache/eagle3-mlx/calibration``).
:class:`OnlineTuner` refreshes the acceptance estimate from the engine's step
statistics during generation and re-picks the tree when that pays.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform as _platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .tree import TreeSpec

CACHE_FORMAT = 1
# Every width a small tree can have is measured, not interpolated: on a CPU the
# verify cost is a staircase (SIMD/BLAS blocking), so interpolating between 4
# and 8 nodes once picked an 8-node tree where a 6-node one paid better.
DEFAULT_WIDTHS = tuple(range(1, 17)) + (20, 24, 32, 48, 64)
DEFAULT_TOP_KS = (1, 2, 3, 4, 6, 8)
DEFAULT_DRAFT_DEPTHS = (1, 3, 6)
DEFAULT_LEVELS = 9          # acceptance measured for draft levels 1..9 (depth <= 8)
DEFAULT_MAX_RANK = 8
QUICK = dict(widths=tuple(range(1, 9)), top_ks=(1, 2, 4), draft_depths=(1, 3), levels=5,
             n_prompts=1, max_tokens=24, reps=3, context=32)


# ----------------------------------------------------------------------------------
# cost model (pure)
# ----------------------------------------------------------------------------------


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation, linear extrapolation past the ends."""
    if len(xs) == 1:
        return ys[0]
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = max(j for j in range(len(xs) - 1) if xs[j] <= x)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def monotone(points: Dict[int, float]) -> Dict[int, float]:
    """Least-squares non-decreasing fit (pool adjacent violators): verifying
    more tokens never costs less, so timing noise must not say otherwise."""
    xs = sorted(points)
    blocks = []  # [sum, count]
    for x in xs:
        blocks.append([points[x], 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out, i = {}, 0
    for s, n in blocks:
        for _ in range(n):
            out[xs[i]] = s / n
            i += 1
    return out


@dataclass
class CostModel:
    """Measured costs in milliseconds.

    verify_ms : {T: ms} one verification step over T tree tokens (root
                included); T = 1 is a plain one-token decoding step.
    draft_ms  : {top_k: (a, b)}: drafting a tree costs a + b * depth.
    overhead_ms: per-step bookkeeping outside draft and verify.
    decode_ms : one plain decoding step (the baseline); defaults to verify_ms[1].
    ext_ms    : extra draft cost per committed token beyond the first: each
                step first extends the head's cache with the tau tokens the
                last step committed (draft_ms is measured with one).
    """

    verify_ms: Dict[int, float]
    draft_ms: Dict[int, Tuple[float, float]]
    overhead_ms: float = 0.0
    decode_ms: Optional[float] = None
    ext_ms: float = 0.0

    def __post_init__(self):
        self.verify_ms = {int(k): float(v) for k, v in self.verify_ms.items()}
        self.draft_ms = {int(k): (float(v[0]), float(v[1])) for k, v in self.draft_ms.items()}
        if not self.verify_ms or not self.draft_ms:
            raise ValueError("cost model needs verify and draft measurements")

    @property
    def max_width(self) -> int:
        return max(self.verify_ms)

    @property
    def max_top_k(self) -> int:
        return max(self.draft_ms)

    def verify(self, T: int) -> float:
        xs = sorted(self.verify_ms)
        return max(0.0, _interp(xs, [self.verify_ms[x] for x in xs], T))

    def draft(self, top_k: int, depth: int) -> float:
        ks = sorted(self.draft_ms)
        a = _interp(ks, [self.draft_ms[k][0] for k in ks], top_k)
        b = _interp(ks, [self.draft_ms[k][1] for k in ks], top_k)
        return max(0.0, a + b * depth)

    def step(self, top_k: int, depth: int, T: int, tau: float = 1.0) -> float:
        return (self.draft(top_k, depth) + self.ext_ms * max(0.0, tau - 1.0) + self.verify(T)
                + self.overhead_ms)

    @property
    def baseline_ms(self) -> float:
        return self.decode_ms if self.decode_ms is not None else self.verify(1)

    def to_dict(self) -> dict:
        return {
            "verify_ms": {str(k): round(v, 4) for k, v in sorted(self.verify_ms.items())},
            "draft_ms": {str(k): [round(a, 4), round(b, 4)] for k, (a, b) in sorted(self.draft_ms.items())},
            "overhead_ms": round(self.overhead_ms, 4),
            "decode_ms": None if self.decode_ms is None else round(self.decode_ms, 4),
            "ext_ms": round(self.ext_ms, 4),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        return cls(d["verify_ms"], d["draft_ms"], d.get("overhead_ms", 0.0), d.get("decode_ms"),
                   d.get("ext_ms", 0.0))


# ----------------------------------------------------------------------------------
# acceptance model (pure)
# ----------------------------------------------------------------------------------


@dataclass
class AcceptanceModel:
    """Per-level, per-rank acceptance.

    q[j][r] : probability that the target's token at draft level j+1 is the
              head's rank-(r+1) candidate, given that levels 1..j were accepted.
    samples : measured rank sequences (1-based ranks, cut at the first level
              where the target's token is not among the top ``max_rank``);
              when there are enough, expected tau is their empirical mean.
    runs    : the same sequences kept per prompt, one per consecutive root
              position. With them expected tau is computed the way the engine
              advances: from root n it accepts a(n) tokens and the next root
              is n + a(n) + 1, so long accepted runs are counted once, not at
              every position inside them (the per-position mean overestimates
              tau when acceptance comes in streaks).
    rho     : online correction: tau' = 1 + rho * (tau - 1).
    """

    q: List[List[float]]
    samples: List[List[int]] = field(default_factory=list)
    runs: List[List[List[int]]] = field(default_factory=list)
    rho: float = 1.0
    source: str = "measured"
    min_samples: int = 50
    walk_offsets: int = 4

    def __post_init__(self):
        if self.runs and not self.samples:
            self.samples = [list(x) for run in self.runs for x in run]
        self._orders: dict = {}
        self._prefix: dict = {}
        self.q = [[min(1.0, max(0.0, float(p))) for p in row] for row in self.q]
        for j, row in enumerate(self.q):
            s = sum(row)
            if s > 1.0 + 1e-6:
                raise ValueError(f"acceptance probabilities at level {j + 1} sum to {s:.3f} > 1")

    @property
    def levels(self) -> int:
        return len(self.q)

    @property
    def max_rank(self) -> int:
        return max((len(r) for r in self.q), default=0)

    def _qp(self, level: int, rank: int) -> float:
        """q for 1-based level and rank (0 outside the measured range)."""
        if level > len(self.q) or rank > len(self.q[level - 1]):
            return 0.0
        return self.q[level - 1][rank - 1]

    @classmethod
    def from_rank_sequences(cls, seqs: Iterable[Sequence[int]], levels: int, max_rank: int,
                            prior: float = 0.5, **kw) -> "AcceptanceModel":
        """Estimate q from rank sequences (``prior``: pseudo-count, spread evenly
        over ranks and the miss outcome, so unseen cells are small but nonzero)."""
        seqs = [list(s)[:levels] for s in seqs]
        q = []
        for j in range(levels):
            reached = [s for s in seqs if len(s) >= j]   # levels 1..j accepted
            counts = [0] * max_rank
            for s in reached:
                if len(s) > j and 1 <= s[j] <= max_rank:
                    counts[s[j] - 1] += 1
            n = len(reached)
            if n == 0:
                q.append([0.0] * max_rank)
                continue
            eps = prior / (max_rank + 1)
            q.append([(c + eps) / (n + prior) for c in counts])
        return cls(q=q, samples=[list(s) for s in seqs], **kw)

    @classmethod
    def from_runs(cls, runs: Sequence[Sequence[Sequence[int]]], levels: int, max_rank: int,
                  **kw) -> "AcceptanceModel":
        """Like :meth:`from_rank_sequences`, keeping the per-prompt order."""
        runs = [[list(x)[:levels] for x in run] for run in runs]
        m = cls.from_rank_sequences([x for run in runs for x in run], levels, max_rank, **kw)
        m.runs = runs
        return m

    @property
    def per_level_rates(self) -> List[float]:
        """P(some top-max_rank candidate accepted at level j | levels < j accepted)."""
        return [sum(r) for r in self.q]

    def top1_rates(self) -> List[float]:
        return [r[0] if r else 0.0 for r in self.q]

    # -- shapes ----------------------------------------------------------------------

    def pool(self, top_k: int, depth: int) -> List[Tuple[float, int, Tuple[int, ...]]]:
        """The candidate pool of a (top_k, depth) tree in rank space, as
        (probability, level, rank path) in expansion order, mirroring tree.py."""
        level1 = [((r,), self._qp(1, r)) for r in range(1, top_k + 1)]
        pool = [(p, 1, path) for path, p in level1]
        front = level1
        for i in range(1, depth + 1):
            children = []
            for path, p in front:
                lvl = len(path) + 1
                for r in range(1, top_k + 1):
                    children.append((path + (r,), p * self._qp(lvl, r)))
            pool += [(p, len(path), path) for path, p in children]
            if i == depth:
                break
            order = sorted(range(len(children)), key=lambda c: (-children[c][1], c))
            front = [children[c] for c in order[:top_k]]
        return pool

    def _order(self, top_k: int, depth: int):
        """The (top_k, depth) pool and its nodes' keep order (best first)."""
        key = (top_k, depth)
        if key not in self._orders:
            pool = self.pool(top_k, depth)
            order = sorted(range(len(pool)), key=lambda i: (-pool[i][0], pool[i][1], i))
            self._orders[key] = (pool, order)
        return self._orders[key]

    def tau_curve(self, top_k: int, depth: int) -> List[float]:
        """Expected tau (bonus included, before ``rho``), per-position estimate,
        for every tree size: element ``n`` is the tree with n + 1 nodes kept
        (n = 0: root only)."""
        pool, order = self._order(top_k, depth)
        if len(self.samples) >= self.min_samples:
            index = {pool[i][2]: rank for rank, i in enumerate(order)}
            hist = [0] * len(pool)
            for s in self.samples:
                for j in range(1, len(s) + 1):
                    idx = index.get(tuple(s[:j]))
                    if idx is None:
                        break
                    hist[idx] += 1
            gains = [h / len(self.samples) for h in hist]
        else:
            gains = [pool[i][0] for i in order]
        curve, acc = [1.0], 1.0
        for g in gains:
            acc += g
            curve.append(acc)
        return curve

    @property
    def has_runs(self) -> bool:
        return sum(len(r) for r in self.runs) >= self.min_samples

    def walk_tau(self, spec: TreeSpec) -> float:
        """Expected tau (before ``rho``) stepping through the measured runs as
        the engine does, averaged over a few starting offsets."""
        import bisect

        k, d = spec.top_k, spec.depth
        if (k, d) not in self._prefix:
            pool, order = self._order(k, d)
            index = {pool[i][2]: r for r, i in enumerate(order)}
            pref = []
            for run in self.runs:
                rows = []
                for s in run:
                    idx = []
                    for j in range(1, len(s) + 1):
                        r = index.get(tuple(s[:j]))
                        if r is None:
                            break
                        idx.append(r)
                    rows.append(idx)
                pref.append(rows)
            self._prefix[(k, d)] = pref
        limit = spec.num_nodes - 1          # kept nodes have order index < limit
        toks = steps = 0
        for rows in self._prefix[(k, d)]:
            acc = [bisect.bisect_left(idx, limit) for idx in rows]
            for off in range(min(self.walk_offsets, len(acc))):
                i = off
                while i < len(acc):
                    toks += acc[i] + 1
                    steps += 1
                    i += acc[i] + 1
        return toks / steps if steps else 1.0

    def expected_tau(self, spec: TreeSpec, raw: bool = False) -> float:
        if self.has_runs:
            tau = self.walk_tau(spec)
        else:
            curve = self.tau_curve(spec.top_k, spec.depth)
            tau = curve[min(spec.num_nodes - 1, len(curve) - 1)]
        return tau if raw else 1.0 + self.rho * (tau - 1.0)

    def to_dict(self) -> dict:
        return {
            "q": [[round(p, 5) for p in row] for row in self.q],
            **({"runs": self.runs} if self.runs else {"samples": self.samples}),
            "rho": self.rho,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "AcceptanceModel":
        return cls(q=d["q"], samples=d.get("samples", []), runs=d.get("runs", []),
                   rho=d.get("rho", 1.0), source=d.get("source", "measured"))

    @classmethod
    def prior(cls, levels: int = DEFAULT_LEVELS, max_rank: int = DEFAULT_MAX_RANK) -> "AcceptanceModel":
        """A generic guess for a trained EAGLE-3 head (used only when acceptance
        cannot be measured): top-1 ~0.6 falling slowly with depth."""
        q = []
        for j in range(levels):
            top1 = 0.62 * (0.97 ** j)
            row = [top1] + [top1 * 0.25 * (0.6 ** r) for r in range(max_rank - 1)]
            q.append(row)
        return cls(q=q, source="prior")


# ----------------------------------------------------------------------------------
# optimiser (pure)
# ----------------------------------------------------------------------------------


@dataclass
class Candidate:
    spec: TreeSpec
    tau: float
    step_ms: float
    tps: float
    speedup: float

    def to_dict(self) -> dict:
        return {"top_k": self.spec.top_k, "depth": self.spec.depth, "total_tokens": self.spec.num_nodes,
                "tau": round(self.tau, 4), "step_ms": round(self.step_ms, 4),
                "tokens_per_s": round(self.tps, 4), "speedup": round(self.speedup, 4)}


def evaluate(spec: TreeSpec, costs: CostModel, acc: AcceptanceModel) -> Candidate:
    tau = acc.expected_tau(spec)
    ms = costs.step(spec.top_k, spec.depth, spec.num_nodes, tau)
    tps = 1000.0 * tau / ms if ms > 0 else float("inf")
    return Candidate(spec, tau, ms, tps, tps * costs.baseline_ms / 1000.0)


def optimise(costs: CostModel, acc: AcceptanceModel, *, top_ks: Optional[Iterable[int]] = None,
             depths: Optional[Iterable[int]] = None, max_nodes: Optional[int] = None,
             tolerance: float = 0.005, rescore: int = 64) -> Tuple[Candidate, List[Candidate]]:
    """Best tree for the cost curves and acceptance model, plus every candidate
    evaluated (best first; with per-prompt runs, the ``rescore`` best by the
    per-position estimate, re-scored). Only tree sizes inside the measured verify widths
    are considered. Among trees within ``tolerance`` of the best, the smallest
    (fewest nodes, then shallowest, then narrowest) wins."""
    max_nodes = min(max_nodes or costs.max_width, costs.max_width)
    if max_nodes < 2:
        raise ValueError("verify costs must cover a width of at least 2")
    top_ks = sorted(set(top_ks or range(1, costs.max_top_k + 1)))
    depths = sorted(set(depths or range(1, max(1, acc.levels - 1) + 1)))
    base = costs.baseline_ms
    cands = []
    for k in top_ks:
        for d in depths:
            curve = acc.tau_curve(k, d)
            draft = costs.draft(k, d)
            pool_nodes = len(curve)              # pool size + root
            for T in range(2, min(max_nodes, pool_nodes) + 1):
                tau = 1.0 + acc.rho * (curve[T - 1] - 1.0)
                ms = draft + costs.ext_ms * (tau - 1.0) + costs.verify(T) + costs.overhead_ms
                tps = 1000.0 * tau / ms
                cands.append(Candidate(TreeSpec(k, d, T), tau, ms, tps, tps * base / 1000.0))
    if not cands:
        raise ValueError("no candidate trees")
    if acc.has_runs:
        # The per-position curve ranks every shape quickly; the best ones are
        # re-scored by stepping through the measured runs like the engine.
        cands.sort(key=lambda c: -c.tps)
        seen, top = set(), []
        for c in cands:
            key = (c.spec.top_k, c.spec.depth, c.spec.num_nodes)
            if key not in seen:
                seen.add(key)
                top.append(c)
            if len(top) >= rescore:
                break
        cands = [evaluate(c.spec, costs, acc) for c in top]
    best_tps = max(c.tps for c in cands)
    near = [c for c in cands if c.tps >= best_tps * (1 - tolerance)]
    best = min(near, key=lambda c: (c.spec.num_nodes, c.spec.depth, c.spec.top_k))
    cands.sort(key=lambda c: -c.tps)
    return best, cands


# ----------------------------------------------------------------------------------
# identity of what was measured, and the cache
# ----------------------------------------------------------------------------------


def home_dir() -> Path:
    env = os.environ.get("EAGLE3_MLX_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eagle3-mlx"


def cache_dir() -> Path:
    return home_dir() / "calibration"


def openblas_loaded() -> bool:
    """True when an OpenBLAS library is mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return "libopenblas" in f.read()
    except OSError:
        return False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            import subprocess

            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except Exception:
            pass
    return _platform.processor() or _platform.machine()


def device_description() -> dict:
    """What the costs depend on: backend, device, CPU, BLAS."""
    import mlx.core as mx

    dev = mx.default_device()
    backend = "cpu"
    if dev.type == mx.gpu:
        backend = "metal" if mx.metal.is_available() else "cuda"
    try:
        info = mx.device_info()
    except Exception:
        info = {}
    d = {
        "backend": backend,
        "device_name": str(info.get("device_name", "")),
        "architecture": str(info.get("architecture", _platform.machine())),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "os": _platform.system(),
    }
    if backend == "cpu":
        d["blas"] = "openblas" if openblas_loaded() else "default"
    if "memory_size" in info:
        d["memory_gb"] = round(int(info["memory_size"]) / 2**30)
    return d


def _module_digest(module, config) -> str:
    import numpy as np
    import mlx.core as mx
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = tree_flatten(module.parameters())
    picks = params[:2] + params[len(params) // 2 : len(params) // 2 + 1] + params[-2:]
    for name, p in picks:
        flat = p.reshape(-1)[:2048]
        if mx.issubdtype(flat.dtype, mx.floating):
            flat = flat.astype(mx.float32)
        h.update(name.encode())
        h.update(str(p.shape).encode())
        h.update(np.array(flat).tobytes())
    return h.hexdigest()[:16]


def _config_dict(obj) -> dict:
    if obj is None:
        return {}
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return dict(vars(obj))


def quantization_of(model) -> str:
    """'float32', 'bfloat16', 'q4g64', 'q8g64-mxfp4', ... of a target or head."""
    import mlx.core as mx
    import mlx.nn as nn

    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            mode = getattr(m, "mode", "affine")
            s = f"q{m.bits}g{m.group_size}"
            return s if mode == "affine" else f"{s}-{mode}"
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return str(p.dtype).replace("mlx.core.", "")
    return "unknown"


def model_identity(model) -> dict:
    args = getattr(model, "args", None)
    cfg = _config_dict(args)
    return {
        "model_type": cfg.get("model_type", type(model).__name__),
        "hidden_size": cfg.get("hidden_size"),
        "num_layers": cfg.get("num_hidden_layers"),
        "vocab_size": cfg.get("vocab_size"),
        "digest": _module_digest(model, cfg),
    }


def head_identity(head) -> dict:
    cfg = head.config.to_dict() if hasattr(head.config, "to_dict") else _config_dict(head.config)
    return {"hidden_size": cfg.get("hidden_size"), "draft_vocab_size": cfg.get("draft_vocab_size"),
            "digest": _module_digest(head, cfg)}


def calibration_key(model, head, *, device: Optional[dict] = None, mlx_version: Optional[str] = None,
                    quantization: Optional[str] = None) -> dict:
    """Everything a calibration depends on. The overrides exist for tests."""
    import mlx.core as mx

    return {
        "format": CACHE_FORMAT,
        "model": model_identity(model),
        "head": head_identity(head),
        "quantization": quantization or f"{quantization_of(model)}/{quantization_of(head)}",
        "device": device or device_description(),
        "mlx": mlx_version or mx.__version__,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(key: dict, directory: Optional[Path] = None) -> Path:
    directory = Path(directory) if directory else cache_dir()
    m = key["model"]
    return directory / f"{m.get('model_type', 'model')}-{m.get('digest', '')[:8]}-{key_digest(key)}.json"


def load_calibration(key: dict, directory: Optional[Path] = None) -> Optional["Calibration"]:
    """The cached calibration for exactly this key, or None."""
    p = cache_path(key, directory)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("key") != key:
        return None
    try:
        return Calibration.from_dict(rec)
    except (KeyError, TypeError, ValueError):
        return None


def save_calibration(cal: "Calibration", directory: Optional[Path] = None) -> Path:
    p = cache_path(cal.key, directory)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cal.to_dict(), indent=1))
    os.replace(tmp, p)
    return p


def list_calibrations(directory: Optional[Path] = None) -> List[Tuple[Path, dict]]:
    directory = Path(directory) if directory else cache_dir()
    out = []
    for p in sorted(directory.glob("*.json")):
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, ValueError):
            continue
    return out


@dataclass
class Calibration:
    key: dict
    costs: CostModel
    acceptance: AcceptanceModel
    choice: Optional[Candidate] = None
    created: float = field(default_factory=time.time)
    seconds: float = 0.0
    online_steps: int = 0
    info: dict = field(default_factory=dict)
    # n-gram drafts' acceptance on the same continuations, {match_len: [accepted, rejected]}
    ngram: dict = field(default_factory=dict)

    def pick(self, **kw) -> Tuple[Candidate, List[Candidate]]:
        best, cands = optimise(self.costs, self.acceptance, **kw)
        self.choice = best
        return best, cands

    @property
    def spec(self) -> TreeSpec:
        if self.choice is None:
            self.pick()
        return self.choice.spec

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "costs": self.costs.to_dict(),
            "acceptance": self.acceptance.to_dict(),
            "choice": None if self.choice is None else self.choice.to_dict(),
            "created": self.created,
            "seconds": round(self.seconds, 2),
            "online_steps": self.online_steps,
            "info": self.info,
            "ngram": {str(n): c for n, c in self.ngram.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        cal = cls(key=d["key"], costs=CostModel.from_dict(d["costs"]),
                  acceptance=AcceptanceModel.from_dict(d["acceptance"]), created=d.get("created", 0.0),
                  seconds=d.get("seconds", 0.0), online_steps=d.get("online_steps", 0),
                  info=d.get("info", {}),
                  ngram={int(n): c for n, c in d.get("ngram", {}).items()})
        c = d.get("choice")
        if c:
            cal.choice = evaluate(TreeSpec(c["top_k"], c["depth"], c["total_tokens"]), cal.costs,
                                  cal.acceptance)
        return cal


# ----------------------------------------------------------------------------------
# measurements (MLX)
# ----------------------------------------------------------------------------------


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _synthetic_tree(T: int, branching: int = 4):
    """A fixed heap-shaped tree of T nodes (root 0) with random tokens."""
    import mlx.core as mx

    from .tree import DraftTree, _ancestor_matrix

    parents = [0] + [(i - 1) // branching for i in range(1, T)]
    depth = [0] * T
    for i in range(1, T):
        depth[i] = depth[parents[i]] + 1
    par = mx.array(parents, dtype=mx.int32)
    anc = _ancestor_matrix(par, T, max(depth) + 1)
    return par, anc, mx.array(depth, dtype=mx.int32), max(depth)


def measure_verify_costs(target, widths: Sequence[int] = DEFAULT_WIDTHS, *, context: int = 256,
                         reps: int = 3, seed: int = 0) -> Tuple[Dict[int, float], "object"]:
    """Median ms of one verification step over T tree tokens after a
    ``context``-token prefix: target forward under the tree mask, greedy
    verification (one host transfer), KV compaction. T = 1 is a plain decode
    step. Returns ({T: ms}, features of the prefix)."""
    import mlx.core as mx

    from .target import compact_cache
    from .tree import DraftTree
    from .verify import greedy_verify

    V = target.vocab_size
    mx.random.seed(seed)
    cache = target.make_cache()
    prefix = mx.random.randint(0, V, (1, context)).astype(mx.int32)
    _, feats = target.forward(prefix, cache, logits_rows=slice(-1, None))
    mx.eval(feats, [c.state for c in cache])
    steps = {}
    for T in sorted(set(int(w) for w in widths)):
        toks = mx.random.randint(0, V, (T,)).astype(mx.int32)
        if T == 1:
            def step(toks=toks):
                logits, f = target.forward(toks[None], cache)
                tok = mx.argmax(logits[0, -1]).item()
                mx.eval(f, [c.state for c in cache])
                return tok
        else:
            par, anc, dep, _ = _synthetic_tree(T)
            tree = DraftTree(toks, par, anc, dep, T, False)
            positions = (context + dep).astype(mx.int32)
            mx.eval(anc, positions)

            def step(toks=toks, tree=tree, anc=anc, positions=positions, T=T):
                logits, fts = target.forward(toks[None], cache, tree_mask=anc, positions=positions)
                path_mask, bonus = greedy_verify(tree, logits[0])
                pm = path_mask.tolist()
                bonus.item()
                path = [i for i in range(T) if pm[i]]
                if len(path) < 2:      # random tokens: emulate one accepted draft
                    path = [0, 1]
                compact_cache(cache, context, path)
                f = fts[:, mx.array(path, dtype=mx.int32)]
                mx.eval(f, [c.state for c in cache])
        steps[T] = step
    times = {T: [] for T in steps}
    # One warm-up round, then interleaved rounds so drift hits every width alike.
    for r in range(reps + 1):
        for T, step in steps.items():
            t0 = time.perf_counter()
            step()
            dt = (time.perf_counter() - t0) * 1000
            for c in cache:
                c.trim(c.offset - context)
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

    from .tree import draft_tree

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


def ext_cost(raw: dict) -> float:
    """ms per extra extension token, from the ("ext", n) entries of the raw draft timings."""
    pts = sorted((n, ms) for key, ms in raw.items() if isinstance(key, tuple) and key[0] == "ext"
                 for n in [key[1]])
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return 0.0
    return max(0.0, (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))


def _nnls(rows: List[List[float]], ys: List[float]) -> List[float]:
    """Least squares with non-negative coefficients (active-set by elimination;
    fine for three unknowns)."""
    import numpy as np

    A, y = np.array(rows, dtype=float), np.array(ys, dtype=float)
    active = list(range(A.shape[1]))
    while True:
        coef = np.zeros(A.shape[1])
        if active:
            sol, *_ = np.linalg.lstsq(A[:, active], y, rcond=None)
            coef[active] = sol
        neg = [i for i in active if coef[i] < 0]
        if not neg:
            return [float(c) for c in coef]
        active.remove(min(neg, key=lambda i: coef[i]))


def fit_draft_costs(raw: Dict[Tuple[int, int], float]) -> Dict[int, Tuple[float, float]]:
    """One model for every (top_k, depth) measurement: ms = a + depth * (b + c * top_k)
    (each level runs the head on top_k rows and ranks top_k x vocab), fitted
    jointly so a noisy point cannot reorder the top_k values. Returned in the
    cost model's per-top_k form {top_k: (a, b + c * top_k)}."""
    raw = {kd: ms for kd, ms in raw.items() if isinstance(kd[0], int)}
    if len({d for _, d in raw}) < 2:
        return {k: (ms, 0.0) for (k, _), ms in raw.items()}
    keys = sorted(raw)
    a, b, c = _nnls([[1.0, d, d * k] for k, d in keys], [raw[kd] for kd in keys])
    return {k: (a, b + c * k) for k in sorted({k for k, _ in keys})}


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
    out, overhead = [], []
    for i, text in enumerate(prompts):
        ids = _encode_chat(engine, text)
        engine.reset()
        toks, last_t, last_r = [], None, None
        for r in engine.stream_generate(ids, max_tokens=max_tokens, temp=0.0, draft_source="eagle"):
            now = time.perf_counter()
            if r.token >= 0:
                toks.append(r.token)
            if r.new_step:
                if last_t is not None and r.step_index >= 2:
                    overhead.append((now - last_t) * 1000 - r.draft_ms - r.verify_ms)
                last_t = now
            last_r = r
        out.append((ids, toks))
        if log and last_r is not None:
            log(f"  prompt {i + 1}/{len(prompts)}: {len(toks)} tokens, tau {last_r.tokens_per_step:.2f}")
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
    {match_len: [accepted tokens, rejected candidates]} (NgramAcceptance's counts)."""
    from .hybrid import NgramAcceptance
    from .ngram import ContextMatcher

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


def calibrate(engine, *, force: bool = False, quick: bool = False, directory: Optional[Path] = None,
              widths: Optional[Sequence[int]] = None, top_ks: Optional[Sequence[int]] = None,
              draft_depths: Optional[Sequence[int]] = None, levels: Optional[int] = None,
              n_prompts: Optional[int] = None, max_tokens: Optional[int] = None,
              reps: Optional[int] = None, context: Optional[int] = None, save: bool = True,
              log: Optional[Callable] = None) -> Calibration:
    """Measure (or load from the cache) this machine's costs and this head's
    acceptance, and pick the tree. The engine's tree and caches are restored."""
    from .prompts import calibration_prompts

    log = log or (lambda *a: None)
    key = calibration_key(engine.model, engine.head)
    if not force:
        cal = load_calibration(key, directory)
        if cal is not None:
            if cal.choice is None:
                cal.pick()
            return cal
    q = QUICK if quick else {}
    widths = widths or q.get("widths", DEFAULT_WIDTHS)
    top_ks = top_ks or q.get("top_ks", DEFAULT_TOP_KS)
    draft_depths = draft_depths or q.get("draft_depths", DEFAULT_DRAFT_DEPTHS)
    levels = levels or q.get("levels", DEFAULT_LEVELS)
    n_prompts = n_prompts or q.get("n_prompts", 4)
    max_tokens = max_tokens or q.get("max_tokens", 64)
    reps = reps or q.get("reps", 3)
    context = context or q.get("context", 256)

    t_start = time.perf_counter()
    saved_spec = engine.spec
    try:
        log(f"calibrating on {key['device'].get('backend')} ({key['device'].get('device_name') or key['device'].get('cpu')}), "
            f"mlx {key['mlx']}, {key['quantization']}")
        log(f"measuring verify cost for widths {list(widths)} (context {context}) ...")
        verify_ms, feats = measure_verify_costs(engine.target, widths, context=context, reps=reps)
        log("  " + "  ".join(f"T={t}:{ms:.1f}" for t, ms in sorted(verify_ms.items())) + " ms")
        log(f"measuring draft cost for top_k {list(top_ks)} x depth {list(draft_depths)} ...")
        draft_fit, draft_raw = measure_draft_costs(engine.head, engine.target, feats, top_ks=top_ks,
                                                   depths=draft_depths, reps=reps)
        ext_ms = ext_cost(draft_raw)
        log("  " + "  ".join(f"k={k}:{a:.1f}+{b:.1f}/level" for k, (a, b) in sorted(draft_fit.items()))
            + f" ms; +{ext_ms:.2f} ms per extra committed token")
        prompts = calibration_prompts(n_prompts)
        log(f"measuring acceptance on {len(prompts)} calibration prompts x {max_tokens} tokens ...")
        # A moderate tree: fast with a trained head, cheap with a useless one (the
        # continuations are the same greedy tokens whatever the tree).
        engine.set_tree(top_k=2, depth=min(3, levels - 1), total_tokens=min(8, max(widths)))
        conts, overhead = generate_continuations(engine, prompts, max_tokens, log)
        acc, _ = measure_acceptance(engine, prompts, levels=levels, conts=conts)
        ngram = measure_ngram_acceptance(conts, max_len=engine.ngram_tokens,
                                         max_candidates=engine.ngram_candidates)
        over = _median(overhead) if overhead else 0.0
        costs = CostModel(monotone(verify_ms), draft_fit, overhead_ms=max(0.0, over),
                          decode_ms=verify_ms.get(1), ext_ms=ext_ms)
        cal = Calibration(key=key, costs=costs, acceptance=acc,
                          info={"widths": list(widths), "top_ks": list(top_ks),
                                "draft_depths": list(draft_depths), "levels": levels,
                                "prompts": len(prompts), "max_tokens": max_tokens, "context": context,
                                "reps": reps, "samples": len(acc.samples),
                                "verify_raw_ms": {str(t): round(v, 3) for t, v in sorted(verify_ms.items())},
                                "draft_raw_ms": {f"{k},{d}": round(v, 3) for (k, d), v in draft_raw.items()}},
                          ngram=ngram)
        cal.pick()
        cal.seconds = time.perf_counter() - t_start
    finally:
        engine.spec = saved_spec
        engine.reset()
    if save:
        p = save_calibration(cal, directory)
        log(f"saved {p}")
    return cal


# ----------------------------------------------------------------------------------
# the API helper used by generate / chat / bench
# ----------------------------------------------------------------------------------


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
            from .engine import Engine

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
    from .target import TargetModel

    key = calibration_key(model, head)
    cal = None if force else load_calibration(key, directory)
    if cal is not None:
        return cal.spec
    q = QUICK if quick else {}
    target = TargetModel(model, head.config.aux_layer_ids)
    verify_ms, feats = measure_verify_costs(target, q.get("widths", DEFAULT_WIDTHS),
                                            context=q.get("context", 256), reps=q.get("reps", 3))
    fit, raw = measure_draft_costs(head, target, feats, top_ks=q.get("top_ks", DEFAULT_TOP_KS),
                                 depths=q.get("draft_depths", DEFAULT_DRAFT_DEPTHS), reps=q.get("reps", 3))
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
    from .hybrid import NgramAcceptance, NodeCosts

    cal = calibration or load_calibration(calibration_key(engine.model, engine.head), directory)
    if cal is None:
        return False
    if cal.ngram:
        engine.ngram_acceptance = NgramAcceptance.from_measured(cal.ngram)
    choice = cal.choice or cal.pick()[0]
    engine.node_costs = NodeCosts(cal.costs.verify_ms, choice.step_ms / max(choice.tau, 1.0))
    return True


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
        if self._head_run and src in ("eagle", "both"):
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


# ----------------------------------------------------------------------------------
# report and CLI
# ----------------------------------------------------------------------------------


def format_report(cal: Calibration, *, top: int = 8) -> str:
    c, a = cal.costs, cal.acceptance
    best, cands = optimise(c, a)
    dev = cal.key.get("device", {})
    m = cal.key.get("model", {})
    lines = [
        f"machine : {dev.get('backend')} | {dev.get('device_name') or dev.get('cpu')} | "
        f"{dev.get('cpu_count')} CPUs | BLAS {dev.get('blas', '-')} | mlx {cal.key.get('mlx')}",
        f"model   : {m.get('model_type')} hidden {m.get('hidden_size')} x {m.get('num_layers')} layers, "
        f"vocab {m.get('vocab_size')} ({cal.key.get('quantization')}), digest {m.get('digest')}",
        f"head    : hidden {cal.key.get('head', {}).get('hidden_size')}, draft vocab "
        f"{cal.key.get('head', {}).get('draft_vocab_size')}, digest {cal.key.get('head', {}).get('digest')}",
        "",
        "verify cost (target forward over T tree tokens + verification + KV compaction):",
        "  T   " + " ".join(f"{t:>7d}" for t in sorted(c.verify_ms)),
        "  ms  " + " ".join(f"{c.verify_ms[t]:7.1f}" for t in sorted(c.verify_ms)),
        "  x1  " + " ".join(f"{c.verify_ms[t] / c.verify(1):7.2f}" for t in sorted(c.verify_ms)),
        "draft cost (ms = a + b * depth):  " + ", ".join(
            f"top_k {k}: {ab[0]:.2f} + {ab[1]:.2f}d" for k, ab in sorted(c.draft_ms.items())),
        f"draft extension: +{c.ext_ms:.2f} ms per extra committed token;  "
        f"per-step bookkeeping: {c.overhead_ms:.2f} ms",
        f"plain decode step: {c.baseline_ms:.2f} ms "
        f"({1000 / c.baseline_ms:.1f} tok/s)",
        "",
        f"acceptance ({a.source}, {len(a.samples)} positions; P(level j accepted | levels < j accepted)):",
        "  level      " + " ".join(f"{j + 1:>6d}" for j in range(a.levels)),
        "  top-1      " + " ".join(f"{p:6.3f}" for p in a.top1_rates()),
        f"  top-{a.max_rank:<2d}     " + " ".join(f"{p:6.3f}" for p in a.per_level_rates),
    ]
    if a.rho != 1.0:
        lines.append(f"  online correction rho = {a.rho:.3f} after {cal.online_steps} steps")
    lines += ["", "best trees (expected):", "  top_k depth  nodes    tau  step ms  tok/s  speedup"]
    for cd in cands[:top]:
        s = cd.spec
        mark = "  <- chosen" if (s.top_k, s.depth, s.num_nodes) == (best.spec.top_k, best.spec.depth,
                                                                    best.spec.num_nodes) else ""
        lines.append(f"  {s.top_k:5d} {s.depth:5d} {s.num_nodes:6d} {cd.tau:6.2f} {cd.step_ms:8.1f} "
                     f"{cd.tps:6.1f} {cd.speedup:7.2f}x{mark}")
    if best not in cands[:top]:
        s = best.spec
        lines.append(f"  {s.top_k:5d} {s.depth:5d} {s.num_nodes:6d} {best.tau:6.2f} {best.step_ms:8.1f} "
                     f"{best.tps:6.1f} {best.speedup:7.2f}x  <- chosen (smallest within 0.5%)")
    lines.append("")
    lines.append(f"chosen tree: --tree {best.spec.top_k},{best.spec.depth},{best.spec.num_nodes}  "
                 f"(expected tau {best.tau:.2f}, {best.tps:.1f} tok/s, {best.speedup:.2f}x plain)")
    if best.speedup < 1.0:
        lines.append("note: speculation is not expected to pay off with this head on this machine "
                     "(acceptance too low for the measured costs).")
    if a.per_level_rates and a.per_level_rates[0] < 0.1:
        lines.append("note: the head accepts almost nothing at level 1 — it looks untrained or made "
                     "for another target.")
    return "\n".join(lines)


def default_model_paths(model: Optional[str], draft: Optional[str]) -> Tuple[str, str]:
    """--model/--draft, filled in from the default model when left out."""
    if model and draft:
        return model, draft
    try:
        from . import default_model
    except ImportError:
        raise ValueError("pass --model and --draft (the default model is not available in this "
                         "install)") from None
    if not draft:
        head = default_model.default_head_path()
        if head is None:
            raise ValueError(f"{default_model.NO_HEAD_MESSAGE}; pass --draft HEAD_DIR")
        draft = str(head)
    if not model:
        try:
            model = str(default_model.ensure_default_model())
        except default_model.DefaultModelError as e:
            raise ValueError(str(e)) from None
    return model, draft


def default_dtype() -> Optional[str]:
    try:
        from .platform import default_dtype as dd
    except ImportError:
        return None
    try:
        return dd()
    except Exception:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="eagle3-mlx calibrate",
        description="Measure this machine's verify and draft costs and the head's acceptance, and "
                    "pick the draft tree (top_k, depth, total_tokens) with the best expected tok/s. "
                    f"Results are cached in {cache_dir()}.")
    p.add_argument("--model", default=None, help="MLX target (default: the default model)")
    p.add_argument("--draft", default=None, help="MLX EAGLE-3 head (default: the default head)")
    p.add_argument("--dtype", default=None, help="cast the target, e.g. float32 (default: platform default)")
    p.add_argument("--show", action="store_true",
                   help="show cached calibrations (this model's with --model, else all) without measuring")
    p.add_argument("--force", action="store_true", help="measure again even if cached")
    p.add_argument("--quick", action="store_true", help="fewer widths, prompts and repetitions")
    p.add_argument("--prompts", type=int, default=None, help="built-in calibration prompts for acceptance (default 4, at most 8; not MT-bench)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per acceptance prompt (default 64)")
    p.add_argument("--json", default=None, help="also write the calibration record to this file")
    args = p.parse_args(argv)

    if args.show and not args.model:
        entries = list_calibrations()
        if not entries:
            print(f"no calibrations cached in {cache_dir()}")
            return 0
        for path, rec in entries:
            print(f"== {path}")
            try:
                print(format_report(Calibration.from_dict(rec)))
            except (KeyError, TypeError, ValueError) as e:
                print(f"  unreadable ({e})")
            print()
        return 0

    from . import api

    try:
        model, draft = default_model_paths(args.model, args.draft)
        dtype = args.dtype or default_dtype()
        engine = api.load(model, draft, model_dtype=dtype)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"eagle3-mlx calibrate: error: {e}", file=sys.stderr)
        return 1
    if args.show:
        cal = load_calibration(calibration_key(engine.model, engine.head))
        if cal is None:
            print("no calibration cached for this model, head and machine; run `eagle3-mlx calibrate`")
            return 1
    else:
        cal = calibrate(engine, force=args.force, quick=args.quick, n_prompts=args.prompts,
                        max_tokens=args.max_tokens, log=lambda s: print(s, flush=True))
    print(format_report(cal))
    if args.json:
        Path(args.json).write_text(json.dumps(cal.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
