"""Calibration: the optimiser on synthetic cost curves, the acceptance model,
teacher-forced rank measurement, the per-machine cache and the CLI helper."""

import json

import mlx.core as mx
import pytest

from eagle3_mlx import testing
from eagle3_mlx.tree import TreeSpec
from eagle3_mlx.tuning.acceptance import AcceptanceModel
from eagle3_mlx.tuning.cache import (Calibration, cache_dir, cache_path, calibration_key, key_digest,
                                     load_calibration, model_identity, save_calibration)
from eagle3_mlx.tuning.choose import calibrate, parse_tree, resolve_tree
from eagle3_mlx.tuning.costs import CostModel, ext_cost, fit_draft_costs, monotone
from eagle3_mlx.tuning.measure import _target_to_draft, measure_acceptance, measure_ranks, QUICK
from eagle3_mlx.tuning.optimise import evaluate, optimise
from eagle3_mlx.tuning.report import format_report
from eagle3_mlx.tuning.tuner import make_tuner, OnlineTuner

WIDTHS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def good_head_acceptance(levels=9, ranks=8):
    """A decent trained head: top-1 ~0.7, a few percent at ranks 2-4."""
    q = []
    for j in range(levels):
        t1 = 0.72 * 0.97**j
        q.append([t1] + [0.08 * 0.55**r for r in range(ranks - 1)])
    return AcceptanceModel(q=q)


def draft_costs(a=1.0, b=0.4):
    return {k: (a, b * (1 + 0.05 * k)) for k in (1, 2, 3, 4, 6, 8)}


def free_verify():
    """A big GPU: 64 tokens cost about as much as one."""
    return CostModel({T: 20.0 + 0.02 * T for T in WIDTHS}, draft_costs())


def cpu_verify():
    """A small CPU: every extra verified token costs 60% of a decode step."""
    return CostModel({T: 20.0 * (1 + 0.6 * (T - 1)) for T in WIDTHS}, draft_costs())


def test_free_verify_picks_wider_deeper_tree_than_linear_cpu_cost():
    acc = good_head_acceptance()
    gpu, _ = optimise(free_verify(), acc)
    cpu, _ = optimise(cpu_verify(), acc)
    assert gpu.spec.num_nodes > cpu.spec.num_nodes
    assert gpu.spec.depth >= cpu.spec.depth
    assert gpu.spec.num_nodes >= 24          # uses a big tree when verification is free
    assert cpu.spec.num_nodes <= 8           # stays small when every token costs
    assert gpu.tau > cpu.tau
    # Both beat plain decoding with a good head.
    assert gpu.speedup > 1.5 and cpu.speedup > 1.0


def test_optimiser_returns_the_argmax_of_its_candidates():
    costs, acc = cpu_verify(), good_head_acceptance()
    best, cands = optimise(costs, acc)
    top = max(c.tps for c in cands)
    assert best.tps >= top * (1 - 0.005)
    assert cands[0].tps == top
    # Candidate numbers agree with evaluate() on the same tree.
    again = evaluate(best.spec, costs, acc)
    assert again.tau == pytest.approx(best.tau)
    assert again.tps == pytest.approx(best.tps)
    assert best.speedup == pytest.approx(best.tps * costs.baseline_ms / 1000)


def test_useless_head_gets_the_smallest_tree():
    acc = AcceptanceModel(q=[[0.0] * 8 for _ in range(9)])
    best, _ = optimise(free_verify(), acc)
    assert best.spec.num_nodes == 2 and best.spec.depth == 1
    assert best.tau == pytest.approx(1.0)


def test_confident_top1_head_prefers_a_chain_on_cpu():
    q = [[0.9] + [0.002] * 7 for _ in range(9)]
    best, _ = optimise(cpu_verify(), AcceptanceModel(q=q))
    assert best.spec.top_k == 1
    assert best.spec.num_nodes >= 3


