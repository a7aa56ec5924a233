"""Speculation over a target sharded with MLX's distributed backends.

Under ``mlx.launch`` (ring, JACCL, MPI, NCCL) every rank runs the same
command. Contract:

* :func:`launched` is False outside a launch (no ``MLX_RANK`` / MPI rank in
  the environment): then nothing here touches ``mx.distributed`` and every
  function below is a no-op, so single-process runs are unchanged.
* :func:`setup` (called by the CLI before a command runs) joins the group
  under a watchdog (a missing rank ends the launch with one line instead of
  hanging), refuses the commands that cannot run sharded yet, makes only rank 0
  print, and seeds MLX's RNG identically on every rank.
* :func:`shard` shards the loaded target in place with mlx-lm's own
  ``model.shard(group)`` (tensor parallel: each linear layer all-reduces inside
  its ``__call__``, which the layer-by-layer driver calls unchanged); families
  the driver cannot drive sharded are refused in one line naming the family.
* The draft sources (EAGLE-3 head, MTP, n-grams) stay replicated: every rank
  drafts the same tree from identical inputs (the all-reduced hidden states and
  logits are the same on every rank), so no tree is ever sent. Greedy
  acceptance is then identical everywhere; sampled acceptance too, because
  every rank's RNG starts from the same seed and draws the same sequence.
* :func:`calibration` runs ``--tree auto``'s measurement on every rank in
  lockstep (the measured verify forwards are collective) and every rank then
  uses rank 0's calibration, so all ranks verify the same tree.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional

# Set by mlx.launch for ring / JACCL / NCCL (MLX_RANK) and by mpirun.
_LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
# Families whose mlx-lm ``shard`` only splits attention/MLP linear layers (each
# all-reducing inside its own call), which TargetModel's layer loop honours.
TENSOR_PARALLEL = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gpt_oss")
# Commands that run sharded; the others refuse in one line (see setup).
COMMANDS = ("generate", "bench")
TIMEOUT_ENV = "EAGLE3_MLX_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0

_group = None
_real_stderr = sys.stderr


class DistributedError(RuntimeError):
    """A sharded run cannot go on; the message is one line."""


def launched() -> bool:
    return any(os.environ.get(k) for k in _LAUNCH_ENV)


def group():
    """The world group of a launch with more than one rank, else None."""
    return _group


def rank() -> int:
    return _group.rank() if _group is not None else 0


def is_main() -> bool:
    return rank() == 0


def timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def _fail(msg: str, code: int = 1):
    """One line on the real stderr, then exit at once (no interpreter
    shutdown: the backend's threads may still wait on a dead peer)."""
    try:
        _real_stderr.write(f"eagle3-mlx: error: rank {rank()}: {msg}\n")
        _real_stderr.flush()
    finally:
        os._exit(code)


_WATCH = """
import os, select, signal, sys
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], seconds)
if not ready:
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


class Watchdog:
    """Ends this process with one line when an armed phase (joining the group,
    the barrier after loading) outlives the timeout. A separate process: a rank
    blocked inside a collective holds the GIL, so no Python thread or signal
    handler of its own would ever run. Disarmed when its stdin closes (also
    when this process dies)."""

    def __init__(self, seconds: float, what: str):
        self.seconds, self.what = seconds, what
        self.proc = None

    def __enter__(self):
        import subprocess

        r = os.environ.get("MLX_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
        msg = (f"eagle3-mlx: error: rank {r}: {self.what} did not finish within {self.seconds:.0f} s "
               f"(another rank is missing, failed or unreachable; {TIMEOUT_ENV} sets the limit)")
        self.proc = subprocess.Popen([sys.executable, "-c", _WATCH, str(os.getpid()), str(self.seconds), msg],
                                     stdin=subprocess.PIPE, stderr=_real_stderr)
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.wait()
        return False


def init():
    """Join the launch's group (once); None outside a launch or with one rank."""
    global _group
    if _group is not None or not launched():
        return _group
    import mlx.core as mx

    with Watchdog(timeout_s(), "joining the distributed group"):
        g = mx.distributed.init()
        if g.size() > 1:
            # The ring backend connects lazily: one collective proves every rank is there.
            mx.eval(mx.distributed.all_sum(mx.array(1.0), group=g))
    _group = g if g.size() > 1 else None
    return _group


class _ErrorsOnly:
    """stderr of a rank other than 0: only lines that report an error pass
    (prefixed with the rank), so progress and statistics appear once."""

    def __init__(self, out, r: int):
        self.out, self.rank, self.buf = out, r, ""

    def write(self, s):
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            if "error" in line.lower():
                self.out.write(f"[rank {self.rank}] {line}\n")
                self.out.flush()
        return len(s)

    def flush(self):
        self.out.flush()

    def isatty(self):
        return False


def setup(command: str) -> Optional[str]:
    """Before a command runs under a launch: join the group, refuse what cannot
    run sharded (returns the one-line reason), quiet ranks other than 0 and
    seed every rank's RNG alike. None when the command may go on."""
    if not launched():
        return None
    if command not in COMMANDS:
        return (f"{command} does not run under mlx.launch yet (sharded runs: "
                f"{', '.join(COMMANDS)}); run it without mlx.launch")
    g = init()
    if g is None:
        return None
    if g.rank() != 0:
        sys.stdout = open(os.devnull, "w")
        sys.stderr = _ErrorsOnly(_real_stderr, g.rank())
    seed_alike()
    return None


def seed_alike(seed: Optional[int] = None) -> int:
    """Seed MLX's RNG with rank 0's seed on every rank (MLX seeds from the clock
    otherwise, and sampled acceptance must draw the same numbers everywhere)."""
    import mlx.core as mx

    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    seed = int(broadcast_ints([seed])[0])
    mx.random.seed(seed)
    return seed


def broadcast_ints(values):
    """Rank 0's integers on every rank (an all-sum where the others add zeros)."""
    import mlx.core as mx

    x = mx.array(list(values), dtype=mx.int32)
    if _group is None:
        return x.tolist()
    out = mx.distributed.all_sum(x if is_main() else mx.zeros_like(x), group=_group)
    return out.tolist()


def broadcast_json(obj):
    """Rank 0's JSON-able ``obj`` on every rank."""
    import json

    if _group is None:
        return obj
    data = json.dumps(obj).encode() if is_main() else b""
    n = broadcast_ints([len(data)])[0]
    return json.loads(bytes(broadcast_ints(list(data.ljust(n, b"\0")) if n else [0])[:n]).decode())


def barrier(what: str):
    """Every rank reaches this point, or the watchdog ends the run."""
    import mlx.core as mx

    if _group is None:
        return
    with Watchdog(timeout_s(), what):
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=_group))


