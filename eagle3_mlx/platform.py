"""This machine: what it is (identity that measured costs depend on) and its speed defaults.

Identity: :func:`device_description` (backend, device, CPU, BLAS: the key a
calibration is cached under) and :func:`machine_info` (the same plus versions,
for benchmark and training reports); the only place that reads them.

Speed defaults: OpenBLAS on Linux CPU, and the default float type.

The ``mlx[cpu]`` Linux wheels link the reference BLAS (``mlx_cpu.libs/libblas``),
so float32 matmuls run about 30x slower than with OpenBLAS on the same CPU, and
verifying 16 tokens costs ~16x one token instead of ~2x.  Preloading a system
OpenBLAS (Debian/Ubuntu package ``libopenblas0-pthread``) makes the dynamic
linker resolve MLX's ``cblas_*`` calls to it.  ``LD_PRELOAD`` only acts when a
process starts, so :func:`maybe_reexec_with_openblas` re-executes the current
command line once with it set.

Opt out with ``EAGLE3_MLX_NO_OPENBLAS=1``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

__all__ = [
    "OPENBLAS_PATHS",
    "OPT_OUT_ENV",
    "GUARD_ENV",
    "OpenBLASDecision",
    "decide_openblas",
    "maybe_reexec_with_openblas",
    "mlx_backend",
    "default_dtype",
    "openblas_loaded",
    "cpu_model",
    "device_description",
    "machine_info",
    "describe_machine",
    "cache_home",
]

OPENBLAS_PATHS = {
    "x86_64": "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "amd64": "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "aarch64": "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "arm64": "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
}
OPT_OUT_ENV = "EAGLE3_MLX_NO_OPENBLAS"
GUARD_ENV = "EAGLE3_MLX_OPENBLAS_REEXEC"  # set in the re-executed child: never loop

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class OpenBLASDecision:
    """What :func:`maybe_reexec_with_openblas` should do, and why.

    ``action``: ``"reexec"`` (re-execute with ``env``), ``"active"`` (already
    preloaded), ``"missing"`` (Linux CPU but no system OpenBLAS: print a hint) or
    ``"skip"`` (not applicable / opted out / guard set).
    """

    action: str
    reason: str
    library: Optional[str] = None
    env: Optional[dict] = None
    argv: Optional[list] = None


def _preloaded(env: Mapping[str, str], library: str, loaded_maps: str = "") -> bool:
    entries = env.get("LD_PRELOAD", "").replace(":", " ").split()
    names = {os.path.basename(library), os.path.realpath(library), library}
    if any(e in names or os.path.realpath(e) in names for e in entries):
        return True
    # /proc/self/maps lists the resolved file (libopenblasp-r0.3.x.so in the same
    # directory); numpy's bundled, symbol-suffixed OpenBLAS lives elsewhere and
    # does not serve MLX, so it must not count.
    if loaded_maps:
        real_dir = os.path.dirname(os.path.realpath(library))
        lib_dir = os.path.dirname(library)
        for line in loaded_maps.splitlines():
            path = line.split()[-1] if line.split() else ""
            if os.path.dirname(path) in (real_dir, lib_dir) and "openblas" in os.path.basename(path):
                return True
    return False


def decide_openblas(
    *,
    system: str,
    machine: str,
    backend: str,
    env: Mapping[str, str],
    argv: Sequence[str],
    exists=None,
    loaded_maps: str = "",
) -> OpenBLASDecision:
    """Pure decision logic (no side effects), unit-testable.

    ``system``/``machine``: ``platform.system()``/``platform.machine()``;
    ``backend``: ``"cpu"``, ``"metal"`` or ``"cuda"``; ``argv``: the original
    interpreter command line (``sys.orig_argv``); ``loaded_maps``: the text of
    ``/proc/self/maps`` (empty if unknown).
    """
    if env.get(OPT_OUT_ENV, "").strip().lower() in _TRUE:
        return OpenBLASDecision("skip", f"disabled by {OPT_OUT_ENV}")
    if system != "Linux":
        return OpenBLASDecision("skip", f"not Linux ({system})")
    if backend != "cpu":
        return OpenBLASDecision("skip", f"MLX backend is {backend}, not the CPU")
    library = OPENBLAS_PATHS.get(machine.lower())
    if library is None:
        return OpenBLASDecision("skip", f"no known OpenBLAS location for {machine}")
    if _preloaded(env, library, loaded_maps):
        return OpenBLASDecision("active", "OpenBLAS already preloaded", library)
    if env.get(GUARD_ENV):
        return OpenBLASDecision(
            "skip", f"already re-executed once ({GUARD_ENV} set) but OpenBLAS is not loaded", library
        )
    if env.get("PYTEST_CURRENT_TEST"):
        # a test calling a CLI entry point in-process must not restart pytest
        return OpenBLASDecision("skip", "running inside pytest: not re-executing", library)
    if not (exists or os.path.exists)(library):
        return OpenBLASDecision("missing", f"{library} not found", library)
    if not argv or len(argv) < 2:
        return OpenBLASDecision("skip", "interactive interpreter: cannot re-execute", library)
    new_env = dict(env)
    prev = new_env.get("LD_PRELOAD", "").strip()
    new_env["LD_PRELOAD"] = f"{library}:{prev}" if prev else library
    new_env[GUARD_ENV] = "1"
    return OpenBLASDecision("reexec", "Linux CPU backend with the reference BLAS", library,
                            env=new_env, argv=list(argv))


def mlx_backend() -> str:
    """``"metal"``, ``"cuda"`` or ``"cpu"``: where MLX runs by default."""
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.gpu:
        return "cpu"
    try:
        if mx.metal.is_available():
            return "metal"
    except Exception:
        pass
    return "cuda"


def maybe_reexec_with_openblas(*, quiet: bool = False) -> OpenBLASDecision:
    """Re-execute this process with the system OpenBLAS preloaded when that helps.

    Call it first thing in a console entry point.  On Linux with the MLX CPU
    backend, when ``/usr/lib/<arch>-linux-gnu/openblas-pthread/libopenblas.so.0``
    exists and is not yet preloaded, prints one line to stderr and replaces the
    process (``os.execve``, same interpreter and command line) with
    ``LD_PRELOAD`` set; it does not return then.  Otherwise returns the
    decision.  ``EAGLE3_MLX_NO_OPENBLAS=1`` opts out; ``EAGLE3_MLX_OPENBLAS_REEXEC``
    in the child prevents loops.
    """
    import platform

    system = platform.system()
    if system != "Linux" or os.environ.get(OPT_OUT_ENV, "").strip().lower() in _TRUE:
        backend = "n/a"  # do not even import mlx
    else:
        backend = mlx_backend()
    maps = ""
    if system == "Linux":
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            pass
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    d = decide_openblas(
        system=system, machine=platform.machine(), backend=backend, env=os.environ,
        argv=argv, loaded_maps=maps,
    )
    if d.action == "reexec":
        if not quiet:
            print(
                f"eagle3-mlx: restarting with system OpenBLAS ({d.library}) for fast CPU "
                f"matmuls; set {OPT_OUT_ENV}=1 to disable",
                file=sys.stderr,
            )
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, d.argv, d.env)
        except OSError as e:  # e.g. exec not permitted: carry on without it
            print(f"eagle3-mlx: could not re-execute with OpenBLAS ({e})", file=sys.stderr)
            return OpenBLASDecision("skip", f"execve failed: {e}", d.library)
    elif d.action == "missing" and not quiet:
        print(
            "eagle3-mlx: MLX is using the slow reference BLAS; install OpenBLAS "
            "(apt-get install libopenblas0-pthread) for much faster CPU runs",
            file=sys.stderr,
        )
    return d


def default_dtype(backend: Optional[str] = None) -> str:
    """Default float type name for weights: ``"float32"`` on the CPU backend
    (MLX's CPU float16/bfloat16 and quantized matmuls are much slower there),
    ``"float16"`` on Metal and CUDA."""
    backend = backend or mlx_backend()
    return "float32" if backend == "cpu" else "float16"


# ----------------------------------------------------------------------------------
# identity
# ----------------------------------------------------------------------------------


def cache_home() -> Path:
    """This user's eagle3-mlx cache: ``$EAGLE3_MLX_HOME`` or ``~/.cache/eagle3-mlx``."""
    env = os.environ.get("EAGLE3_MLX_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eagle3-mlx"


def openblas_loaded() -> bool:
    """True when an OpenBLAS library is mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            return "libopenblas" in f.read()
    except OSError:
        return False


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, macOS sysctl), else the architecture."""
    import platform

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
    return platform.processor() or platform.machine()


def device_description() -> dict:
    """What measured costs depend on: backend, device, CPU, BLAS, memory."""
    import platform

    import mlx.core as mx

    backend = mlx_backend()
    try:
        info = mx.device_info()
    except Exception:
        info = {}
    d = {
        "backend": backend,
        "device_name": str(info.get("device_name", "")),
        "architecture": str(info.get("architecture", platform.machine())),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "os": platform.system(),
    }
    if backend == "cpu":
        d["blas"] = "openblas" if openblas_loaded() else "default"
    if "memory_size" in info:
        d["memory_gb"] = round(int(info["memory_size"]) / 2**30)
    return d


def machine_info() -> dict:
    """:func:`device_description` plus OS and library versions, for reports."""
    import platform
    from importlib.metadata import version

    import mlx.core as mx

    dev = device_description()
    try:
        mlx_lm_version = version("mlx-lm")
    except Exception:
        mlx_lm_version = "?"
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": dev.get("cpu"),
        "cpu_count": dev.get("cpu_count"),
        "backend": dev.get("backend"),
        "device": dev.get("device_name") or dev.get("cpu"),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm_version,
        "openblas_preloaded": openblas_loaded(),
    }
    if "memory_gb" in dev:
        info["memory_gb"] = dev["memory_gb"]
    return info


def describe_machine(m: dict) -> str:
    """One line of :func:`machine_info`."""
    blas = "OpenBLAS preloaded" if m.get("openblas_preloaded") else "no OpenBLAS"
    if m.get("backend") != "cpu":
        blas = ""
    gpu = f" | GPU {m['device']}" if m.get("backend") != "cpu" else ""
    return (f"{m['platform']} | CPU {m['cpu']} x{m['cpu_count']}{gpu} | backend {m['backend']}"
            f"{' | ' + blas if blas else ''} | mlx {m['mlx']} | mlx-lm {m['mlx_lm']}")