def test_tau_curve_product_model():
    # One level, chain: tau = 1 + q1.
    acc = AcceptanceModel(q=[[0.5, 0.2], [0.4, 0.1]])
    assert acc.expected_tau(TreeSpec(1, 1, 2)) == pytest.approx(1.5)
    # Chain of two: 1 + 0.5 + 0.5*0.4
    assert acc.expected_tau(TreeSpec(1, 1, 3)) == pytest.approx(1.7)
    # top_k 2, keep the 3 best nodes: r1 (0.5), r1r1 (0.2), r2 (0.2)
    assert acc.expected_tau(TreeSpec(2, 1, 4)) == pytest.approx(1.9)
    # rho scales the gain
    acc.rho = 0.5
    assert acc.expected_tau(TreeSpec(1, 1, 2)) == pytest.approx(1.25)


def test_tau_curve_from_samples_is_the_mean_accepted_length():
    # 60 positions: 30 accept ranks (1,1), 20 accept (2,), 10 accept nothing.
    seqs = [[1, 1]] * 30 + [[2]] * 20 + [[]] * 10
    acc = AcceptanceModel.from_rank_sequences(seqs, levels=3, max_rank=4)
    assert len(acc.samples) == 60
    assert acc.q[0][0] == pytest.approx(30 / 60, abs=0.02)
    # chain of 2 drafts: 30 samples accept 2 tokens
    assert acc.expected_tau(TreeSpec(1, 1, 3)) == pytest.approx(1 + 60 / 60)
    # top_k 2, all nodes: also the rank-2 ones
    assert acc.expected_tau(TreeSpec(2, 1, 7)) == pytest.approx(1 + (60 + 20) / 60)


def test_cost_model_interpolates_and_roundtrips():
    c = CostModel({1: 10, 4: 16, 8: 30}, {1: (1, 1), 4: (2, 3)}, overhead_ms=0.5)
    assert c.verify(2) == pytest.approx(12)
    assert c.verify(6) == pytest.approx(23)
    assert c.draft(2, 3) == pytest.approx((1 + 1 / 3) + (1 + 2 / 3) * 3)
    assert c.step(1, 1, 4) == pytest.approx(2 + 16 + 0.5)
    c2 = CostModel.from_dict(json.loads(json.dumps(c.to_dict())))
    assert c2.verify(6) == pytest.approx(c.verify(6)) and c2.draft(4, 2) == pytest.approx(c.draft(4, 2))
    # Extending the head's cache by the committed tokens costs per token.
    c.ext_ms = 2.0
    assert c.step(1, 1, 4, tau=3.0) == pytest.approx(2 + 4 + 16 + 0.5)
    assert CostModel.from_dict(c.to_dict()).ext_ms == 2.0
    assert ext_cost({("ext", 1): 10.0, ("ext", 8): 24.0, (1, 1): 10.0}) == pytest.approx(2.0)


def test_monotone_fit():
    assert monotone({1: 5, 2: 3, 4: 6, 8: 5, 16: 9}) == {1: 4, 2: 4, 4: 5.5, 8: 5.5, 16: 9}


def test_parse_tree():
    assert parse_tree("auto") is None
    s = parse_tree("4,5,24")
    assert (s.top_k, s.depth, s.total_tokens) == (4, 5, 24)
    with pytest.raises(ValueError):
        parse_tree("4,5")


# ---------------------------------------------------------------------------- MLX


@pytest.fixture(scope="module")
def model_tok_head(tmp_path_factory):
    """(model, tokenizer, head): a tiny qwen2 target in float32 and a random head for it."""
    d = tmp_path_factory.mktemp("tiny")
    testing.make_tiny_target(d, "qwen2", tokenizer_kind="word", vocab_size=48)
    model, tok = testing.load_tiny_target(d)
    testing.to_float32(model)
    head = testing.make_random_head(model, draft_vocab_size=40)
    return model, tok, head


