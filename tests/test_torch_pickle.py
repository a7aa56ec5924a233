"""The restricted PyTorch-zip reader: reads tensors exactly, executes nothing."""

import os
import pickle
import zipfile

import mlx.core as mx
import numpy as np
import pytest

from _convert_fixtures import View, ref_head_weights, write_head, write_pickle_zip, write_torch_zip
from eagle3_mlx.convert.cli import main
from eagle3_mlx.convert.errors import ConvertError
from eagle3_mlx.convert.torch_pickle import TorchCheckpoint, UnsafePickleError, load_torch_checkpoint


class CreatesFile:
    """Unpickling this with a stock pickle.load runs os.system and creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class Evals:
    def __reduce__(self):
        return (eval, ("1+1",))


def test_roundtrip_dtypes_views_and_shared_storage(tmp_path):
    rng = np.random.default_rng(0)
    base = np.arange(40, dtype=np.float32)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "i64": np.array([0, 5, -7], dtype=np.int64),
        "mask": np.array([True, False, True]),
        "transposed": View(base, 0, (4, 5), (1, 4)),  # non-contiguous
        "slice": View(base, 8, (2, 4), (4, 1)),  # same storage, offset
        "bf16": View(np.array([0x3F80, 0xC000, 0x4049], dtype=np.uint16), 0, (3,), (1,), bf16=True),
    }
    write_torch_zip(tmp_path / "x.bin", tensors)
    got = load_torch_checkpoint(tmp_path / "x.bin")
    for k in ("f32", "f16", "i64", "mask"):
        assert np.array_equal(np.array(got[k]), tensors[k]) and np.array(got[k]).dtype == tensors[k].dtype, k
    assert np.array_equal(np.array(got["transposed"]), base[:20].reshape(5, 4).T)
    assert np.array_equal(np.array(got["slice"]), base[8:16].reshape(2, 4))
    assert got["bf16"].dtype == mx.bfloat16
    assert got["bf16"].astype(mx.float32).tolist() == [1.0, -2.0, 3.140625]


def test_malicious_reduce_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    write_pickle_zip(tmp_path / "evil.bin", pickle.dumps(CreatesFile(marker), protocol=2))
    with pytest.raises(UnsafePickleError) as e:
        TorchCheckpoint(tmp_path / "evil.bin")
    assert "'posix.system'" in str(e.value) or "'nt.system'" in str(e.value)
    assert not marker.exists()

    # the same through the CLI, as a head checkpoint: one line, exit 1, OUT untouched
    head = write_head("official", tmp_path / "head", ref_head_weights())
    (head / "pytorch_model.bin").write_bytes((tmp_path / "evil.bin").read_bytes())
    assert main([str(head), "--mlx-path", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"eagle3-mlx convert: error: {head / 'pytorch_model.bin'}: refusing to load")
    assert "system" in err and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_other_globals_are_refused(tmp_path):
    write_pickle_zip(tmp_path / "e.bin", pickle.dumps(Evals(), protocol=4))
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        TorchCheckpoint(tmp_path / "e.bin")
    # a global smuggled in where a storage type belongs
    pkl = pickle.dumps({"x": 1}, protocol=2).replace(b"}", b"cbuiltins\nexec\n", 1)
    write_pickle_zip(tmp_path / "x.bin", pkl)
    with pytest.raises(UnsafePickleError, match="builtins.exec"):
        TorchCheckpoint(tmp_path / "x.bin")


def test_corrupt_inputs_name_the_file(tmp_path):
    write_torch_zip(tmp_path / "ok.bin", {"w": np.ones((64, 64), np.float32)})
    data = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConvertError, match="trunc.bin: not a readable PyTorch zip"):
        TorchCheckpoint(tmp_path / "trunc.bin")
    # flip a byte inside the tensor data: the zip CRC catches it on read
    bad = bytearray(data)
    i = data.index(np.ones(1, np.float32).tobytes() * 4)
    bad[i] ^= 0xFF
    (tmp_path / "crc.bin").write_bytes(bytes(bad))
    with TorchCheckpoint(tmp_path / "crc.bin") as c, pytest.raises(ConvertError, match="crc.bin: corrupt entry"):
        c.tensors["w"].to_mlx()
    (tmp_path / "legacy.bin").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(ConvertError, match="legacy"):
        TorchCheckpoint(tmp_path / "legacy.bin")
    with zipfile.ZipFile(tmp_path / "nopkl.bin", "w") as z:
        z.writestr("archive/version", "3")
    with pytest.raises(ConvertError, match="no single data.pkl"):
        TorchCheckpoint(tmp_path / "nopkl.bin")


def test_out_of_bounds_tensor_is_refused(tmp_path):
    base = np.arange(10, dtype=np.float32)
    write_torch_zip(tmp_path / "oob.bin", {"w": View(base, 4, (3, 3), (3, 1))})
    with pytest.raises(ConvertError, match="storage 0 with 10 elements"):
        TorchCheckpoint(tmp_path / "oob.bin")


def test_matches_real_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    sd = {"t": x.t(), "row": x[2], "half": x.half(), "bf16": x.bfloat16(), "long": torch.arange(7),
          "bool": x > 0, "param": torch.nn.Parameter(x.clone())}
    torch.save(sd, tmp_path / "real.bin")
    got = load_torch_checkpoint(tmp_path / "real.bin")
    for k, v in sd.items():
        want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        mine = np.array(got[k].astype(mx.float32)) if v.dtype == torch.bfloat16 else np.array(got[k])
        assert mine.shape == want.shape and np.array_equal(mine, want), k
    # and torch itself reads what the test writer produces (so the fixtures are faithful)
    write_torch_zip(tmp_path / "mine.bin", {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    back = torch.load(tmp_path / "mine.bin", weights_only=True)
    assert back["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
