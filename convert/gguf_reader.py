"""Opening and reading GGUF files: the ``gguf`` package's reader, with a check
that every tensor lies inside the file (a truncated download is named as such),
and the key/value metadata as plain Python values."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from eagle3_mlx.convert.errors import GGUFError


class _Truncated(Exception):
    pass


def _checked_reader_class():
    """``GGUFReader`` that checks every tensor's byte range against the file size
    before mapping it, so a truncated file is reported as such (the stock reader
    fails later with a reshape error).  The check uses the reader's private
    ``_build_tensors`` hook; if that ever changes shape, it quietly steps aside."""
    import gguf

    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            try:
                size = int(self.data.shape[0])
                for field in fields:
                    _nlen, name_data, _ndims, dims, raw_dtype, offset_tensor = field.parts
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                    n_bytes = int(np.prod(dims.astype(np.int64))) * type_size // block
                    end = int(start_offs) + int(offset_tensor[0]) + n_bytes
                    if end > size:
                        name = bytes(name_data).decode("utf-8", "replace")
                        raise _Truncated(
                            f"truncated: tensor {name!r} needs bytes up to {end:,} but the "
                            f"file has {size:,} bytes"
                        )
            except _Truncated:
                raise
            except Exception:
                pass
            return super()._build_tensors(start_offs, fields)

    return CheckedReader


def open_gguf(path):
    """Open ``path`` with ``gguf.GGUFReader`` and check it is complete.

    Raises :class:`GGUFError` for a missing, non-GGUF, corrupt or truncated file.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(path, "no such file")
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(path, f"truncated: only {size} bytes, too short for a GGUF header")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = _checked_reader_class()(path, "r")
    except _Truncated as e:
        raise GGUFError(path, str(e)) from None
    except Exception as e:  # the reader raises ValueError/IndexError/... on bad headers
        raise GGUFError(
            path, f"corrupt or truncated GGUF header ({type(e).__name__}: {e})"
        ) from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise GGUFError(
                path,
                f"truncated: tensor {t.name!r} needs bytes up to {end:,} but the file "
                f"has {size:,} bytes",
            )
    return reader


def _field_value(field):
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        return field.contents()
    return field.contents()


def gguf_metadata(reader, keys_prefixes=None) -> dict:
    """All key/value metadata of an open reader as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if keys_prefixes and not key.startswith(tuple(keys_prefixes)):
            continue
        meta[key] = _field_value(field)
    return meta


def _f32(x) -> float:
    """A float read from a float32 field, as the shortest decimal that rounds
    back to it (1e-06 rather than 9.999999974752427e-07)."""
    return float(np.format_float_scientific(np.float32(x), unique=True))


def _scalar(value, what, path):
    """Per-layer arrays (some GGUFs store head counts per layer) -> one value."""
    if isinstance(value, (list, tuple)):
        vals = sorted(set(int(v) for v in value))
        if len(vals) != 1:
            raise GGUFError(path, f"{what} differs between layers ({vals}); not supported")
        return vals[0]
    return value


def metadata_getter(meta: dict, arch: str, path):
    """``get(key, default, required)`` for the ``{arch}.{key}`` metadata keys."""

    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required:
            raise GGUFError(path, f"missing metadata key {full!r}")
        return default

    return get


def tensor_shapes(reader) -> dict:
    """Tensor name -> shape in NumPy / Hugging Face order (GGUF dims are innermost first)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
