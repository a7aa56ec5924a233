"""Speculation over a target sharded with mlx.launch (ring backend, 2 ranks on
127.0.0.1): greedy output equals the unsharded model's greedy decoding for a
chain, a tree and a hybrid tree on llama and qwen3_moe; sampled tokens agree
on both ranks; only rank 0 writes the CLI's answer; a killed rank ends the
launch with one error line. Outside a launch nothing changes.

Run as a script, this file is the per-rank program (``rank`` below).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH = BIN / "mlx.launch"
PROMPT = [5, 17, 42, 99, 7, 3, 61]
N = 24
# Greedy cases: (name, draft source, tree); the engine drafts with an oracle head.
CASES = [("chain", "eagle", (1, 4, 4)), ("tree", "eagle", (3, 3, 8)), ("hybrid", "hybrid", (2, 3, 6))]
FAMILIES = {"llama": dict(weight_scale=0.5, layer_scale=0.02),
            "qwen3_moe": dict(weight_scale=0.5, layer_scale=0.02)}

pytestmark = pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch is not installed")


# --------------------------------------------------------------------------- the rank program


def rank(out_dir: str, *model_dirs: str):
    """One rank: for each target, an oracle-headed engine on the sharded model;
    each case's tokens, and the calibrated tree, go to out_dir/rank{R}.json."""
    from mlx_lm import load

    from eagle3_mlx import distributed
    from eagle3_mlx.engine import Engine
    from eagle3_mlx.runs import collect
    from eagle3_mlx.testing import make_oracle_head

    assert distributed.init() is not None, "not launched with 2 ranks"
    distributed.seed_alike()
    out = {}
    for model_dir in model_dirs:
        model, tok = load(model_dir)
        head = make_oracle_head(model, every=5)   # before sharding: the bigram table is the full model's
        engine = Engine(model, tok, head, draft_source="hybrid")
        distributed.shard(engine)
        res = out[Path(model_dir).name] = {}
        for name, source, (k, d, n) in CASES:
            engine.set_tree(top_k=k, depth=d, total_tokens=n)
            run = collect(engine.stream_generate(list(PROMPT), max_tokens=N, draft_source=source))
            res[name] = {"tokens": run.tokens, "steps": run.steps}
        engine.set_tree(top_k=2, depth=3, total_tokens=6)
        # No seed given: the ranks agree because every RNG was seeded alike.
        run = collect(engine.stream_generate(list(PROMPT), max_tokens=N, temp=1.0, draft_source="hybrid"))
        res["sampled"] = {"tokens": run.tokens}
        run = collect(engine.stream_generate(list(PROMPT), max_tokens=N, temp=0.8, top_p=0.9, seed=11))
        res["seeded"] = {"tokens": run.tokens}
    # --tree auto: every rank measures in lockstep; all take rank 0's calibration.
    cal = distributed.calibration(engine, quick=True, directory=Path(out_dir, "cal"), reps=1)
    s = cal.spec
    out["auto"] = {"spec": [s.top_k, s.depth, s.total_tokens], "verify_ms": {str(k): v for k, v in cal.costs.verify_ms.items()}}
    Path(out_dir, f"rank{distributed.rank()}.json").write_text(json.dumps(out))


# --------------------------------------------------------------------------- helpers