def test_teacher_forced_ranks_match_sequential_drafting(model_tok_head):
    """The batched rank measurement equals drafting one root at a time the way
    tree.py does (stable cache up to the root, chain rows, RoPE positions)."""
    model, tok, head = model_tok_head
    from eagle3_mlx.target import TargetModel

    t = TargetModel(model, head.config.aux_layer_ids)
    prompt = [5, 9, 11, 7, 20, 21]
    cont = [3 + (7 * i) % 45 for i in range(12)]
    levels, maxr = 3, 40
    got = measure_ranks(t, head, prompt, cont, levels=levels, max_rank=maxr)
    x = mx.array(prompt + cont)
    S = x.shape[0]
    _, feats = t.forward(x[None], t.make_cache())
    embed = lambda ids: head.embed(ids, t.embed_tokens)  # noqa: E731
    t2d = _target_to_draft(head, t.vocab_size)

    def rank(lg, tokid):
        d = int(t2d[tokid].item())
        if d < 0:
            return maxr + 1
        lg = lg.astype(mx.float32)
        return int((lg > lg[d]).sum().item()) + 1

    want = []
    for n in range(len(prompt), S - levels):
        dc = head.make_cache()
        out, lg = head(embed(x[None, 1 : n + 1]), feats[:, :n], cache=dc, mask="causal", from_target=True)
        h = out[:, -1:]
        rs = [rank(lg[0, -1], int(x[n + 1].item()))]
        for i in range(1, levels):
            mask = mx.ones((1, n + i), dtype=mx.bool_)
            h, lg = head(embed(x[None, n + i : n + i + 1]), h, cache=dc, mask=mask, positions=n + i - 1,
                         from_target=False)
            rs.append(rank(lg[0, -1], int(x[n + i + 1].item())))
        s = []
        for r in rs:
            if r > maxr:
                break
            s.append(r)
        want.append(s)
    assert got == want
    assert len(got) == len(cont) - levels


def test_calibrate_end_to_end_and_cache(model_tok_head, tmp_path):
    from eagle3_mlx.engine import Engine

    model, tok, head = model_tok_head
    eng = Engine(model, tok, head, top_k=2, depth=2, total_tokens=6)
    cal = calibrate(eng, quick=True, directory=tmp_path)
    assert (eng.spec.top_k, eng.spec.depth, eng.spec.total_tokens) == (2, 2, 6)   # restored
    spec = cal.spec
    assert 2 <= spec.num_nodes <= max(QUICK["widths"])
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    rec = json.loads(files[0].read_text())
    for field in ("key", "costs", "acceptance", "choice"):
        assert field in rec
    assert set(rec["key"]) >= {"model", "head", "quantization", "device", "mlx"}
    # Cached: a second call loads instead of measuring.
    again = calibrate(eng, quick=True, directory=tmp_path)
    assert again.created == cal.created
    # resolve_tree: explicit trees pass through, auto uses the cache.
    assert resolve_tree(eng, "3,2,8").total_tokens == 8
    s = resolve_tree(eng, "auto", directory=tmp_path)
    assert (s.top_k, s.depth, s.num_nodes) == (spec.top_k, spec.depth, spec.num_nodes)
    # The report renders.
    assert "chosen tree" in format_report(cal)


