"""Sharded plain decoding vs sharded speculation, same run, 2 local ranks over
the ring backend (docs/distributed.md).

    python scripts/distributed_bench.py [--model M --draft H] [--limit 3] [--max-tokens 64]
        [--tree auto|K,D,N] [--out benchmarks/distributed-linux-cpu.txt]

Started outside a launch it starts two ranks on 127.0.0.1 over the ring
backend, one BLAS thread each: directly, with the environment mlx.launch sets
(default), or through ``mlx.launch`` (``--launcher mlx``), whose output loop
keeps a core busy. Rank 0 writes the table. Per
prompt: greedy plain decoding, then speculation, on the same sharded target
(tokens must match); tokens/s = (tokens - 1) / decode seconds, tau = tokens /
target forwards. It also times what rank-0 drafting would add: one broadcast
of the tree (tokens + parents) per step, against the replicated drafting every
rank does anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target (default: the default model with its head)")
    p.add_argument("--draft", default=None)
    p.add_argument("--limit", type=int, default=3, help="mtbench prompts (default 3)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tree", default="auto", help="'auto' (quick calibration under sharding) or K,D,N")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "distributed-linux-cpu.txt"))
    p.add_argument("--port", type=int, default=32323, help="first ring port")
    p.add_argument("--launcher", choices=("direct", "mlx"), default="direct",
                   help="direct: start the two ranks here with the environment mlx.launch sets "
                        "(MLX_HOSTFILE, MLX_RANK); mlx: through mlx.launch, whose output loop keeps a "
                        "core busy (on 2 cores it slows every all-reduce about 40x)")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    return p.parse_args(argv)


def launch(argv) -> int:
    """Run this script under mlx.launch -n 2 --backend ring on 127.0.0.1."""
    args = parse(argv)
    if args.model is None:   # assemble the default model once, before two ranks race for it
        from eagle3_mlx.entry import resolve_target

        resolve_target(None, args.draft)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    if args.launcher == "direct":
        # What mlx.launch --backend ring does on one host, without its output loop.
        hosts = json.dumps([[f"127.0.0.1:{args.port}"], [f"127.0.0.1:{args.port + 1}"]])
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(hosts)
        ranks = [subprocess.Popen([sys.executable, __file__, *argv],
                                  env=dict(env, MLX_HOSTFILE=f.name, MLX_RANK=str(r))) for r in (0, 1)]
        codes = [p.wait() for p in ranks]
        os.unlink(f.name)
        return max(codes, key=abs)
    cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring",
           "--hosts", "127.0.0.1", "--starting-port", str(args.port), "--",
           sys.executable, __file__, *argv]
    return subprocess.run(cmd, env=env).returncode


LAUNCHERS = {
    "direct": "{size} local ranks, ring backend over 127.0.0.1, started directly with MLX_HOSTFILE/MLX_RANK",
    "mlx": "mlx.launch -n {size} --backend ring --hosts 127.0.0.1 (its output loop keeps one core busy)",
}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown CPU").strip()
    return f"{name}, {fields.get('CPU(s)', '?').strip()} CPUs"


def broadcast_ms(n_nodes: int, reps: int = 50) -> float:
    """Median ms of broadcasting one tree (tokens + parents, int32) from rank 0."""
    import mlx.core as mx

    from eagle3_mlx import distributed

    x = mx.arange(2 * n_nodes, dtype=mx.int32)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        distributed.broadcast_ints(x.tolist())
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def rank_main(argv) -> int:
    from eagle3_mlx import distributed
    from eagle3_mlx.entry import EngineOptions, load_engine, resolve_target
    from eagle3_mlx.prompts import load_prompts
    from eagle3_mlx.runs import collect

    args = parse(argv)
    if distributed.setup("bench"):
        return 2
    size = distributed.group().size()
    t_load = time.perf_counter()
    target = resolve_target(args.model, args.draft)
    # Measured afresh: a cached calibration may come from another link or launcher.
    quick = {"quick": True, "force": True} if args.tree == "auto" else {}
    engine = load_engine(EngineOptions(dtype="float32", tree=args.tree, tree_kw=quick), target)
    t_load = time.perf_counter() - t_load
    rows = []
    for p in load_prompts("mtbench", limit=args.limit):
        msgs = [{"role": "user", "content": p.turns[0]}]
        plain = collect(engine.stream_generate(msgs, max_tokens=args.max_tokens, speculative=False))
        spec = collect(engine.stream_generate(msgs, max_tokens=args.max_tokens))
        rows.append((p.category, plain, spec))
    bcast = broadcast_ms(engine.spec.num_nodes)
    if distributed.is_main():
        text = report(args, rows, engine, target, size, t_load, bcast)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a" if args.append else "w") as f:
            f.write(("\n" if args.append else "") + text)
        print(text)
    return 0


def _tps(run) -> float:
    return (len(run.tokens) - 1) / run.decode_s if run.decode_s > 0 else 0.0


def report(args, rows, engine, target, size, t_load, bcast) -> str:
    import mlx.core as mx
    import mlx_lm

    spec = engine.spec
    lines = [
        "# Sharded plain decoding vs sharded speculation, one run",
        f"machine : {cpu_name()}; MLX CPU backend; mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}",
        f"launch  : {LAUNCHERS[args.launcher].format(size=size)}; OPENBLAS_NUM_THREADS=1 a rank",
        f"command : python scripts/distributed_bench.py {' '.join(sys.argv[1:])}".rstrip(),
        f"model   : {target.model} ({engine.target.model_type}, {engine.target.num_layers} layers, float32), "
        f"draft {target.draft}, tensor parallel over {size} ranks",
        f"tree    : {spec.top_k},{spec.depth},{spec.num_nodes} ({'auto, quick calibration measured in this run' if args.tree == 'auto' else 'fixed'}), "
        f"draft source {engine.draft_source}; greedy; max_tokens {args.max_tokens}; load+shard+tree {t_load:.0f} s",
        "",
        f"{'category':<12} {'tokens':>6} {'plain t/s':>9} {'spec t/s':>8} {'tau':>5} {'speedup':>7} {'same':>5}",
    ]
    tot = {"n": 0, "pt": 0.0, "st": 0.0, "steps": 0, "same": 0, "draft": 0.0, "sp_steps": 0}
    for cat, plain, sp in rows:
        same = plain.tokens == sp.tokens
        tau = len(sp.tokens) / max(sp.steps, 1)
        lines.append(f"{cat:<12} {len(sp.tokens):>6} {_tps(plain):>9.2f} {_tps(sp):>8.2f} {tau:>5.2f} "
                     f"{_tps(sp) / max(_tps(plain), 1e-9):>6.2f}x {'yes' if same else 'NO':>5}")
        tot["n"] += len(sp.tokens)
        tot["pt"] += plain.decode_s
        tot["st"] += sp.decode_s
        tot["steps"] += sp.steps
        tot["same"] += same
        tot["draft"] += sp.draft_ms
    k = len(rows)
    p_tps, s_tps = (tot["n"] - k) / tot["pt"], (tot["n"] - k) / tot["st"]
    lines += [
        "-" * 60,
        f"{'overall':<12} {tot['n']:>6} {p_tps:>9.2f} {s_tps:>8.2f} {tot['n'] / max(tot['steps'], 1):>5.2f} "
        f"{s_tps / p_tps:>6.2f}x {tot['same']:>3}/{k}",
        "",
        "Drafting: replicated (every rank drafts the same tree) vs rank 0 drafts and broadcasts it",
        f"  draft per step (every rank, in parallel) : {tot['draft'] / max(tot['steps'], 1):.2f} ms",
        f"  broadcast of one {spec.num_nodes}-node tree (rank-0 drafting adds it per step, the others wait for the draft too): "
        f"{bcast:.2f} ms",
        "  -> replicated drafting is cheaper by one broadcast a step; it needs no extra collective.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from eagle3_mlx.distributed import launched

    sys.exit(rank_main(sys.argv[1:]) if launched() else launch(sys.argv[1:]))
