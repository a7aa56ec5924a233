"""Markdown tables of a multi-source bench run, per category, turn and draft source.

Reads the per-prompt rows of ``eagle3-mlx bench --draft-source hybrid,eagle,ngram
--json OUT`` (its resume sidecar ``OUT.partial.jsonl``, which holds every source's
rows) and prints one table per run: tau and speedup over plain decoding for each
source, split by MT-bench turn when the run has two. Aggregates the way bench
does: tau = tokens / target forwards, speedup = (spec tokens / spec s) / (plain
tokens / plain s), both summed over the cell's prompts.

    python scripts/hybrid_tables.py benchmarks/hybrid/code-edit.json \
        --exclude benchmarks/hybrid/ranking-ab/held-out-prompts.jsonl [--replot]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

SUMS = ("tokens", "target_forwards", "spec_decode_tokens", "spec_decode_s",
        "plain_decode_tokens", "plain_decode_s")


def read_rows(path: Path) -> list:
    sidecar = path if path.name.endswith(".partial.jsonl") else Path(f"{path}.partial.jsonl")
    rows = []
    for line in sidecar.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "row" in rec:
            rows.append(rec["row"] | {"tree": rec.get("tree", rec["row"].get("tree"))})
    return rows


def source_of(row: dict) -> str:
    parts = str(row["tree"]).split()
    return parts[1] if len(parts) > 1 else "eagle"


def cell(rows: list) -> dict:
    s = {k: sum(r.get(k) or 0 for r in rows) for k in SUMS}
    spec = s["spec_decode_tokens"] / s["spec_decode_s"] if s["spec_decode_s"] else 0.0
    plain = s["plain_decode_tokens"] / s["plain_decode_s"] if s["plain_decode_s"] else 0.0
    return {"n": len(rows), "tau": s["tokens"] / max(s["target_forwards"], 1),
            "speedup": spec / plain if plain else 0.0,
            "identical": sum(bool(r.get("identical")) for r in rows)}


def fmt(c: dict) -> str:
    return f"{c['tau']:.2f} / {c['speedup']:.2f}×" if c["n"] else "–"


def tables(rows: list) -> str:
    sources = sorted({source_of(r) for r in rows}, key=("hybrid", "eagle", "ngram").index)
    turns = sorted({int(r.get("turn", 1)) for r in rows})
    cats = sorted({r["category"] for r in rows})
    group = defaultdict(list)
    for r in rows:
        group[(r["category"], int(r.get("turn", 1)), source_of(r))].append(r)
        group[("overall", int(r.get("turn", 1)), source_of(r))].append(r)
    cols = [(t, s) for t in turns for s in sources]
    head = [("turn %d " % t if len(turns) > 1 else "") + s for t, s in cols]
    out = ["| category | prompts | " + " | ".join(head) + " |",
           "|---|---|" + "---|" * len(cols)]
    for cat in cats + ["overall"]:
        n = len(group[(cat, turns[0], sources[0])])
        cells = [fmt(cell(group[(cat, t, s)])) for t, s in cols]
        name = f"**{cat}**" if cat == "overall" else cat
        out.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    if len(turns) > 1:
        out.append("")
        out.append("Both turns together: " + ", ".join(
            f"{s} {fmt(cell([r for t in turns for r in group[('overall', t, s)]]))}" for s in sources) + ".")
    if {"hybrid", "eagle"} <= set(sources):
        slower = [f"{cat} (turn {t})" if len(turns) > 1 else cat
                  for cat in cats + ["overall"] for t in turns
                  if cell(group[(cat, t, "hybrid")])["speedup"] < cell(group[(cat, t, "eagle")])["speedup"]]
        out.append("")
        out.append("Hybrid slower than EAGLE alone in: " + (", ".join(slower) or "no category") + ".")
    same = sum(bool(r.get("identical")) for r in rows)
    by_src = defaultdict(lambda: defaultdict(int))
    for r in rows:
        for k, v in (r.get("source_tokens") or {}).items():
            by_src[source_of(r)][k] += v
    out.append("")
    out.append(f"{same}/{len(rows)} runs token-identical to plain decoding. Accepted drafted "
               "tokens by source: " + "; ".join(f"{s}: " + ", ".join(f"{k} {v:,}" for k, v in d.items() if v)
                                                for s, d in by_src.items()) + ".")
    return "\n".join(out)


def replot(path: Path, rows: list) -> None:
    """Redraw PATH.png with one bar per source, from exactly the rows the tables show."""
    from eagle3_mlx.bench_report import plot_title, write_plot

    by_source = defaultdict(lambda: {"categories": defaultdict(list), "summary": []})
    for r in rows:
        by_source[source_of(r)]["categories"][r["category"]].append(r)
        by_source[source_of(r)]["summary"].append(r)
    by_source = {s: {"summary": cell(v["summary"]), "categories": {c: cell(rs) for c, rs in v["categories"].items()}}
                 for s, v in by_source.items()}
    first = next(iter(by_source.values()))
    png = path.with_suffix(".png")
    write_plot(png, first["categories"], first["summary"],
               plot_title(json.loads(path.read_text(encoding="utf-8"))), by_source)
    print(f"wrote {png}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", type=Path, help="bench --json output(s) (their sidecars are read)")
    p.add_argument("--exclude", type=Path, action="append", default=[], metavar="JSONL",
                   help="leave out the prompts of this file (by id), e.g. ones a tuning A/B used")
    p.add_argument("--replot", action="store_true",
                   help="also redraw each run's PNG (same name, .png) from the rows shown, one bar per source")
    args = p.parse_args(argv)
    excluded = {json.loads(line)["id"] for f in args.exclude
                for line in f.read_text(encoding="utf-8").splitlines() if line.strip()}
    for path in args.json:
        rows = read_rows(path)
        left_out = sorted({r["id"] for r in rows if r["id"] in excluded})
        rows = [r for r in rows if r["id"] not in excluded]
        note = f"\n\nLeft out (used for tuning): {', '.join(left_out)}." if left_out else ""
        print(f"### {path}\n\n{tables(rows)}{note}\n")
        if args.replot:
            replot(path, rows)


if __name__ == "__main__":
    main()