def test_cache_invalidated_when_model_quantization_device_or_mlx_change(model_tok_head, tmp_path):
    import mlx.nn as nn

    from eagle3_mlx.api import cast_floating

    model, tok, head = model_tok_head
    dev = {"backend": "cpu", "device_name": "test", "cpu": "x", "cpu_count": 2, "blas": "openblas"}
    key = calibration_key(model, head, device=dev, mlx_version="0.32.4")
    costs = CostModel({1: 1.0, 2: 1.2, 4: 1.5}, {1: (0.1, 0.1)})
    acc = AcceptanceModel(q=[[0.5]])
    save_calibration(Calibration(key=key, costs=costs, acceptance=acc), tmp_path)
    assert load_calibration(key, tmp_path) is not None
    assert load_calibration(calibration_key(model, head, device=dev, mlx_version="0.32.4"),
                              tmp_path) is not None

    # mlx version
    assert load_calibration(calibration_key(model, head, device=dev, mlx_version="0.33.0"),
                              tmp_path) is None
    # device (another backend, another BLAS)
    for change in ({"backend": "metal"}, {"blas": "default"}, {"device_name": "Apple M4"}):
        assert load_calibration(calibration_key(model, head, device={**dev, **change},
                                                    mlx_version="0.32.4"), tmp_path) is None
    # model: another checkpoint of the same architecture
    d2 = tmp_path / "other"
    testing.make_tiny_target(d2, "qwen2", tokenizer_kind="word", vocab_size=48, seed=7)
    other, _ = testing.load_tiny_target(d2)
    testing.to_float32(other)
    assert model_identity(other)["digest"] != model_identity(model)["digest"]
    assert load_calibration(calibration_key(other, head, device=dev, mlx_version="0.32.4"),
                              tmp_path) is None
    # head
    head2 = testing.make_random_head(model, draft_vocab_size=40, seed=9)
    assert load_calibration(calibration_key(model, head2, device=dev, mlx_version="0.32.4"),
                              tmp_path) is None
    # quantization: dtype and weight quantization
    other16, _ = testing.load_tiny_target(d2)
    cast_floating(other16, "bfloat16")
    k16 = calibration_key(other16, head, device=dev, mlx_version="0.32.4")
    assert k16["quantization"].startswith("bfloat16")
    qm, _ = testing.load_tiny_target(d2)
    nn.quantize(qm, group_size=32, bits=4)
    kq = calibration_key(qm, head, device=dev, mlx_version="0.32.4")
    assert kq["quantization"].startswith("q4g32")
    assert key_digest(kq) != key_digest(k16)
    # A file whose stored key does not match exactly is ignored.
    p = cache_path(key, tmp_path)
    rec = json.loads(p.read_text())
    rec["key"]["mlx"] = "other"
    p.write_text(json.dumps(rec))
    assert load_calibration(key, tmp_path) is None


