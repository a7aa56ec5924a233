"""How a calibration reads: the text ``eagle3-mlx calibrate`` prints.

Contract: :func:`format_report` renders a :class:`~.cache.Calibration` as
text (machine, costs, acceptance, best trees, the choice). The command itself
is :mod:`eagle3_mlx.calibrate`, on top of :mod:`eagle3_mlx.entry`.
"""

from __future__ import annotations

from .cache import Calibration
from .optimise import optimise


def format_report(cal: Calibration, *, top: int = 8) -> str:
    c, a = cal.costs, cal.acceptance
    best, cands = optimise(c, a)
    dev = cal.key.get("device", {})
    m = cal.key.get("model", {})
    lines = [
        f"machine : {dev.get('backend')} | {dev.get('device_name') or dev.get('cpu')} | "
        f"{dev.get('cpu_count')} CPUs | BLAS {dev.get('blas', '-')} | mlx {cal.key.get('mlx')}",
        f"model   : {m.get('model_type')} hidden {m.get('hidden_size')} x {m.get('num_layers')} layers, "
        f"vocab {m.get('vocab_size')} ({cal.key.get('quantization')}), digest {m.get('digest')}",
        f"head    : hidden {cal.key.get('head', {}).get('hidden_size')}, draft vocab "
        f"{cal.key.get('head', {}).get('draft_vocab_size')}, digest {cal.key.get('head', {}).get('digest')}",
        "",
        "verify cost (target forward over T tree tokens + verification + KV compaction):",
        "  T   " + " ".join(f"{t:>7d}" for t in sorted(c.verify_ms)),
        "  ms  " + " ".join(f"{c.verify_ms[t]:7.1f}" for t in sorted(c.verify_ms)),
        "  x1  " + " ".join(f"{c.verify_ms[t] / c.verify(1):7.2f}" for t in sorted(c.verify_ms)),
        "draft cost (ms = a + b * depth):  " + ", ".join(
            f"top_k {k}: {ab[0]:.2f} + {ab[1]:.2f}d" for k, ab in sorted(c.draft_ms.items())),
        f"draft extension: +{c.ext_ms:.2f} ms per extra committed token;  "
        f"per-step bookkeeping: {c.overhead_ms:.2f} ms",
        f"plain decode step: {c.baseline_ms:.2f} ms "
        f"({1000 / c.baseline_ms:.1f} tok/s)",
        "",
        f"acceptance ({a.source}, {len(a.samples)} positions; P(level j accepted | levels < j accepted)):",
        "  level      " + " ".join(f"{j + 1:>6d}" for j in range(a.levels)),
        "  top-1      " + " ".join(f"{p:6.3f}" for p in a.top1_rates()),
        f"  top-{a.max_rank:<2d}     " + " ".join(f"{p:6.3f}" for p in a.per_level_rates),
    ]
    if a.rho != 1.0:
        lines.append(f"  online correction rho = {a.rho:.3f} after {cal.online_steps} steps")
    lines += ["", "best trees (expected):", "  top_k depth  nodes    tau  step ms  tok/s  speedup"]
    for cd in cands[:top]:
        s = cd.spec
        mark = "  <- chosen" if (s.top_k, s.depth, s.num_nodes) == (best.spec.top_k, best.spec.depth,
                                                                    best.spec.num_nodes) else ""
        lines.append(f"  {s.top_k:5d} {s.depth:5d} {s.num_nodes:6d} {cd.tau:6.2f} {cd.step_ms:8.1f} "
                     f"{cd.tps:6.1f} {cd.speedup:7.2f}x{mark}")
    if best not in cands[:top]:
        s = best.spec
        lines.append(f"  {s.top_k:5d} {s.depth:5d} {s.num_nodes:6d} {best.tau:6.2f} {best.step_ms:8.1f} "
                     f"{best.tps:6.1f} {best.speedup:7.2f}x  <- chosen (smallest within 0.5%)")
    lines.append("")
    lines.append(f"chosen tree: --tree {best.spec.top_k},{best.spec.depth},{best.spec.num_nodes}  "
                 f"(expected tau {best.tau:.2f}, {best.tps:.1f} tok/s, {best.speedup:.2f}x plain)")
    if best.speedup < 1.0:
        lines.append("note: speculation is not expected to pay off with this head on this machine "
                     "(acceptance too low for the measured costs).")
    if a.per_level_rates and a.per_level_rates[0] < 0.1:
        lines.append("note: the head accepts almost nothing at level 1 — it looks untrained or made "
                     "for another target.")
    return "\n".join(lines)