@contextmanager
def lazy_load():
    """Under a launch, mlx-lm loads the target's weights lazily so that each
    rank materialises only its shard (as mlx-lm's ``sharded_load`` does).
    A stopgap until :func:`eagle3_mlx.api.load` takes ``lazy=``."""
    if _group is None:
        yield
        return
    import mlx_lm

    eager = mlx_lm.load
    mlx_lm.load = functools.partial(eager, lazy=True)
    try:
        yield
    finally:
        mlx_lm.load = eager


def shard_problem(model) -> Optional[str]:
    """Why ``model`` cannot be sharded here (one line), or None."""
    family = getattr(model, "model_type", None) or getattr(getattr(model, "args", None), "model_type", "?")
    if family not in TENSOR_PARALLEL:
        how = ("mlx-lm shards it differently (vocabulary head or recurrent layers) than the "
               "layer-by-layer verifier drives it" if hasattr(model, "shard")
               else "mlx-lm has no tensor-parallel shard for it" + (
                   " (only pipeline, which the layer-by-layer verifier does not run)"
                   if hasattr(getattr(model, "model", None), "pipeline") else ""))
        return (f"model family {family!r} cannot run sharded: {how}; "
                f"sharded families: {', '.join(TENSOR_PARALLEL)}")
    return None


