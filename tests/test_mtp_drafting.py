"""MTP drafting: the target's own multi-token-prediction module drafts chains
and trees (alone or with context n-grams) under the lossless verifier.

A random MTP module accepts little and stays lossless; an *oracle* module
(its fc reads only the next token's embedding and its layer is the identity,
so on a target with weak decoder layers it predicts what the target will say)
reaches tau well above 1 — the wiring works, not only the exactness. The
convert -> load path runs on the tiny HF checkpoints of test_mtp_module.
"""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from test_mtp_module import FAMILY_CFG, convert, write_source
from _sampling_check import first_two_tokens

from eagle3_mlx import api
from eagle3_mlx.engine import Engine
from eagle3_mlx.mtp import MTPModule
from eagle3_mlx.testing import PROMPTS, make_tiny_target

N_PROMPTS, N_TOKENS = 10, 48


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from mlx_lm import load

    d = tmp_path_factory.mktemp("qwen3_5-mtp")
    make_tiny_target(d, "qwen3_5", weight_scale=0.5, layer_scale=0.05)
    return load(str(d))


def text_args(model):
    return model.language_model.args


def oracle_mtp(model):
    args = text_args(model)
    H = args.hidden_size
    m = MTPModule(args)
    new = []
    for name, p in tree_flatten(m.parameters()):
        if "norm" in name and name.endswith("weight"):
            new.append((name, mx.ones_like(p)))
        elif name == "fc.weight":  # [normed embedding, normed hidden] -> the embedding
            new.append((name, mx.concatenate([mx.eye(H), mx.zeros((H, H))], axis=1)))
        else:
            new.append((name, mx.zeros_like(p)))
    m.load_weights(new)
    mx.eval(m.parameters())
    return m


def random_mtp(model, seed=5):
    mx.random.seed(seed)
    m = MTPModule(text_args(model))
    mx.eval(m.parameters())
    return m


