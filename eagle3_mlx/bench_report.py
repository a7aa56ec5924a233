"""What ``eagle3-mlx bench`` shows: its tables and its plot.

Contract: plain functions from the bench's rows and summaries (see
:func:`eagle3_mlx.bench.summarize`) to text (:func:`format_rows`,
:func:`format_summary`, :func:`format_sources`, :func:`format_grid`) and to a
PNG (:func:`write_plot`, :func:`write_grid_plot`, :func:`plot_result` for a
saved ``--json`` record; needs matplotlib). Nothing here runs a model.
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
    """:func:`write_plot` of a bench JSON record (one bar per draft source when it
    has several), or :func:`write_grid_plot` when the record holds a ``--grid``."""
    if result.get("grid"):
        tree = result["config"]["tree"]
        chosen = (f"{tree['top_k']},{tree['depth']},{tree['total_tokens']}"
                  if tree.get("source") == "auto" else None)
        write_grid_plot(path, result["grid"], chosen, plot_title(result),
                        result["config"].get("draft_source") or "")
    else:
        write_plot(path, result["categories"], result["total"], plot_title(result), result.get("sources"))


_PANELS = (("speedup", "speedup vs plain mlx-lm"), ("tau", "tau (tokens per target forward)"))
_COLORS = ("#4C72B0", "#55A868", "#DD8452", "#8172B3", "#937860")


def _grouped_bars(axes, names: List[str], series: Dict[str, Dict[str, dict]], what: str):
    """One bar per series at each name, on a speedup panel and a tau panel;
    ``series`` maps a legend label to {name: summary}."""
    width = 0.8 / len(series)
    for ax, (key, ylabel) in zip(axes, _PANELS):
        for i, (label, by_name) in enumerate(series.items()):
            vals = [(by_name.get(n) or {}).get(key) or 0 for n in names]
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(names))], vals,
                   width, label=label, color=_COLORS[i % len(_COLORS)])
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{key} per {what}")
    axes[0].axhline(1.0, color="gray", lw=1, ls="--")
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 1.15)     # headroom for the legend
    axes[0].legend(loc="upper center", ncol=len(series), fontsize=8)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    return plt, fig, axes


def _save(plt, fig, axes, path, title: str):
    for ax in axes:
        ax.tick_params(axis="x", rotation=35)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plot(path, cats: Dict[str, dict], total: dict, title: str,
               by_source: Optional[Dict[str, dict]] = None):
    """Speedup and tau per category. With ``by_source`` (source -> {"summary",
    "categories"}, as in bench's JSON) each category gets one bar per source and
    an "overall" group, so the sources can be compared at a glance."""
    plt, fig, axes = _figure()
    if by_source and len(by_source) > 1:
        names = sorted({c for v in by_source.values() for c in v["categories"]}) + ["overall"]
        _grouped_bars(axes, names, {src: {**v["categories"], "overall": v["summary"]}
                                    for src, v in by_source.items()}, "category")
    else:
        names = sorted(cats)
        for ax, (key, ylabel), color in zip(axes, _PANELS, _COLORS):
            ax.bar(names, [cats[c][key] or 0 for c in names], color=color)
            if total.get(key):
                unit = "x" if key == "speedup" else ""
                ax.axhline(total[key], color="#C44E52", lw=1.2, label=f"overall {total[key]:.2f}{unit}")
                ax.legend(loc="lower right")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{key} per category")
        axes[0].axhline(1.0, color="gray", lw=1, ls="--")
    _save(plt, fig, axes, path, title)


def write_grid_plot(path, grid: List[dict], chosen: Optional[str], title: str, sources: str = ""):
    """Speedup and tau per grid tree, one bar per draft source, trees in order
    of size; the chosen (auto) tree's label is starred. ``grid`` is bench's JSON
    list of {"tree": "K,D,N[ source]", "summary"}."""
    series: Dict[str, Dict[str, dict]] = {}
    for g in grid:
        tree, _, src = g["tree"].partition(" ")
        series.setdefault(src or sources or "speculative", {})[tree] = g["summary"]
    trees = sorted({t for by_tree in series.values() for t in by_tree},
                   key=lambda t: (int(t.split(",")[2]), t))
    plt, fig, axes = _figure()
    _grouped_bars(axes, trees, series, "tree (top_k,depth,total_tokens)")
    for ax in axes:
        ax.set_xticks(range(len(trees)), [f"{t} *" if t == chosen else t for t in trees])
    _save(plt, fig, axes, path, title + ("  (* auto)" if chosen in trees else ""))