def shard(engine, progress: Callable[[str], None] = lambda m: None):
    """Shard ``engine``'s target over the launch's group in place (mlx-lm's own
    ``model.shard``); the draft sources stay replicated. No-op outside a launch."""
    if _group is None:
        return engine
    import mlx.core as mx

    problem = shard_problem(engine.model)
    if problem:
        raise DistributedError(problem)
    progress(f"Sharding the target over {_group.size()} ranks (tensor parallel)…")
    engine.model.shard(_group)
    mx.eval(engine.model.parameters())
    engine.reset()
    barrier("waiting for every rank to load and shard the model")
    return engine


def calibration(engine, **calibrate_kw):
    """``--tree auto`` under a launch: every rank runs the same (collective)
    measurement, or every rank loads its cache, and all use rank 0's result."""
    from .tuning.cache import Calibration, calibration_key, load_calibration
    from .tuning.choose import calibrate

    if _group is None:
        return calibrate(engine, **calibrate_kw)
    key = calibration_key(engine.model, engine.head)   # the shard's weights: one key per rank
    cached = not calibrate_kw.get("force") and load_calibration(key, calibrate_kw.get("directory")) is not None
    # Measure only if every rank can (a rank measuring alone would block in its first forward).
    every = broadcast_sum(int(cached)) == _group.size()
    cal = calibrate(engine, **{**calibrate_kw, "force": not every})
    if cal.choice is None:
        cal.pick()
    return Calibration.from_dict(broadcast_json(cal.to_dict()))


def broadcast_sum(value: int) -> int:
    import mlx.core as mx

    return int(mx.distributed.all_sum(mx.array([value], dtype=mx.int32), group=_group).item())


def apply_tree(engine, tree_arg, log: Callable[[str], None], **calibrate_kw):
    """The CLI's ``--tree`` under a launch: "auto" from :func:`calibration`, an
    explicit shape as given; either way hybrid ranking is seeded from rank 0's
    calibration only (per-rank caches may differ, and so would the trees)."""
    from .tuning.choose import apply_tree as apply_single, is_auto_tree, resolve_tree, seed_hybrid

    if _group is None:
        return apply_single(engine, tree_arg, log=log, **calibrate_kw)
    if is_auto_tree(tree_arg):
        cal = calibration(engine, log=log, **calibrate_kw)
        spec = cal.spec
    else:
        spec, cal = resolve_tree(engine, tree_arg), rank0_cached(engine, calibrate_kw.get("directory"))
    engine.set_tree(top_k=spec.top_k, depth=spec.depth, total_tokens=spec.total_tokens)
    if cal is not None:
        seed_hybrid(engine, calibration=cal)
    return spec


def rank0_cached(engine, directory=None):
    """Rank 0's cached calibration (None if it has none) on every rank."""
    from .tuning.cache import Calibration, calibration_key, load_calibration

    cal = load_calibration(calibration_key(engine.model, engine.head), directory) if is_main() else None
    d = broadcast_json(None if cal is None else cal.to_dict())
    return None if d is None else Calibration.from_dict(d)


def run(command: str, main: Callable[[], int]) -> int:
    """Run a command's ``main``; under a launch a lost peer ends it with one line."""
    if _group is None:
        return main()
    t0 = time.perf_counter()
    try:
        return main()
    except RuntimeError as e:
        text = str(e)
        if any(s in text for s in ("[ring]", "[jaccl]", "[mpi]", "[nccl]", "peer")):
            _fail(f"{command}: lost the connection to another rank after "
                  f"{time.perf_counter() - t0:.0f} s ({text.strip()})")
        raise
