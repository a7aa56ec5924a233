import os
import tempfile

import pytest

from eagle3_mlx.testing import make_oracle_head, make_tiny_target

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Calibration results and the default-model cache go to a throw-away home.
os.environ.setdefault("EAGLE3_MLX_HOME", tempfile.mkdtemp(prefix="eagle3-mlx-home-"))

# Embedding/lm_head strong, decoder layers weak: the next token then depends
# mostly on the current one, which the oracle head below can predict.
FAMILY_SCALES = {
    "llama": dict(weight_scale=0.5, layer_scale=0.02),
    "mistral": dict(weight_scale=0.5, layer_scale=0.02),
    "qwen2": dict(weight_scale=0.5, layer_scale=0.05),
    "qwen3": dict(weight_scale=0.5, layer_scale=0.05),
    "gemma3": dict(weight_scale=0.3, layer_scale=0.002),
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(family) -> path of a saved tiny target (+ tokenizer), built once."""
    made = {}

    def get(family="llama"):
        if family not in made:
            d = tmp_path_factory.mktemp(f"target-{family}")
            make_tiny_target(d, family, **FAMILY_SCALES[family])
            made[family] = d
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """tiny(family) -> (model, tokenizer) loaded with mlx_lm.load, fp32."""
    from mlx_lm import load

    loaded = {}

    def get(family="llama"):
        if family not in loaded:
            loaded[family] = load(str(tiny_dir(family)))
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def oracle_head(tiny):
    made = {}

    def get(family="llama"):
        if family not in made:
            made[family] = make_oracle_head(tiny(family)[0])
        return made[family]

    return get


@pytest.fixture(scope="session")
def demo_dirs(tmp_path_factory):
    """(target dir, head dir) of the tiny chat demo, built once per session for the
    chat, engine-thread and online-tuning tests."""
    from eagle3_mlx.testing import build_tiny_demo

    return build_tiny_demo(tmp_path_factory.getbasetemp() / "tiny_chat", reuse=True)


@pytest.fixture
def ready_app():
    """``async with ready_app(app, size) as pilot``: the chat app running under a
    Textual pilot with its model loaded (tests/_tui.py has the other helpers)."""
    from _tui import ready

    return ready


@pytest.fixture(scope="session")
def built_target(tmp_path_factory):
    """built_target(family, **make_tiny_target options) -> (model, tokenizer),
    built and loaded once per family and options."""
    from mlx_lm import load

    made = {}

    def get(family, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in made:
            d = tmp_path_factory.mktemp(f"target-{family}")
            make_tiny_target(d, family, **options)
            made[key] = load(str(d))
        return made[key]

    return get