def test_mtp_greedy_equals_target(target):
    model, tok = target
    plain = [tok.encode(p) for p in PROMPTS[: N_PROMPTS // 2]]
    refeed = [ids + [int(y) for y, _ in generate_step(mx.array(ids), model, max_tokens=16)] + ids
              for ids in plain]
    all_ids = plain + refeed
    refs = [[int(y) for y, _ in generate_step(mx.array(ids), model, max_tokens=N_TOKENS)]
            for ids in all_ids]
    modules = {"oracle": oracle_mtp(model), "random": random_mtp(model)}
    runs = [("oracle", "mtp", (1, 5, 6)), ("oracle", "mtp", (2, 3, 8)), ("oracle", "mtp", (4, 4, 16)),
            ("oracle", "hybrid", (2, 3, 8)), ("random", "mtp", (2, 3, 8)),
            ("random", "hybrid", (1, 4, 5))]
    taus = {}
    for name, source, tree in runs:
        eng = Engine(model, tok, mtp=modules[name], top_k=tree[0], depth=tree[1],
                     total_tokens=tree[2], draft_source=source)
        eng.tokenizer.eos_token_ids = set()
        steps = tokens = 0
        for ids, ref in zip(all_ids, refs):
            eng.reset()
            rs = list(eng.stream_generate(ids, max_tokens=N_TOKENS))
            assert [r.token for r in rs] == ref, (name, source, tree, ids)
            steps += rs[-1].steps
            tokens += rs[-1].generation_tokens
        taus[(name, source, tree)] = tokens / steps
    print("\nMTP drafting: " + "; ".join(f"{k[0]} {k[1]} {k[2]}: {N_PROMPTS}/{N_PROMPTS} equal, "
                                          f"tau {v:.2f}" for k, v in taus.items()))
    assert taus[("oracle", "mtp", (4, 4, 16))] > 2.5
    assert taus[("oracle", "mtp", (1, 5, 6))] > 1.8
    assert taus[("random", "mtp", (2, 3, 8))] < 1.3


def test_mtp_sampling_follows_target(tmp_path):
    from mlx_lm import load

    V, runs = 16, 1000
    make_tiny_target(tmp_path, "qwen3_5", tokenizer_kind="word", vocab_size=V, weight_scale=0.25)
    model, tok = load(str(tmp_path))
    eng = Engine(model, tok, mtp=oracle_mtp(model), top_k=3, depth=2, total_tokens=8,
                 draft_source="mtp")
    pv1, pv2, drafted = first_two_tokens(model, eng, [5, 9, 3, 12], V, runs, seed=99)
    print(f"\nMTP sampling: p-values {pv1:.3f}, {pv2:.3f}; second token drafted {drafted}/{runs}")
    assert pv1 > 0.01 and pv2 > 0.01
    assert 0.05 * runs < drafted < 0.95 * runs


def test_converted_model_drafts_with_its_mtp_by_default(tmp_path):
    """HF checkpoint with mtp.* -> convert (weights kept, checksummed: see
    test_mtp_module) -> load: MTP + n-grams by default, and every MTP tree
    shape equals mlx-lm's greedy decoding of the converted model."""
    from mlx_lm import load

    src, out = tmp_path / "src", tmp_path / "mlx"
    write_source(src, FAMILY_CFG["qwen3_5"])
    assert convert(src, out, "--dtype", "float32") == 0
    eng = api.load(str(out))
    assert eng.drafter == "mtp" and eng.draft_source == "hybrid"   # MTP + n-grams
    from eagle3_mlx.runs import format_stats

    last = list(eng.stream_generate(PROMPTS[0], max_tokens=4))[-1]
    assert last.drafter == "mtp" and "accepted by source mtp " in format_stats(last)
    model, _ = load(str(out))
    eng.tokenizer.eos_token_ids = set()
    prompts = [eng.encode(p) for p in PROMPTS[:4]]
    refs = [[int(y) for y, _ in generate_step(mx.array(ids), model, max_tokens=32)] for ids in prompts]
    for source, tree in [("hybrid", (2, 3, 8)), ("mtp", (1, 4, 5)), ("mtp", (2, 3, 8)),
                         ("mtp", (4, 3, 12))]:
        eng.set_tree(*tree)
        for ids, ref in zip(prompts, refs):
            eng.reset()
            assert [r.token for r in eng.stream_generate(ids, max_tokens=32, draft_source=source)] == ref
    auto = api.load(str(out), draft_source="mtp", tree="auto")   # calibrates the MTP drafter
    assert auto.drafter == "mtp" and auto.spec.num_nodes >= 2
    ids = prompts[0]
    assert [r.token for r in auto.stream_generate(ids, max_tokens=32)] == refs[0]
    with pytest.raises(ValueError, match="needs an EAGLE-3 head"):
        api.load(str(out), draft_source="eagle")


def test_mtp_source_without_mtp_weights_is_one_line(tmp_path, target):
    src, out = tmp_path / "src", tmp_path / "mlx"
    write_source(src, FAMILY_CFG["qwen3_5"], mtp=False)
    assert convert(src, out, "--dtype", "float32") == 0
    assert api.load(str(out)).drafter == "eagle" and api.load(str(out)).head is None
    with pytest.raises(ValueError) as e:
        api.load(str(out), draft_source="mtp")
    assert "\n" not in str(e.value) and "no MTP weights" in str(e.value)


def test_mtp_and_eagle_head_draft_one_tree(target):
    """An EAGLE-3 head and the MTP module together (with and without n-grams):
    greedy output equals the target's, each drafter is credited with the tokens
    it proposed, and the oracle one carries the acceptance whichever it is."""
    from eagle3_mlx.testing import make_oracle_head, make_random_head

    model, tok = target
    ids_list = [tok.encode(p) for p in PROMPTS[:4]]
    refs = [[int(y) for y, _ in generate_step(mx.array(ids), model, max_tokens=32)]
            for ids in ids_list]
    pairs = {"oracle mtp": (make_random_head(model), oracle_mtp(model)),
             "oracle head": (make_oracle_head(model), random_mtp(model))}
    got = {}
    for name, (head, mtp) in pairs.items():
        eng = Engine(model, tok, head, mtp=mtp, top_k=2, depth=3, total_tokens=8)
        assert eng.draft_source == "hybrid" and [d.name for d in eng.drafters] == ["eagle", "mtp"]
        eng.tokenizer.eos_token_ids = set()
        for source in ("hybrid", "eagle", "mtp", "ngram"):
            used, steps, tokens = {}, 0, 0
            for ids, ref in zip(ids_list, refs):
                rs = list(eng.stream_generate(ids, max_tokens=32, draft_source=source))
                assert [r.token for r in rs] == ref, (name, source, ids)
                for k, v in rs[-1].source_tokens.items():
                    used[k] = used.get(k, 0) + v
                steps += rs[-1].steps
                tokens += rs[-1].generation_tokens
            got[(name, source)] = (used, tokens / steps)
    print("\nhead + MTP: " + "; ".join(f"{k}: tau {t:.2f} {u}" for k, (u, t) in got.items()))
    from eagle3_mlx.hybrid import from_model

    def credited(used, drafter):
        return sum(v for k, v in used.items() if drafter in k.split("+") or
                   (k in ("both", "all") and drafter == "eagle") or (k == "all" and drafter == "mtp"))

    used, tau = got[("oracle mtp", "hybrid")]
    assert credited(used, "mtp") > 2 * credited(used, "eagle") and tau > 1.8
    used, tau = got[("oracle head", "hybrid")]
    assert credited(used, "eagle") > 2 * credited(used, "mtp") and tau > 1.8
    assert set(got[("oracle head", "eagle")][0]) >= {"eagle", "mtp", "both"}   # one label set per engine
    assert not any(v for k, v in got[("oracle head", "mtp")][0].items() if k != "mtp")
    assert not any(v for k, v in got[("oracle mtp", "ngram")][0].items() if from_model(k))
