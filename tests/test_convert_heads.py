"""`eagle3-mlx convert` on EAGLE-3 heads: every published layout, written by the
test from the same random weights, must give the same MLX head."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from _convert_fixtures import ref_forward, ref_head_weights, write_head
from eagle3_mlx.convert.cli import main
from eagle3_mlx.compat import HeadTargetMismatch, check_head_against_target
from eagle3_mlx.head import HeadConfig, load_head

SAME_LAYOUTS = ["official", "specforge", "sglang", "speculators", "modelopt"]
T = 7


def convert(src, out, *extra):
    return main([str(src), "--mlx-path", str(out), *map(str, extra)])


def draft_logits(head, w, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, w["embed_tokens.weight"].shape[0], size=T)
    emb = w["embed_tokens.weight"][ids]
    feats = rng.standard_normal((T, w["fc.weight"].shape[1])).astype(np.float32)
    _, logits = head(mx.array(emb[None]), mx.array(feats[None]), mask="causal", from_target=True)
    return np.array(logits[0].astype(mx.float32)), emb, feats


def head_tensors(path):
    return mx.load(str(Path(path) / "model.safetensors"))


@pytest.fixture(scope="module")
def ref():
    return ref_head_weights(seed=0)


@pytest.fixture(scope="module")
def converted(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    outs = {}
    for layout in SAME_LAYOUTS:
        src = write_head(layout, root / layout, ref)
        assert convert(src, root / f"{layout}-mlx") == 0
        outs[layout] = root / f"{layout}-mlx"
    return outs


def test_every_layout_gives_the_same_mlx_head(ref, converted, capsys):
    base = head_tensors(converted["official"])
    assert "embed_tokens.weight" not in base
    for layout, out in converted.items():
        t = head_tensors(out)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["source_format"] == layout
        assert cfg["num_hidden_layers"] == 1 and cfg["rope_theta"] == 10000.0
        assert set(t) - {"embed_tokens.weight"} == set(base), layout
        for k in base:
            assert t[k].dtype == base[k].dtype and mx.array_equal(t[k], base[k]).item(), (layout, k)
        if "embed_tokens.weight" in t:  # SpecForge HF export and speculators ship it
            assert np.array_equal(np.array(t["embed_tokens.weight"]), ref["embed_tokens.weight"])
        # every tensor equals the source weights (after un-fusing / renaming)
        for k, v in base.items():
            if k != "d2t":
                assert np.array_equal(np.array(v), ref[k]), k

    logits = {lay: draft_logits(load_head(out), ref)[0] for lay, out in converted.items()}
    for lay in SAME_LAYOUTS[1:]:
        assert np.array_equal(logits[lay], logits["official"]), lay
    # and they are the EAGLE-3 forward pass of those weights (independent NumPy reference)
    got, emb, feats = draft_logits(load_head(converted["official"]), ref)
    want = ref_forward(ref, emb, feats)
    err = float(np.abs(got - want).max())
    print(f"\n[parity] head (all {len(SAME_LAYOUTS)} layouts) MLX vs NumPy reference: max abs diff {err:.2e}")
    assert err < 1e-4


def test_speculators_aux_ids_and_official_defaults(converted):
    spec = json.loads((converted["speculators"] / "config.json").read_text())
    assert spec["aux_layer_ids"] == [2, 3, 3]  # HF-index convention, taken as is
    off = json.loads((converted["official"] / "config.json").read_text())
    assert off["aux_layer_ids"] is None and off["has_embedding"] is False
    assert off["aux_layer_convention"] == "hf_hidden_states_index"


def test_nvidia_norm_before_fc(tmp_path, capsys):
    w = ref_head_weights(seed=1, input_norm=True)
    src = write_head("nvidia", tmp_path / "nv", w)
    assert convert(src, tmp_path / "out") == 0
    assert "NVIDIA norm_before_fc layout" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["norm_before_fc"] is True
    # eagle_config ids [1, 2, 3] are output-of-layer ids (first id 1): +1
    assert cfg["aux_layer_ids"] == [2, 3, 4]
    head = load_head(tmp_path / "out")
    got, emb, feats = draft_logits(head, w)
    err = float(np.abs(got - ref_forward(w, emb, feats)).max())
    print(f"\n[parity] head norm_before_fc vs NumPy reference: max abs diff {err:.2e}")
    assert err < 1e-4


def test_nvidia_flag_without_input_norm_is_refused(tmp_path, capsys):
    w = ref_head_weights(seed=1)
    src = write_head("modelopt", tmp_path / "nv", w, norm_before_fc=True)
    assert convert(src, tmp_path / "out") == 1
    assert "input_norm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fc_bias_sglang(tmp_path):
    w = ref_head_weights(seed=2, fc_bias=True)
    src = write_head("sglang", tmp_path / "sg", w)
    assert convert(src, tmp_path / "out") == 0
    head = load_head(tmp_path / "out")
    assert head.config.fc_bias
    got, emb, feats = draft_logits(head, w)
    assert np.abs(got - ref_forward(w, emb, feats)).max() < 1e-4


@pytest.mark.parametrize("explicit", [True, None])
def test_speculators_norm_before_residual(tmp_path, capsys, explicit):
    w = ref_head_weights(seed=3)
    src = write_head("speculators", tmp_path / "sp", w)
    cfg = json.loads((src / "config.json").read_text())
    if explicit is None:
        del cfg["norm_before_residual"]
    else:
        cfg["norm_before_residual"] = explicit
    (src / "config.json").write_text(json.dumps(cfg))
    assert convert(src, tmp_path / "out") == 0
    head = load_head(tmp_path / "out")
    got, emb, feats = draft_logits(head, w)
    if explicit is None:
        assert head.config.norm_before_residual is False
        assert "norm_before_residual is not in the config" in capsys.readouterr().out
    else:
        assert head.config.norm_before_residual is True
    want = ref_forward(w, emb, feats, norm_before_residual=bool(explicit))
    assert np.abs(got - want).max() < 1e-4


def test_layer_count_comes_from_the_weights(tmp_path):
    w = ref_head_weights(seed=4, n_layers=2)
    src = write_head("speculators", tmp_path / "sp", w)  # config says num_hidden_layers 1
    assert convert(src, tmp_path / "out") == 0
    head = load_head(tmp_path / "out")
    assert head.config.num_hidden_layers == 2 and len(head.layers) == 2
    t = head_tensors(tmp_path / "out")
    assert np.array_equal(np.array(t["layers.1.self_attn.q_proj.weight"]), w["layers.1.self_attn.q_proj.weight"])


def test_d2t_offsets_map_draft_ids_to_target_ids(tmp_path, ref, converted):
    head = load_head(converted["official"])
    used = np.nonzero(ref["t2d"])[0]
    assert not np.array_equal(ref["d2t"], np.zeros_like(ref["d2t"]))  # non-trivial mapping
    Vd = ref["lm_head.weight"].shape[0]
    tgt = np.array(head.to_target_ids(mx.arange(Vd)))
    assert np.array_equal(tgt, used)  # target = d + d2t[d]
    assert np.array_equal(np.array(head.d2t), ref["d2t"]) and head.d2t.dtype == mx.int32
    # the draft's top token, mapped, is the target id of the same lm_head row
    logits, _, _ = draft_logits(head, ref)
    d = int(logits[-1].argmax())
    assert int(head.to_target_ids(mx.array([d]))[0]) == used[d] == d + ref["d2t"][d]


def test_d2t_derived_from_t2d_when_missing(tmp_path, ref):
    w = dict(ref)
    src = write_head("specforge", tmp_path / "sf", {k: v for k, v in w.items()})
    from safetensors.numpy import load_file, save_file

    t = load_file(str(src / "model.safetensors"))
    del t["d2t"]
    save_file(t, str(src / "model.safetensors"))
    assert convert(src, tmp_path / "out") == 0
    assert np.array_equal(np.array(load_head(tmp_path / "out").d2t), ref["d2t"])


def test_absolute_d2t_is_refused(tmp_path, ref, capsys):
    w = dict(ref)
    w["d2t"] = np.nonzero(ref["t2d"])[0].astype(np.int64)  # absolute ids (SGLang hot_token_id)
    src = write_head("specforge", tmp_path / "sf", w)
    assert convert(src, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert "model.safetensors" in err and "not an offset table" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_head_wider_than_target_needs_its_embedding(tmp_path, capsys):
    w = ref_head_weights(seed=5, H=64, Ht=48)
    src = write_head("specforge", tmp_path / "sf", w)
    assert convert(src, tmp_path / "ok") == 0
    assert load_head(tmp_path / "ok").config.target_hidden_size == 48
    src = write_head("official", tmp_path / "off", w)  # official layout: no embedding
    assert convert(src, tmp_path / "bad") == 1
    err = capsys.readouterr().err
    assert "no embed_tokens" in err and "64" in err and "48" in err
    assert not (tmp_path / "bad").exists()


def test_rope_settings(tmp_path, ref):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4096}
    src = write_head("specforge", tmp_path / "a", ref, rope_theta=500000.0, rope_scaling=scaling)
    assert convert(src, tmp_path / "a-mlx") == 0
    c = load_head(tmp_path / "a-mlx").config
    assert c.rope_theta == 500000.0 and c.rope_scaling["rope_type"] == "llama3"
    # transformers 5 style
    src = write_head("specforge", tmp_path / "b", ref, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert convert(src, tmp_path / "b-mlx") == 0
    c = load_head(tmp_path / "b-mlx").config
    assert c.rope_theta == 1e6 and c.rope_scaling is None
    # user override
    assert convert(src, tmp_path / "c-mlx", "--rope-theta", "10000") == 0
    assert load_head(tmp_path / "c-mlx").config.rope_theta == 10000.0


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_head(tmp_path, ref, converted, bits):
    src = write_head("official", tmp_path / "off", ref)
    assert convert(src, tmp_path / "q", "--q-bits", bits, "--q-group-size", 32) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    head = load_head(tmp_path / "q")
    t = head_tensors(tmp_path / "q")
    for name in ("fc", "lm_head", "layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"):
        assert f"{name}.scales" in t, name
    got, _, _ = draft_logits(head, ref)
    full, _, _ = draft_logits(load_head(converted["official"]), ref)
    corr = np.corrcoef(got.ravel(), full.ravel())[0, 1]
    assert corr > (0.99 if bits == 8 else 0.9), corr


def test_compat_check_names_the_numbers():
    head = HeadConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=384, draft_vocab_size=96, target_hidden_size=64, aux_layer_ids=[2, 3, 8])
    check_head_against_target(head, {"hidden_size": 64, "vocab_size": 384, "num_hidden_layers": 9})
    # id L (the last layer's output before the final norm) is readable
    check_head_against_target(head, {"hidden_size": 64, "vocab_size": 384, "num_hidden_layers": 8})
    with pytest.raises(HeadTargetMismatch, match=r"valid: 0\.\.7"):
        check_head_against_target(head, {"hidden_size": 64, "vocab_size": 384, "num_hidden_layers": 7})
    with pytest.raises(HeadTargetMismatch) as e:
        check_head_against_target(head, {"hidden_size": 128, "vocab_size": 500, "num_hidden_layers": 6})
    msg = str(e.value)
    assert "\n" not in msg
    assert "128" in msg and "64" in msg  # hidden
    assert "384" in msg and "500" in msg  # vocab
    assert "[2, 3, 8]" in msg and "6 layers" in msg  # aux ids beyond depth
    assert "cannot share the target's embedding" in msg
    # nested text_config (multimodal wrappers) and dict-style head configs
    check_head_against_target(head.to_dict(), {"text_config": {"hidden_size": 64, "vocab_size": 384,
                                                               "num_hidden_layers": 12}})


def test_target_mismatch_is_refused(tmp_path, ref, capsys):
    src = write_head("official", tmp_path / "off", ref)
    tgt = tmp_path / "target"
    tgt.mkdir()
    (tgt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 96, "vocab_size": 384,
                                                 "num_hidden_layers": 6}))
    assert convert(src, tmp_path / "out", "--target", tgt) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("eagle3-mlx convert: error: ") and "config.json" in err
    assert "96" in err and "64" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    (tgt / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 384,
                                                 "num_hidden_layers": 6}))
    assert convert(src, tmp_path / "out", "--target", tgt) == 0


def test_unknown_layouts(tmp_path, capsys):
    from safetensors.numpy import save_file

    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLMEagle3"]}))
    save_file({"fc.weight": np.zeros((4, 12), np.float32), "mystery.weight": np.zeros(3, np.float32)},
              str(a / "model.safetensors"))
    assert convert(a, tmp_path / "out") == 1
    assert "unsupported tensor 'mystery.weight'" in capsys.readouterr().err
    b = tmp_path / "b"
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"foo": 1}))
    save_file({"x": np.zeros(3, np.float32)}, str(b / "model.safetensors"))
    assert convert(b, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "unknown layout" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_truncated_head_safetensors(tmp_path, ref, capsys):
    src = write_head("specforge", tmp_path / "sf", ref)
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert convert(src, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{f}: truncated safetensors file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path, ref, capsys):
    src = write_head("official", tmp_path / "off", ref)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert(src, out) == 1
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert convert(src, out, "--force") == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupt_leaves_nothing(tmp_path, ref, monkeypatch, capsys):
    import eagle3_mlx.head as head_mod

    def boom(*a, **k):
        (a[1] / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(head_mod, "save_head", boom)
    src = write_head("official", tmp_path / "off", ref)
    assert convert(src, tmp_path / "out") == 130
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["off"]


def test_hf_repo_id_from_offline_cache(tmp_path, ref):
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-eagle3" / "snapshots" / ("a" * 40)
    write_head("specforge", snap, ref)
    (cache / "models--someone--tiny-eagle3" / "refs").mkdir(parents=True)
    (cache / "models--someone--tiny-eagle3" / "refs" / "main").write_text("a" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "eagle3_mlx.convert.cli"]
    r = subprocess.run(cmd + ["someone/tiny-eagle3", "--mlx-path", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SpecForge HF export layout" in r.stdout
    assert mx.array_equal(head_tensors(tmp_path / "out")["fc.weight"], mx.array(ref["fc.weight"])).item()
    r = subprocess.run(cmd + ["someone/not-cached", "--mlx-path", str(tmp_path / "out2")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("eagle3-mlx convert: error: someone/not-cached: not a local path")


def test_gguf_dispatch(tmp_path, monkeypatch, capsys):
    import types

    calls = []

    def fake_convert_gguf(src_path, out_dir, *, dtype, quantize, q_bits=4, q_group_size=64,
                          q_mode="affine", log=None):
        calls.append((src_path, out_dir, dtype, quantize, q_bits, q_group_size, q_mode))
        if dtype == "float16":  # stand-in for GGUFError: a ValueError with path + reason
            err = ValueError("x")
            err.path, err.reason = str(src_path), "truncated: tensor data ends early"
            raise err
        (out_dir / "config.json").write_text("{}")

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "eagle3_mlx.convert.gguf_target",
                        types.SimpleNamespace(convert_gguf=fake_convert_gguf))
    assert convert(gguf, tmp_path / "out", "-q") == 0
    assert "detected: GGUF target model (m.gguf)" in capsys.readouterr().out
    (src, stage, dtype, quantize, q_bits, gs, mode), = calls
    assert src == gguf and stage.parent == tmp_path and stage.name.startswith(".out.partial-")
    assert (quantize, q_bits, gs, mode) == (True, 4, 64, "affine")
    assert (tmp_path / "out" / "config.json").exists()
    assert convert(gguf, tmp_path / "bad", "--dtype", "float16") == 1
    assert capsys.readouterr().err == f"eagle3-mlx convert: error: {gguf}: truncated: tensor data ends early\n"
    assert not (tmp_path / "bad").exists()
    monkeypatch.setitem(sys.modules, "eagle3_mlx.convert.gguf_target", None)  # module absent
    assert convert(gguf, tmp_path / "out2") == 1
    assert "GGUF conversion is not available" in capsys.readouterr().err
