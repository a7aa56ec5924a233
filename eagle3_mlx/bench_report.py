"""What ``eagle3-mlx bench`` shows: its tables and its plot.

Contract: plain functions from the bench's rows and summaries (see
:func:`eagle3_mlx.bench.summarize`) to text (:func:`format_rows`,
:func:`format_summary`, :func:`format_sources`, :func:`format_grid`) and to a
PNG (:func:`write_plot`, :func:`plot_result` for a saved ``--json`` record;
needs matplotlib). Nothing here runs a model.
"""

from __future__ import annotations

from typing import Dict, List, Optional


def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def format_rows(rows: List[dict]) -> str:
    lines = [f"{'id':>6} {'category':<11} {'turn':>4} {'tokens':>6} {'tau':>5} {'spec t/s':>8} "
             f"{'plain t/s':>9} {'speedup':>7}  same"]
    for r in rows:
        same = {True: "yes", False: f"no@{r['first_mismatch']}", None: "n/a"}[r["identical"]]
        lines.append(f"{r['id']:>6} {r['category'][:11]:<11} {r['turn']:>4} {r['tokens']:>6} "
                     f"{_f(r['tau']):>5} {_f(r['spec_tps'], '{:.1f}'):>8} {_f(r['plain_tps'], '{:.1f}'):>9} "
                     f"{_f(r['speedup'], '{:.2f}x'):>7}  {same}")
    return "\n".join(lines)


def format_summary(cats: Dict[str, dict], total: dict) -> str:
    lines = [f"{'category':<12} {'prompts':>7} {'tokens':>7} {'tau':>5} {'spec t/s':>8} {'plain t/s':>9} "
             f"{'speedup':>7} {'identical':>9}"]

    def line(name, s):
        ident = "-" if s["identical"] is None else f"{s['identical']}/{s['compared']}"
        return (f"{name[:12]:<12} {s['prompts']:>7} {s['tokens']:>7} {_f(s['tau']):>5} "
                f"{_f(s['spec_tps'], '{:.1f}'):>8} {_f(s['plain_tps'], '{:.1f}'):>9} "
                f"{_f(s['speedup'], '{:.2f}x'):>7} {ident:>9}")

    for c in sorted(cats):
        lines.append(line(c, cats[c]))
    lines.append("-" * len(lines[0]))
    lines.append(line("overall", total))
    return "\n".join(lines)


def format_sources(by_source: Dict[str, dict]) -> str:
    """One line per draft source and category: tau and speedup side by side."""
    cats = sorted({c for v in by_source.values() for c in v["categories"]})
    names = list(by_source)
    w = max(len(c) for c in cats + ["category", "overall"])
    head = f"{'category':<{w}} " + " ".join(f"{n + ' tau':>11} {n + ' x':>9}" for n in names)
    lines = [head]
    for c in cats + ["overall"]:
        cells = []
        for n in names:
            v = by_source[n]["summary"] if c == "overall" else by_source[n]["categories"].get(c, {})
            cells.append(f"{_f(v.get('tau')):>11} {_f(v.get('speedup'), '{:.2f}x'):>9}")
        lines.append(f"{c:<{w}} " + " ".join(cells))
    return "\n".join(lines)


def format_grid(grid: List[dict], chosen: Optional[str]) -> str:
    lines = [f"{'tree k,d,n':<11} {'tau':>5} {'spec t/s':>8} {'speedup':>7} {'vs best':>7}"]
    best = max((g["summary"]["spec_tps"] or 0) for g in grid) or 1.0
    for g in sorted(grid, key=lambda g: -(g["summary"]["spec_tps"] or 0)):
        s = g["summary"]
        mark = "  <- auto" if g["tree"] == chosen else ""
        lines.append(f"{g['tree']:<11} {_f(s['tau']):>5} {_f(s['spec_tps'], '{:.1f}'):>8} "
                     f"{_f(s['speedup'], '{:.2f}x'):>7} {_f((s['spec_tps'] or 0) / best, '{:.1%}'):>7}{mark}")
    return "\n".join(lines)


def plot_title(result: dict) -> str:
    """The plot's caption from a bench JSON record: model, head, tree, sources, machine."""
    cfg, machine = result["config"], result["machine"]
    tree = cfg["tree"]
    sources = cfg.get("draft_source") or ""
    label = f"{tree['top_k']},{tree['depth']},{tree['total_tokens']}"
    if tree.get("source") == "auto":
        label += " (auto)"
    return (f"eagle3-mlx bench: {_name(cfg['model'])} + {_name(cfg['draft'])}, tree {label}"
            + (f", {sources.replace(',', ' / ')}" if sources else "")
            + f", {machine['backend']} {machine['device']}, mlx {machine['mlx']}")


def _name(path) -> str:
    return "no head" if path is None else str(path).rstrip("/").rsplit("/", 1)[-1]


def plot_result(result: dict, path) -> None:
    """:func:`write_plot` of a bench JSON record (one bar per draft source when it has several)."""
    write_plot(path, result["categories"], result["total"], plot_title(result), result.get("sources"))


def write_plot(path, cats: Dict[str, dict], total: dict, title: str,
               by_source: Optional[Dict[str, dict]] = None):
    """Speedup and tau per category. With ``by_source`` (source -> {"summary",
    "categories"}, as in bench's JSON) each category gets one bar per source and
    an "overall" group, so the sources can be compared at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("speedup", "speedup vs plain mlx-lm", "speedup per category", "x"),
              ("tau", "tau (tokens per target forward)", "tau per category", ""))
    if by_source and len(by_source) > 1:
        names = sorted({c for v in by_source.values() for c in v["categories"]}) + ["overall"]
        width = 0.8 / len(by_source)
        colors = ("#4C72B0", "#55A868", "#DD8452", "#8172B3", "#937860")
        for ax, (key, ylabel, panel_title, _) in zip(axes, panels):
            for i, (src, v) in enumerate(by_source.items()):
                vals = [(v["summary"] if c == "overall" else v["categories"].get(c, {})).get(key) or 0
                        for c in names]
                ax.bar([j + (i - (len(by_source) - 1) / 2) * width for j in range(len(names))], vals,
                       width, label=src, color=colors[i % len(colors)])
            ax.set_xticks(range(len(names)), names)
            ax.set_ylabel(ylabel)
            ax.set_title(panel_title)
        axes[0].axhline(1.0, color="gray", lw=1, ls="--")
        axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.15)     # headroom for the legend
        axes[0].legend(loc="upper center", ncol=len(by_source), fontsize=8)
    else:
        names = sorted(cats)
        for ax, (key, ylabel, panel_title, unit), color in zip(axes, panels, ("#4C72B0", "#55A868")):
            ax.bar(names, [cats[c][key] or 0 for c in names], color=color)
            if total.get(key):
                ax.axhline(total[key], color="#C44E52", lw=1.2, label=f"overall {total[key]:.2f}{unit}")
                ax.legend(loc="lower right")
            ax.set_ylabel(ylabel)
            ax.set_title(panel_title)
        axes[0].axhline(1.0, color="gray", lw=1, ls="--")
    for ax in axes:
        ax.tick_params(axis="x", rotation=35)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
