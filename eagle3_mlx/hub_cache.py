"""Heads and targets straight from the hub: convert once, reuse after.

Contract:

* :func:`fetch` turns ``--draft`` / ``--model`` text into a local directory:
  an existing path as is (never the network), else a Hugging Face repo id from
  huggingface-hub's cache first, downloaded only when the cache lacks it and
  ``HF_HUB_OFFLINE`` is not set. Only config, tokenizer and weight files are
  fetched (``*.bin`` only when a repo has no safetensors).
* :func:`resolve_head` returns an MLX head directory for any published head
  layout: an MLX head as is, anything else converted into
  ``$EAGLE3_MLX_HOME/converted/heads/<name>--<key>`` (default
  ``~/.cache/eagle3-mlx``). :func:`resolve_model` does the same for targets:
  MLX and Hugging Face safetensors repos load in mlx-lm as they are; a
  ``.bin``-only repo or a ``.gguf`` file is converted into ``.../targets/``.
* The key hashes the source's identity (the hub commit of a snapshot, or the
  names, sizes and mtimes of a local directory's files) and the conversion
  options, so a new revision or other options convert again, the same ones
  never do.
* An entry is used only if its manifest (written last) lists every file with
  its size and SHA-256 (files over 256 MiB: size and safetensors header);
  anything else is called corrupt, said so, and converted again. Conversion
  writes into a staging directory renamed into place when complete
  (:func:`eagle3_mlx.files.staged_dir`), under an inter-process
  lock, so a half-finished conversion never becomes the cached one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional

from .console import say

MANIFEST = "eagle3-mlx-cache.json"
#: Bump when converted output changes for the same source and options.
CONVERTER_VERSION = 2
_HASH_LIMIT = 256 << 20
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})/?$")


class HubCacheError(FileNotFoundError):
    """A source that cannot be found, fetched or converted; one line saying why."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def fetch(spec: str, patterns: Optional[list] = None) -> Path:
    """A local directory/file as is; else a hub repo id, cache first."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    from huggingface_hub import snapshot_download

    def get(pats, local_only):
        return Path(snapshot_download(str(spec), allow_patterns=pats, local_files_only=local_only))

    pats = patterns if patterns is not None else _PATTERNS
    try:
        path = get(pats, True)
    except Exception:
        if _offline():
            raise HubCacheError(f"{spec}: not a local directory and not in the Hugging Face cache "
                                "(HF_HUB_OFFLINE is set)") from None
        try:
            path = get(pats, False)
        except Exception as e:
            raise HubCacheError(f"{spec}: not a local directory and not downloadable "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if patterns is None and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        # Older repos ship only pickled weights; fetch them only then.
        try:
            path = get(pats + ["*.bin"], _offline())
        except Exception:
            pass
    return path


def cache_dir() -> Path:
    from .default_model import cache_home

    return cache_home() / "converted"


def source_revision(src: Path) -> str:
    """The hub commit of a snapshot directory, else a fingerprint of the local
    files (relative name, size, mtime) so an edited directory converts again."""
    m = _SNAPSHOT.search(str(src))
    if m:
        return m.group(1)
    h = hashlib.sha256()
    files = [src] if src.is_file() else sorted(f for f in src.rglob("*") if f.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(src) if f != src else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "local-" + h.hexdigest()[:32]


def entry_dir(kind: str, spec: str, src: Path, options: dict) -> Path:
    ident = {"source": str(spec), "revision": source_revision(src), "options": options,
             "converter": CONVERTER_VERSION}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^\w.\-]+", "--", str(spec).strip("/")).strip("-")[-80:] or "source"
    return cache_dir() / kind / f"{name}--{key}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, info: dict):
    """List every file (size, SHA-256 up to 256 MiB) and ``info``; written last."""
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            size = f.stat().st_size
            files[str(f.relative_to(directory))] = {"size": size,
                                                    "sha256": _sha256(f) if size <= _HASH_LIMIT else None}
    (directory / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=2, sort_keys=True))


def check_entry(directory: Path) -> Optional[str]:
    """None if the cached conversion is complete and intact, else why not."""
    if not directory.is_dir():
        return "missing"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST}"
    if not files:
        return "empty"
    for name, meta in files.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta.get("size"):
            return f"{name} has {f.stat().st_size} bytes, expected {meta.get('size')}"
        if meta.get("sha256"):
            if _sha256(f) != meta["sha256"]:
                return f"{name} does not match its checksum"
        elif f.suffix == ".safetensors":
            from .convert.errors import ConvertError
            from .convert.sources import check_safetensors

            try:
                check_safetensors(f)
            except ConvertError as e:
                return str(e)
    return None


def cached_conversion(kind: str, spec: str, src: Path, options: dict,
                      convert: Callable[[Path], None], *, log=say) -> Path:
    """The cache entry for (spec, src's revision, options), converting with
    ``convert(stage_dir)`` when it is missing or corrupt."""
    from .default_model import _lock
    from .files import staged_dir

    entry = entry_dir(kind, spec, src, options)
    why = check_entry(entry)
    if why is None:
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _lock(entry.parent / f".{entry.name}.lock"):
        why = check_entry(entry)  # another process may have finished meanwhile
        if why is None:
            return entry
        if why != "missing":
            log(f"eagle3-mlx: cached conversion {entry} is corrupt ({why}); converting again")
        with staged_dir(entry) as stage:
            convert(stage)
            write_manifest(stage, {"source": str(spec), "revision": source_revision(src),
                                   "options": options, "converter": CONVERTER_VERSION})
    log(f"eagle3-mlx: converted {spec} into {entry} (reused from now on)")
    return entry


# ----------------------------------------------------------------------------
# Heads


def resolve_head(spec: str, *, dtype: Optional[str] = None, target_config=None, log=say) -> Path:
    """An MLX head directory for ``spec`` (a directory or repo id in any
    published head layout), converted once into the cache if needed.
    ``target_config`` (a target's ``config.json`` path, optional): the head is
    checked against it, and its layer count settles ambiguous aux ids (so it is
    part of the cache key)."""
    from .head import is_mlx_head_dir

    src = fetch(str(spec))
    if is_mlx_head_dir(src):
        return src
    from .convert.errors import ConvertError
    from .convert.sources import read_json

    try:
        target = None
        if target_config is not None and Path(target_config).is_file():
            target = (read_json(target_config), Path(target_config))
        from .compat import target_dims

        layers = target_dims(target[0])["num_hidden_layers"] if target else None
        return cached_conversion("heads", spec, src, {"dtype": dtype, "target_layers": layers},
                                 lambda stage: _convert_head_into(src, stage, dtype, log, target), log=log)
    except ConvertError as e:
        raise HubCacheError(f"--draft {spec}: {e}") from None


def _convert_head_into(src: Path, stage: Path, dtype, log, target=None):
    from .convert.errors import ConvertError
    from .convert.heads import HeadSource, convert_head, looks_like_head
    from .convert.sources import WeightFiles, read_json

    if not src.is_dir() or not (src / "config.json").is_file():
        raise ConvertError(src, "not an EAGLE-3 head (no config.json)")
    config = read_json(src / "config.json")
    weights = WeightFiles(src)
    if not looks_like_head(config, weights.shapes):
        raise ConvertError(src, "not an EAGLE-3 head (a target model? pass it as --model)")
    hs = HeadSource(src, config, weights, log=log)
    log(f"eagle3-mlx: converting {hs.describe()} from {src} (once) ...")
    convert_head(hs, stage, dtype=dtype, target_config=target, log=log)


# ----------------------------------------------------------------------------
# Targets


def resolve_model(spec: str, *, log=say) -> Path:
    """A directory ``mlx_lm.load`` opens: MLX or Hugging Face safetensors repos
    as they are; ``.bin``-only repos and ``.gguf`` files converted once."""
    src = fetch(str(spec))
    gguf = None
    if src.is_file():
        if src.suffix.lower() != ".gguf":
            raise HubCacheError(f"--model {spec}: expected a model directory, a .gguf file or a repo id")
        gguf = src
    elif not (src / "config.json").is_file():
        ggufs = sorted(src.glob("*.gguf"))
        if len(ggufs) != 1:
            raise HubCacheError(f"--model {spec}: no config.json" + (" (several .gguf files: pass one)" if ggufs else ""))
        gguf = ggufs[0]
    from .convert.errors import ConvertError

    if gguf is None:
        from .convert.sources import read_json

        try:   # a truncated or hand-edited config: name the file, not a bare JSON error
            read_json(src / "config.json")
        except ConvertError as e:
            raise HubCacheError(f"--model {spec}: {e}") from None
    if gguf is None and any(src.glob("*.safetensors")):
        return src

    try:
        return cached_conversion("targets", spec, src, {},
                                 lambda stage: _convert_target_into(src, gguf, stage, log), log=log)
    except ConvertError as e:
        raise HubCacheError(f"--model {spec}: {e}") from None


def _convert_target_into(src: Path, gguf: Optional[Path], stage: Path, log):
    if gguf is not None:
        from .convert.gguf_target import convert_gguf

        log(f"eagle3-mlx: converting GGUF target {gguf.name} to MLX (once) ...")
        convert_gguf(gguf, stage, log=log)
        return
    from .convert.sources import WeightFiles, read_json
    from .convert.targets import convert_target, target_description

    config = read_json(src / "config.json")
    weights = WeightFiles(src)
    log(f"eagle3-mlx: converting {target_description(config, weights)} from {src} (once) ...")
    convert_target(src, stage, config=config, weights=weights, log=log)
