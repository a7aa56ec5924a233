import os
import tempfile

import mlx.core as mx
import pytest

from eagle3_mlx.head import Eagle3Head
from eagle3_mlx.target import TargetModel
from eagle3_mlx.testing import make_random_head, make_tiny_target

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


class OracleHead(Eagle3Head):
    """A head made to agree with the target often: on tokens with
    ``token % every != 0`` its draft is forced to the target's context-free
    next-token guess; elsewhere it drafts from its random weights."""

    def __call__(self, embeddings, hidden, cache=None, mask=None, positions=None, from_target=None,
                 logits_rows=None):
        out, logits = super().__call__(embeddings, hidden, cache, mask, positions, from_target,
                                       logits_rows)
        if logits_rows is not None:
            embeddings = embeddings[:, logits_rows]
        E = self._table
        d = ((embeddings[..., None, :] - E) ** 2).sum(-1)
        tok = mx.argmin(d, axis=-1)
        nxt = self._bigram[tok]
        force = (tok % self._every) != 0
        onehot = (mx.arange(logits.shape[-1]) == nxt[..., None]).astype(logits.dtype) * 40.0
        return out, mx.where(force[..., None], onehot + 0.01 * logits, logits)


def make_oracle_head(model, every=8, seed=3):
    t = TargetModel(model)
    base = make_random_head(model, seed=seed)
    head = OracleHead(base.config)
    head.update(base.parameters())
    V = t.vocab_size
    logits, _ = t.forward(mx.arange(V)[:, None], None)
    object.__setattr__(head, "_table", t.embed_tokens(mx.arange(V)))
    object.__setattr__(head, "_bigram", mx.argmax(logits[:, -1], axis=-1))
    object.__setattr__(head, "_every", every)
    mx.eval(head._table, head._bigram)
    return head


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