def test_cache_dir_follows_eagle3_mlx_home(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE3_MLX_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "calibration"
    monkeypatch.delenv("EAGLE3_MLX_HOME")
    assert cache_dir().parts[-2:] == ("eagle3-mlx", "calibration")


def test_online_tuner_lowers_rho_and_shrinks_tree(tmp_path):
    class FakeEngine:
        def __init__(self, spec):
            self.spec = spec

        def set_tree(self, top_k, depth, total_tokens):
            self.spec = TreeSpec(top_k, depth, total_tokens)

    class R:
        speculative = True
        new_step = True

        def __init__(self, i, n):
            self.step_index, self.step_tokens = i, n

    acc = good_head_acceptance()
    costs = CostModel({T: 20.0 * (1 + 0.08 * (T - 1)) for T in WIDTHS}, draft_costs())
    cal = Calibration(key={"model": {"model_type": "x", "digest": "0"}}, costs=costs, acceptance=acc)
    best, _ = cal.pick()
    eng = FakeEngine(best.spec)
    tuner = OnlineTuner(eng, cal, every=20, directory=tmp_path)
    for i in range(1, 41):          # the head does much worse live: tau 1.1
        tuner.observe(R(i, 2 if i % 10 == 0 else 1))
    new = tuner.maybe_retune()
    assert acc.rho < 0.5
    assert best.spec.num_nodes >= 4
    assert new is not None and new.num_nodes < best.spec.num_nodes
    assert eng.spec.num_nodes == new.num_nodes
    assert list(tmp_path.glob("*.json"))     # rho persisted


def test_draft_cost_fit_is_joint_and_non_negative():
    # ms = 2 + d * (1 + 0.5 k), plus one noisy point
    raw = {(k, d): 2 + d * (1 + 0.5 * k) for k in (1, 2, 4, 8) for d in (1, 3, 6)}
    fit = fit_draft_costs(raw)
    for k in (1, 2, 4, 8):
        assert fit[k][0] == pytest.approx(2, abs=1e-6)
        assert fit[k][1] == pytest.approx(1 + 0.5 * k, abs=1e-6)
    raw[(4, 1)] = 0.1        # noise cannot reorder top_k: cost still grows with k
    fit = fit_draft_costs(raw)
    assert all(v[0] >= 0 and v[1] >= 0 for v in fit.values())
    assert fit[1][1] <= fit[2][1] <= fit[4][1] <= fit[8][1]


def test_make_tuner_uses_the_cache_only(model_tok_head, tmp_path):
    from eagle3_mlx.engine import Engine

    model, tok, head = model_tok_head
    eng = Engine(model, tok, head)
    assert make_tuner(eng, directory=tmp_path) is None
    calibrate(eng, quick=True, directory=tmp_path)
    t = make_tuner(eng, directory=tmp_path)
    assert isinstance(t, OnlineTuner)


def test_this_cpu_measured_costs_vs_a_gpu_like_machine():
    """The cost curves measured on the 2-core Linux CPU (committed under
    benchmarks/) against a simulated GPU where verifying 64 tokens costs about
    as much as one and a draft level is cheap: with the same (good) head the
    GPU gets a much bigger tree."""
    from pathlib import Path

    rec_path = Path(__file__).parent.parent / "benchmarks" / \
        "calibration-linux-cpu-qwen2.5-coder-0.5b-random-head.json"
    if not rec_path.exists():
        pytest.skip("no committed CPU calibration")
    cpu = CostModel.from_dict(json.loads(rec_path.read_text())["costs"])
    t1 = cpu.verify(1)
    gpu = CostModel({T: t1 * (1 + 0.002 * (T - 1)) for T in cpu.verify_ms},
                      {k: (0.02 * t1, 0.01 * t1) for k in cpu.draft_ms}, decode_ms=t1)
    acc = good_head_acceptance()
    c, _ = optimise(cpu, acc)
    g, _ = optimise(gpu, acc)
    assert (g.spec.top_k, g.spec.depth, g.spec.num_nodes) != (c.spec.top_k, c.spec.depth, c.spec.num_nodes)
    assert g.spec.num_nodes >= 2 * c.spec.num_nodes
    assert g.spec.depth > c.spec.depth


def test_expected_tau_matches_the_engine(tiny, oracle_head):
    """Acceptance measured teacher-forced predicts the tau the engine really
    gets, for chains and trees (oracle head: long, streaky acceptances)."""
    from eagle3_mlx.engine import Engine
    from eagle3_mlx.prompts import calibration_prompts

    model, tok = tiny("llama")
    # the calibration models the head's acceptance: compare with head-only drafting
    eng = Engine(model, tok, oracle_head("llama"), draft_source="eagle")
    prompts = calibration_prompts(2)
    acc, _ = measure_acceptance(eng, prompts, max_tokens=48, levels=9)
    assert acc.has_runs and acc.top1_rates()[0] > 0.5
    for shape in [(1, 1, 3), (1, 6, 8), (2, 2, 6), (4, 4, 16), (8, 6, 48)]:
        spec = TreeSpec(*shape)
        eng.set_tree(*shape)
        toks = steps = 0
        for p in prompts:
            eng.reset()
            for r in eng.stream_generate([{"role": "user", "content": p}], max_tokens=48):
                if r.new_step and r.step_index >= 1:
                    steps += 1
                    toks += r.step_tokens
        measured = toks / steps
        assert acc.expected_tau(spec) == pytest.approx(measured, rel=0.12), shape


def test_cost_model_and_optimiser_import_no_mlx():
    """The cost model, acceptance model, optimiser and tree shape are pure
    Python: none of their imports (at the top or inside functions) is MLX."""
    import ast
    from pathlib import Path

    import eagle3_mlx

    root = Path(eagle3_mlx.__file__).parent
    for rel in ("tuning/costs.py", "tuning/acceptance.py", "tuning/optimise.py", "treespec.py"):
        tree = ast.parse((root / rel).read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in names if m.split(".")[0] in ("mlx", "mlx_lm")], (rel, names)
        # and within the package they import only each other
        relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
        assert relative <= {"treespec", "costs", "acceptance"}, (rel, relative)
