"""`eagle3-mlx convert` on PyTorch target models (safetensors and .bin)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from eagle3_mlx.convert.cli import main
from eagle3_mlx.testing import make_tiny_target, make_tokenizer

IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2, 8, 19, 77, 31]


def convert(src, out, *extra):
    return main([str(src), "--mlx-path", str(out), *map(str, extra)])


def mlx_logits(path):
    from mlx_lm import load

    model, _ = load(str(path))
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


# ---------------------------------------------------------------------------
# parity against the transformers PyTorch forward (torch is a test-only dependency)

def _hf_model(family):
    torch = pytest.importorskip("torch")
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[family]
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=384, max_position_embeddings=256,
              rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=family != "llama")
    if family == "qwen2":
        kw["rope_theta"] = 10000.0  # differs from mlx-lm's qwen2 default (1e6): must be carried over
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**kw), attn_implementation="eager").eval()
    if family == "qwen2":  # non-zero q/k/v biases, so they are checked too
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.1)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].float().numpy()
    return model, ref


def _save_bin(model, path, shards=1):
    """A `.bin` copy (optionally sharded with an index), as older hub repos ship."""
    import torch

    sd = model.state_dict()
    names = list(sd)
    if shards == 1:
        torch.save(sd, path / "pytorch_model.bin")
        return
    wm = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in names[i::shards]}
        torch.save(part, path / fname)
        wm.update({k: fname for k in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_parity_with_transformers(tmp_path, family, capsys):
    model, ref = _hf_model(family)
    st, binp = tmp_path / "st", tmp_path / "bin"
    model.save_pretrained(str(st))
    make_tokenizer(st, vocab_size=384)
    binp.mkdir()
    for f in st.iterdir():
        if not f.name.endswith(".safetensors"):
            (binp / f.name).write_bytes(f.read_bytes())
    _save_bin(model, binp)

    assert convert(st, tmp_path / "st-mlx", "--dtype", "float32") == 0
    assert f"detected: target model ({family}, safetensors)" in capsys.readouterr().out
    assert convert(binp, tmp_path / "bin-mlx", "--dtype", "float32") == 0
    assert f"detected: target model ({family}, pytorch .bin)" in capsys.readouterr().out

    err_st = float(np.abs(mlx_logits(tmp_path / "st-mlx") - ref).max())
    err_bin = float(np.abs(mlx_logits(tmp_path / "bin-mlx") - ref).max())
    with capsys.disabled():
        print(f"\n[parity] target {family} fp32: safetensors {err_st:.2e}, .bin (restricted unpickler) "
              f"{err_bin:.2e} (max |logit| {np.abs(ref).max():.2f})")
    assert err_st <= 1e-4 and err_bin <= 1e-4


def test_sharded_safetensors_and_bin(tmp_path, capsys):
    model, ref = _hf_model("llama")
    st, binp = tmp_path / "st", tmp_path / "bin"
    model.save_pretrained(str(st), max_shard_size="40KB")
    assert len(list(st.glob("model-*.safetensors"))) > 1
    make_tokenizer(st, vocab_size=384)
    make_tokenizer(binp, vocab_size=384)
    (binp / "config.json").write_text((st / "config.json").read_text())
    _save_bin(model, binp, shards=3)
    assert convert(st, tmp_path / "a", "--dtype", "float32") == 0
    assert convert(binp, tmp_path / "b", "--dtype", "float32") == 0
    out = capsys.readouterr().out
    assert "safetensors, " in out and "pytorch .bin, 3 shards" in out
    for p in ("a", "b"):
        assert np.abs(mlx_logits(tmp_path / p) - ref).max() <= 1e-4


# ---------------------------------------------------------------------------
# no torch needed below: the tiny_llama_dir mlx-lm test target uses the HF tensor names

@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_target(tmp_path_factory.mktemp("tiny_llama_dir") / "llama", "llama")


def test_tokenizer_and_chat_template_carried(tiny_llama_dir, tmp_path):
    from mlx_lm import load

    assert convert(tiny_llama_dir, tmp_path / "out") == 0
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (tiny_llama_dir / f).read_bytes()
    _, tok = load(str(tmp_path / "out"))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_target_loads_and_generates(tiny_llama_dir, tmp_path, bits):
    import mlx.nn as nn
    from mlx_lm import generate, load

    assert convert(tiny_llama_dir, tmp_path / "q", "-q", "--q-bits", bits) == 0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    model, tok = load(str(tmp_path / "q"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    out = generate(model, tok, "The quick brown fox", max_tokens=5, verbose=False)
    assert isinstance(out, str) and len(tok.encode(out)) >= 1
    full = mlx_logits(tiny_llama_dir)
    q = mlx_logits(tmp_path / "q")
    assert np.corrcoef(full.ravel(), q.ravel())[0, 1] > (0.99 if bits == 8 else 0.9)


def test_mxfp4_and_dtype(tiny_llama_dir, tmp_path):
    assert convert(tiny_llama_dir, tmp_path / "fp4", "-q", "--q-mode", "mxfp4") == 0
    cfg = json.loads((tmp_path / "fp4" / "config.json").read_text())
    assert cfg["quantization"]["mode"] == "mxfp4" and cfg["quantization"]["group_size"] == 32
    assert convert(tiny_llama_dir, tmp_path / "bf16", "--dtype", "bfloat16") == 0
    w = mx.load(str(tmp_path / "bf16" / "model.safetensors"))
    assert w["model.layers.0.self_attn.q_proj.weight"].dtype == mx.bfloat16


def test_truncated_safetensors(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_llama_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])
    assert convert(src, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"eagle3-mlx convert: error: {f}: truncated safetensors file")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no staging leftovers


def test_missing_shard_and_unsupported_model(tiny_llama_dir, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_llama_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert convert(src, tmp_path / "out") == 1
    assert "model-00002-of-00002.safetensors: missing shard" in capsys.readouterr().err
    (src / "model.safetensors.index.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (src / "config.json").write_text(json.dumps(cfg))
    assert convert(src, tmp_path / "out") == 1
    assert "Model type no_such_arch not supported" in capsys.readouterr().err


def test_bin_target_errors(tiny_llama_dir, tmp_path, capsys):
    import pickle

    from _convert_fixtures import write_pickle_zip, write_torch_zip

    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    w = {k: np.array(v) for k, v in mx.load(str(tiny_llama_dir / "model.safetensors")).items()}
    w.pop("model.norm.weight")
    write_torch_zip(src / "pytorch_model.bin", w)
    assert convert(src, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "pytorch_model.bin: weights do not match the llama model" in err and "model.norm.weight" in err

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w')",))

    write_pickle_zip(src / "pytorch_model.bin", pickle.dumps(Evil(), protocol=4))
    assert convert(src, tmp_path / "out") == 1
    assert "'builtins.exec'" in capsys.readouterr().err
    (src / "pytorch_model.bin").write_bytes(b"PK\x03\x04garbage")
    assert convert(src, tmp_path / "out") == 1
    assert "not a readable PyTorch zip" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not marker.exists()
