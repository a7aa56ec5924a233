"""Finding and opening conversion sources: local paths or Hugging Face repo ids,
``config.json``, and weight files (safetensors or PyTorch ``.bin``), with
integrity checks that name the bad file instead of raising deep in a library.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from eagle3_mlx.convert.errors import ConvertError, short

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]

_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def resolve_source(src: str) -> Path:
    """A local file/dir as is (never touching the network), else a Hugging Face
    repo id through ``snapshot_download`` (honours HF_HUB_OFFLINE and the cache)."""
    p = Path(src).expanduser()
    if p.exists():
        return p
    if not _REPO_ID.match(src) or src.startswith((".", "/", "~")):
        raise ConvertError(src, "no such file or directory")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(src, allow_patterns=_HUB_PATTERNS))
        if not any(path.glob("*.safetensors")):
            # Older repos ship only pickled weights; fetch them only then.
            path = Path(snapshot_download(src, allow_patterns=_HUB_PATTERNS + ["*.bin"]))
    except Exception as e:
        raise ConvertError(
            src, f"not a local path, and it could not be fetched from the Hugging Face Hub ({type(e).__name__}: {short(e, 200)})"
        ) from None
    return path


def read_json(path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(path, "not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(path, f"invalid JSON ({short(e)})") from None
    if not isinstance(data, dict):
        raise ConvertError(path, "expected a JSON object")
    return data


def check_safetensors(path) -> dict:
    """Validate a safetensors file's header against its size; return the header
    (name -> {dtype, shape, data_offsets}). Catches truncated downloads."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise ConvertError(path, f"truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ConvertError(path, f"truncated safetensors file: header of {n} bytes but the file has {size}")
            if n > 100_000_000:
                raise ConvertError(path, "corrupt safetensors header (implausible size)")
            raw = f.read(n)
    except OSError as e:
        raise ConvertError(path, short(e)) from None
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except Exception:
        raise ConvertError(path, "corrupt safetensors header (not JSON)") from None
    data_len = size - 8 - n
    header.pop("__metadata__", None)
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape, dtype = info["shape"], info["dtype"]
        except Exception:
            raise ConvertError(path, f"corrupt safetensors header entry for {name!r}") from None
        if end > data_len or begin > end:
            raise ConvertError(
                path,
                f"truncated safetensors file: tensor {name!r} needs bytes up to {end} but only {data_len} "
                "are present (incomplete download?)",
            )
        if dtype in _ST_ITEMSIZE and math.prod(shape) * _ST_ITEMSIZE[dtype] != end - begin:
            raise ConvertError(path, f"corrupt safetensors header: tensor {name!r} size does not match its shape")
    return header


def _indexed_shards(src: Path, index_name: str):
    """Shard files named by an HF ``*.index.json`` weight map, or None if there is no index."""
    index = src / index_name
    if not index.exists():
        return None
    wm = read_json(index).get("weight_map") or {}
    files = sorted({src / f for f in wm.values()})
    for f in files:
        if not f.exists():
            raise ConvertError(f, f"missing shard listed in {index.name}")
    return files


def safetensors_files(src: Path) -> list:
    """The safetensors weight files of a directory (index shards if indexed)."""
    files = _indexed_shards(src, "model.safetensors.index.json")
    if files is not None:
        return files
    files = sorted(src.glob("model*.safetensors"))
    return files or sorted(src.glob("*.safetensors"))


def bin_files(src: Path) -> list:
    files = _indexed_shards(src, "pytorch_model.bin.index.json")
    if files is not None:
        return files
    files = sorted(src.glob("pytorch_model*.bin"))
    return files or sorted(p for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth"))


class WeightFiles:
    """The weights of a source directory: names and shapes up front (cheap),
    tensors on demand. Safetensors are preferred over pickled ``.bin``."""

    def __init__(self, src: Path):
        self.src = src
        st = safetensors_files(src)
        if st:
            self.kind, self.files = "safetensors", st
            self._headers = {f: check_safetensors(f) for f in st}
            self.shapes = {k: tuple(v["shape"]) for h in self._headers.values() for k, v in h.items()}
            self.origin = {k: f for f, h in self._headers.items() for k in h}
            return
        bins = bin_files(src)
        if not bins:
            raise ConvertError(src, "no weights found (expected *.safetensors or pytorch_model*.bin)")
        from eagle3_mlx.convert.torch_pickle import TorchCheckpoint

        self.kind, self.files = "pytorch .bin", bins
        self._ckpts = [TorchCheckpoint(f) for f in bins]
        self._lazy = {k: t for c in self._ckpts for k, t in c.tensors.items()}
        self.shapes = {k: tuple(t.shape) for k, t in self._lazy.items()}
        self.origin = {k: c.path for c in self._ckpts for k in c.tensors}

    def describe(self) -> str:
        n = len(self.files)
        return self.kind if n == 1 else f"{self.kind}, {n} shards"

    def load(self, progress: bool = True) -> dict:
        """name -> mx.array for every tensor (safetensors load lazily)."""
        import mlx.core as mx
        from tqdm import tqdm

        out = {}
        if self.kind == "safetensors":
            for f in self.files:
                try:
                    out.update(mx.load(str(f)))
                except Exception as e:
                    raise ConvertError(f, f"cannot read safetensors ({short(e)})") from None
            return out
        for k, t in tqdm(self._lazy.items(), desc="reading .bin", unit="tensor",
                         disable=None if progress else True, leave=False):
            out[k] = t.to_mlx()
        return out

    def load_names(self, names) -> dict:
        """name -> mx.array for the given tensors only (their files read lazily)."""
        import mlx.core as mx

        names = list(names)
        out = {}
        if self.kind == "safetensors":
            for f in sorted({self.origin[k] for k in names}):
                try:
                    loaded = mx.load(str(f))
                except Exception as e:
                    raise ConvertError(f, f"cannot read safetensors ({short(e)})") from None
                out.update({k: loaded[k] for k in names if self.origin[k] == f})
            return out
        for k in names:
            out[k] = self._lazy[k].to_mlx()
        return out
