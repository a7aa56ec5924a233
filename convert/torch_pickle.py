"""Read PyTorch zip checkpoints (``pytorch_model.bin``, ``*.pt``) without PyTorch
and without executing anything.

A torch zip holds ``<prefix>/data.pkl`` (a pickle of the state dict) and one raw
little-endian buffer per storage (``<prefix>/data/<key>``). The pickle only
needs a handful of globals to rebuild tensors; a stock ``pickle.load`` would
import and call *any* global, which is how malicious checkpoints run code. The
unpickler here maps the few admitted names to local stand-ins and refuses every
other global by name, so nothing from torch, os or builtins is ever imported or
called.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eagle3_mlx.convert.errors import ConvertError, short

# torch legacy typed-storage class -> (numpy dtype of the raw buffer, logical dtype)
_STORAGE_DTYPES = {
    "FloatStorage": ("<f4", "float32"),
    "DoubleStorage": ("<f8", "float64"),
    "HalfStorage": ("<f2", "float16"),
    "BFloat16Storage": ("<u2", "bfloat16"),  # numpy has no bf16: keep the bits
    "LongStorage": ("<i8", "int64"),
    "IntStorage": ("<i4", "int32"),
    "ShortStorage": ("<i2", "int16"),
    "CharStorage": ("<i1", "int8"),
    "ByteStorage": ("<u1", "uint8"),
    "BoolStorage": ("?", "bool"),
}


class UnsafePickleError(ConvertError):
    """The pickle asked for a global outside the allow-list."""


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass
class _Storage:
    key: str
    np_dtype: str
    dtype: str
    numel: int


@dataclass
class LazyTensor:
    """A tensor described by the pickle; its bytes are read on :meth:`numpy`."""

    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple
    _reader: "TorchCheckpoint"

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    def numpy(self) -> np.ndarray:
        """Contiguous array (bf16 comes back as its uint16 bits)."""
        buf = self._reader._storage_array(self.storage)
        if not self.shape:
            return buf[self.offset : self.offset + 1].reshape(()).copy()
        itemsize = buf.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            buf[self.offset :],
            shape=self.shape,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)

    def to_mlx(self):
        import mlx.core as mx

        a = mx.array(self.numpy())
        return a.view(mx.bfloat16) if self.dtype == "bfloat16" else a


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, reader: "TorchCheckpoint"):
        super().__init__(f)
        self._reader = reader
        self._allowed = {
            "collections.OrderedDict": collections.OrderedDict,
            "torch._utils._rebuild_tensor_v2": self._rebuild_tensor_v2,
            "torch._utils._rebuild_tensor": self._rebuild_tensor,
            "torch._utils._rebuild_parameter": self._rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self._rebuild_parameter_with_state,
        }
        for name in _STORAGE_DTYPES:
            self._allowed[f"torch.{name}"] = _StorageType(name)

    def find_class(self, module, name):
        key = f"{module}.{name}"
        if key in self._allowed:
            return self._allowed[key]
        raise UnsafePickleError(
            self._reader.path,
            f"refusing to load: the pickle references the global {key!r}, which is not a "
            "tensor-rebuild or storage type (possibly malicious; nothing was executed)",
        )

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], str)
            or not _is_int(pid[4])
        ):
            raise ConvertError(self._reader.path, f"unsupported persistent id in pickle: {pid!r:.80}")
        np_dtype, dtype = _STORAGE_DTYPES[pid[1].name]
        return _Storage(pid[2], np_dtype, dtype, pid[4])

    def _rebuild_tensor(self, storage, offset, size, stride):
        return self._rebuild_tensor_v2(storage, offset, size, stride, False, None)

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        path = self._reader.path
        if not isinstance(storage, _Storage):
            raise ConvertError(path, "malformed tensor record (no storage)")
        size, stride = tuple(size), tuple(stride)
        if not (_is_int(offset) and all(map(_is_int, size + stride)) and len(size) == len(stride)):
            raise ConvertError(path, "malformed tensor record (bad size/stride)")
        if offset < 0 or any(s < 0 for s in size + stride):
            raise ConvertError(path, "malformed tensor record (negative size/stride)")
        if all(size):
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.numel:
                raise ConvertError(
                    path, f"tensor reaches element {last} of storage {storage.key} with {storage.numel} elements"
                )
        return LazyTensor(storage, offset, size, stride, self._reader)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return data


class TorchCheckpoint:
    """An open PyTorch zip checkpoint. ``tensors`` maps names to :class:`LazyTensor`."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise ConvertError(self.path, short(e)) from None
        if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
            raise ConvertError(
                self.path,
                "legacy (pre-zip) PyTorch serialization is not supported; re-save it with a "
                "current torch.save or as safetensors",
            )
        try:
            self._zip = zipfile.ZipFile(self.path)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ConvertError(self.path, f"not a readable PyTorch zip checkpoint (corrupt or truncated?): {short(e)}") from None
        pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ConvertError(self.path, "not a PyTorch checkpoint (no single data.pkl in the zip)")
        self._prefix = pkls[0][: -len("data.pkl")]
        self._names = set(names)
        order = f"{self._prefix}byteorder"
        self._big_endian = order in self._names and self._read(order).strip() == b"big"
        try:
            obj = _Unpickler(self._zip.open(pkls[0]), self).load()
        except ConvertError:
            raise
        except Exception as e:  # truncated or garbage pickle stream
            raise ConvertError(self.path, f"corrupt pickle in checkpoint: {short(e)}") from None
        self.tensors = _state_dict(obj, self.path)

    def _read(self, name: str) -> bytes:
        try:
            return self._zip.read(name)
        except KeyError:
            raise ConvertError(self.path, f"missing entry {name} (truncated checkpoint?)") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ConvertError(self.path, f"corrupt entry {name}: {short(e)}") from None

    def _storage_array(self, st: _Storage) -> np.ndarray:
        raw = self._read(f"{self._prefix}data/{st.key}")
        dt = np.dtype(st.np_dtype)
        if self._big_endian:
            dt = dt.newbyteorder(">")
        if len(raw) < st.numel * dt.itemsize:
            raise ConvertError(self.path, f"storage {st.key} holds {len(raw)} bytes, expected {st.numel * dt.itemsize}")
        return np.frombuffer(raw, dtype=dt, count=st.numel).astype(dt.newbyteorder("<"), copy=False)

    def close(self):
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _state_dict(obj, path) -> dict:
    """The name -> tensor mapping inside the unpickled object. Accepts a plain
    state dict or one wrapped under a common key ("state_dict", "model", ...)."""
    if isinstance(obj, dict):
        if obj and all(isinstance(v, LazyTensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model", "module", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return _state_dict(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, LazyTensor)}
        if tensors:
            return tensors
    raise ConvertError(path, "the checkpoint does not hold a state dict of tensors")


def load_torch_checkpoint(path) -> dict:
    """Read every tensor of a PyTorch zip checkpoint into ``mx.array`` values."""
    with TorchCheckpoint(path) as ckpt:
        return {k: t.to_mlx() for k, t in ckpt.tensors.items()}