def _env():
    # One BLAS thread a rank: two ranks share the two cores without oversubscribing.
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    env.setdefault("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
    if not Path(env["LD_PRELOAD"]).exists():
        env.pop("LD_PRELOAD")
    return env


_port = [33000 + (os.getpid() % 500) * 8]


def _launch(*cmd, timeout=60, **kw):
    """mlx.launch -n 2 --backend ring on 127.0.0.1 (a fresh port pair per launch)."""
    _port[0] += 4
    args = [str(LAUNCH), "-n", "2", "--backend", "ring", "--hosts", "127.0.0.1",
            "--starting-port", str(_port[0]), "--", *map(str, cmd)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT, **kw)


def _greedy(model_dir, n=N):
    """The unsharded mlx-lm model's own greedy decoding."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(model_dir))
    return [int(y) for y, _ in generate_step(mx.array(PROMPT), model, max_tokens=n)]


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    from eagle3_mlx.testing import make_tiny_target

    root = tmp_path_factory.mktemp("dist")
    return {f: make_tiny_target(root / f, f, **kw) for f, kw in FAMILIES.items()}


# --------------------------------------------------------------------------- tests


def test_sharded_speculation_is_lossless_and_ranks_agree(targets, tmp_path):
    r = _launch(sys.executable, __file__, "rank", tmp_path, *targets.values(), timeout=120)
    assert r.returncode == 0 and "WARN" not in r.stderr, r.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0] == ranks[1]          # same trees, acceptance, draws and calibrated tree
    for family, path in targets.items():
        res, want = ranks[0][family], _greedy(path)
        for name, *_ in CASES:
            assert res[name]["tokens"] == want, (family, name)
            assert res[name]["steps"] < N, (family, name)    # drafts were accepted: trees verified
        assert len(res["sampled"]["tokens"]) == len(res["seeded"]["tokens"]) == N
    assert len(ranks[0]["auto"]["spec"]) == 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from eagle3_mlx.testing import build_tiny_demo

    return build_tiny_demo(tmp_path_factory.mktemp("demo"))


def _generate(target, head, *extra):
    return [BIN / "eagle3-mlx", "generate", "--model", target, "--draft", head, "--prompt", "hello there",
            "--ignore-chat-template", "--tree", "2,3,6", *extra]


def test_cli_generate_rank0_writes_the_answer_once(demo):
    target, head = demo
    one = subprocess.run(list(map(str, _generate(target, head, "-m", "16"))), capture_output=True,
                         text=True, timeout=60, env=_env(), cwd=ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    r = _launch(*_generate(target, head, "-m", "16"))
    assert "WARN" not in r.stderr, r.stderr[-2000:]
    assert r.stdout == one.stdout                       # the answer once, as unsharded
    assert r.stderr.count("draft tree:") == 1 and "Sharding the target over 2 ranks" in r.stderr


def test_commands_that_cannot_run_sharded_refuse_in_one_line(monkeypatch, capsys):
    from eagle3_mlx import cli

    monkeypatch.setenv("MLX_RANK", "0")        # as under mlx.launch; refused before joining any group
    assert cli.main(["serve", "--model", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "serve does not run under mlx.launch yet" in err[0]


def test_a_missing_rank_ends_with_one_line_not_a_hang(demo, tmp_path):
    """Rank 0 started alone (its peer never comes): the watchdog ends it."""
    target, head = demo
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:%d" % (_port[0] + 1000)], ["127.0.0.1:%d" % (_port[0] + 1001)]]))
    env = dict(_env(), MLX_HOSTFILE=str(hosts), MLX_RANK="0", EAGLE3_MLX_DIST_TIMEOUT="2")
    t0 = time.time()
    r = subprocess.run(list(map(str, _generate(target, head))), capture_output=True, text=True, timeout=30,
                       env=env, cwd=ROOT)
    assert time.time() - t0 < 20 and r.returncode != 0
    assert "rank 0: joining the distributed group did not finish within 2 s" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's pid in /proc")
def test_a_killed_rank_ends_the_launch_with_an_error_line(demo):
    """SIGKILL rank 1 once generation runs: the launch ends within the bound
    and rank 0 (or the launcher) says why."""
    target, head = demo
    _port[0] += 4
    args = [str(LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(_port[0]), "--",
            *map(str, _generate(target, head, "-m", "100000"))]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                         cwd=ROOT, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in p.stderr], daemon=True).start()
    seen, t_end = [], time.time() + 45
    try:
        while not any("draft tree:" in ln for ln in seen) and time.time() < t_end:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        assert any("draft tree:" in ln for ln in seen), "".join(seen)
        time.sleep(1.0)                                  # mid-generation
        os.kill(_rank_pid(p.pid, 1), signal.SIGKILL)
        t0 = time.time()
        p.wait(timeout=30)
        took = time.time() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    while not lines.empty():
        seen.append(lines.get())
    text = "".join(seen)
    assert took < 30
    assert "rank 1 exited with code -9" in text or "eagle3-mlx: error: rank 0" in text, text[-2000:]


def _rank_pid(launcher: int, r: int) -> int:
    """The pid of rank ``r`` among the launcher's children (Linux /proc)."""
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"MLX_RANK={r}".encode() in env:
                return int(pid)
    raise AssertionError(f"rank {r} not found under {launcher}")


def test_nothing_changes_outside_a_launch(monkeypatch):
    from eagle3_mlx import distributed

    for k in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not distributed.launched() and distributed.setup("serve") is None
    assert distributed.group() is None and distributed.init() is None


def test_families_without_a_usable_shard_are_refused_by_name():
    import types

    from eagle3_mlx import distributed

    gemma = types.SimpleNamespace(model_type="gemma3_text", args=None)
    assert "'gemma3_text' cannot run sharded" in distributed.shard_problem(gemma)
    hybrid = types.SimpleNamespace(model_type="qwen3_5", shard=lambda g: None)
    assert "'qwen3_5' cannot run sharded" in distributed.shard_problem(hybrid)
    assert distributed.shard_problem(types.SimpleNamespace(model_type="qwen3_moe")) is None


if __name__ == "__main__" and sys.argv[1:2] == ["rank"]:
    rank(*sys.argv[2:])
