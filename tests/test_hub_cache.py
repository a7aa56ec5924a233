"""Heads and targets straight from the hub, offline, through a fake Hugging
Face cache: convert once, reuse, reconvert on a new revision, redo a corrupt
entry, never cache a half-finished conversion."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from _convert_fixtures import write_head, write_torch_zip
from eagle3_mlx import api, hub_cache
from eagle3_mlx.head import t2d_from_d2t
from eagle3_mlx.testing import make_random_head

REPO = "someone/tiny-eagle31"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A private HF cache + eagle3-mlx home, offline; returns publish(repo, files_fn) -> rev."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("EAGLE3_MLX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)

    def publish(repo, write, rev):
        base = cache / ("models--" + repo.replace("/", "--"))
        write(base / "snapshots" / rev)
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(rev)
        return base / "snapshots" / rev

    return publish


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = hub_cache._convert_head_into

    def wrapped(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(hub_cache, "_convert_head_into", wrapped)
    return calls


def head_weights(model, seed):
    """A random EAGLE-3.1 head for the tiny target, as MLX-named numpy arrays."""
    head = make_random_head(model, seed=seed, draft_vocab_size=200, fc_norm=True, norm_output=True)
    w = {k: np.array(v) for k, v in tree_flatten(head.parameters()) if k != "d2t"}
    d2t = np.array(head.d2t).astype(np.int64)
    w["d2t"], w["t2d"] = d2t, t2d_from_d2t(d2t, head.config.vocab_size)
    w["embed_tokens.weight"] = np.zeros((head.config.vocab_size, head.config.hidden_size), np.float32)
    return w


def publish_head(hub, model, rev, seed=1):
    w = head_weights(model, seed)
    hub(REPO, lambda d: write_head("specforge", d, {k: v for k, v in w.items()}, fc_norm=True, norm_output=True), rev)
    return w


def entries(kind="heads"):
    d = hub_cache.cache_dir() / kind
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.exists() else []


def test_head_from_the_hub_converts_once(hub, counted, tiny, tiny_dir, capsys):
    model, _ = tiny("llama")
    target = str(tiny_dir("llama"))
    w = publish_head(hub, model, "a" * 40)
    eng = api.load(target, REPO, draft_source="eagle")
    assert len(counted) == 1 and len(entries()) == 1
    err = capsys.readouterr().err
    assert "converting EAGLE-3 head (SpecForge HF export layout; EAGLE-3.1 fc_norm, norm_output)" in err
    assert eng.head.config.fc_norm and eng.head.config.feedback == "normed"
    assert np.array_equal(np.array(eng.head.fc_norm[1].weight), w["fc_norm.1.weight"])
    first = entries()[0]
    stamp = (first / hub_cache.MANIFEST).stat().st_mtime_ns

    # the second call converts nothing and reuses the same entry
    eng = api.load(target, REPO, draft_source="eagle", draft_feedback="prenorm")
    assert len(counted) == 1 and entries() == [first]
    assert (first / hub_cache.MANIFEST).stat().st_mtime_ns == stamp
    assert "converting" not in capsys.readouterr().err
    assert eng.head.config.feedback == "prenorm"  # the override applies at load time

    # a new revision converts again, into its own entry
    publish_head(hub, model, "b" * 40, seed=2)
    api.load(target, REPO, draft_source="eagle")
    assert len(counted) == 2 and len(entries()) == 2
    second = next(e for e in entries() if e != first)

    # a corrupt cached conversion is detected and redone (same size, one byte changed)
    f = second / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    api.load(target, REPO, draft_source="eagle")
    assert len(counted) == 3
    assert "is corrupt (model.safetensors does not match its checksum); converting again" in capsys.readouterr().err
    assert hub_cache.check_entry(second) is None
    # a truncated one too, and an entry without its manifest (not written atomically)
    f.write_bytes(f.read_bytes()[:100])
    api.load(target, REPO, draft_source="eagle")
    (second / hub_cache.MANIFEST).unlink()
    api.load(target, REPO, draft_source="eagle")
    assert len(counted) == 5 and hub_cache.check_entry(second) is None


def test_half_finished_conversion_is_never_cached(hub, tiny, tiny_dir, monkeypatch):
    model, _ = tiny("llama")
    publish_head(hub, model, "c" * 40)
    real = hub_cache._convert_head_into

    def dies_halfway(src, stage, *a):
        (stage / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C or SIGTERM in the middle of a conversion

    monkeypatch.setattr(hub_cache, "_convert_head_into", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        hub_cache.resolve_head(REPO)
    root = hub_cache.cache_dir() / "heads"
    assert entries() == [] and not [p for p in root.iterdir() if "partial" in p.name]
    monkeypatch.setattr(hub_cache, "_convert_head_into", real)
    path = hub_cache.resolve_head(REPO)
    assert hub_cache.check_entry(path) is None and entries() == [path]


def test_mlx_heads_and_errors(hub, tiny, tmp_path, counted):
    from eagle3_mlx.head import save_head

    model, _ = tiny("llama")
    save_head(make_random_head(model), tmp_path / "mlx-head")
    assert hub_cache.resolve_head(str(tmp_path / "mlx-head")) == tmp_path / "mlx-head"  # as is
    assert counted == []
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        hub_cache.resolve_head("someone/not-cached")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"--draft .*junk.*no weights found"):
        hub_cache.resolve_head(str(tmp_path / "junk"))


def test_local_head_directory_reconverts_when_edited(hub, tiny, tmp_path, counted):
    model, _ = tiny("llama")
    src = write_head("specforge", tmp_path / "src", head_weights(model, 3), fc_norm=True)
    a = hub_cache.resolve_head(str(src))
    assert hub_cache.resolve_head(str(src)) == a and len(counted) == 1
    cfg = json.loads((src / "config.json").read_text())
    cfg["norm_output"] = True
    (src / "config.json").write_text(json.dumps(cfg) + "\n")
    b = hub_cache.resolve_head(str(src))
    assert b != a and len(counted) == 2
    assert json.loads((b / "config.json").read_text())["feedback"] == "normed"


def test_unconverted_bin_target_from_the_hub(hub, tiny_dir, monkeypatch):
    """--model: a .bin-only HF repo converts once; safetensors repos load as they are."""
    tdir = tiny_dir("llama")
    repo = "someone/tiny-llama-bin"

    def write(d):
        d.mkdir(parents=True)
        for f in tdir.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, d / f.name)
        w = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(tdir / "model.safetensors")).items()}
        write_torch_zip(d / "pytorch_model.bin", w)

    hub(repo, write, "d" * 40)
    calls = []
    real = hub_cache._convert_target_into
    monkeypatch.setattr(hub_cache, "_convert_target_into", lambda *a: (calls.append(1), real(*a))[1])
    p = hub_cache.resolve_model(repo)
    assert hub_cache.resolve_model(repo) == p and len(calls) == 1
    assert entries("targets") == [p]
    eng = api.load(repo, None)
    ids = [5, 17, 42]
    assert eng.model is not None and len(list(eng.stream_generate(ids, max_tokens=3))) == 3
    assert hub_cache.resolve_model(str(tdir)) == tdir and len(calls) == 1


def test_target_settles_aux_ids_and_is_part_of_the_key(hub, tiny, tiny_dir, counted, capsys):
    """eagle_config ids [1, 3, L]: output-of-layer would need hf L+1, so with the
    target known they are read as hf indices (and the target's L keys the entry)."""
    model, _ = tiny("llama")
    L = len(model.layers)
    w = head_weights(model, 4)
    hub(REPO, lambda d: write_head("modelopt", d, w, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, L]}),
        "e" * 40)
    eng = api.load(str(tiny_dir("llama")), REPO, draft_source="eagle", log=lambda m: None)
    assert eng.head.config.aux_layer_ids == [1, 3, L] and eng.target.aux_layer_ids == [1, 3, L]
    hub_cache.resolve_head(REPO, log=lambda m: None)  # no target: another entry (the +1 reading)
    assert len(counted) == 2 and len(entries()) == 2
    assert capsys.readouterr().err == ""  # log= took the progress lines


def test_truncated_config_names_the_file(tmp_path):
    """A newcomer's report: a truncated config.json gave a bare 'Expecting value:
    line 11 ...'. The load now says which file, in one line."""
    from eagle3_mlx import api
    from eagle3_mlx.hub_cache import HubCacheError
    from eagle3_mlx.testing import make_tiny_target

    make_tiny_target(tmp_path, "llama", num_hidden_layers=2)
    cfg = tmp_path / "config.json"
    cfg.write_text(cfg.read_text()[:40])
    with pytest.raises(HubCacheError) as e:
        api.load(str(tmp_path))
    msg = str(e.value)
    assert str(cfg) in msg and "invalid JSON" in msg and "\n" not in msg
