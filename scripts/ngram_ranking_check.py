"""Is the hybrid tree's ranking of n-gram candidates calibrated? Runs the engine
(hybrid, calibrated tree) on held-out prompts, records at every step what the
context matcher proposed, the rate the tree ranked each candidate with and the
head's depth-1 tokens, then scores every proposal against the target's greedy
continuation (which no tree changes). Prints, per prompt set, the observed
acceptance of a candidate's first token (by whether the head proposed the same
token, match length and candidate rank) and of each later token given the one
before was right, next to the rate the tree predicted.

Prompts: the built-in calibration prompts, extraction lines 25-30 and code-edit
lines 41-46 of the prompt files. Bench's --limit takes prompts round-robin over
categories, so three of these also fall in the reported sets (the same three
the ranking A/B used); the reported tables leave them out
(hybrid_tables.py --exclude benchmarks/hybrid/ranking-ab/held-out-prompts.jsonl).

    python scripts/ngram_ranking_check.py [--max-tokens 128] [--out rec.jsonl]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def record(max_tokens: int, out: Path):
    import eagle3_mlx.engine as engine_mod
    from eagle3_mlx import api
    from eagle3_mlx.default_model import default_paths
    from eagle3_mlx.prompts import CALIBRATION_PROMPTS, load_prompt_file

    model, head = default_paths(None, None)
    eng = api.load(model, head, model_dtype="float32", draft_source="hybrid", tree="auto")
    steps, merge = [], engine_mod.merge_tree

    def recording_merge(root, cands, acc, max_nodes, min_score, eagle=None, costs=None):
        depth1 = []
        if eagle is not None:
            depth1 = [t for t, p in zip(eagle.tokens.tolist(), eagle.parents.tolist()) if p == 0][1:]
        steps.append({"pos": len(eng.matcher), "head": depth1,
                      "cands": [[c.match_len, list(c.tokens), acc.rate(c.match_len),
                                 acc.rate(c.match_len, later=True)] for c in cands]})
        return merge(root, cands, acc, max_nodes, min_score, eagle, costs)

    engine_mod.merge_tree = recording_merge     # diagnostic only: observe, change nothing
    sets = [("chat", [t for _, t in CALIBRATION_PROMPTS]),
            ("extraction", [p.turns[0] for p in load_prompt_file(ROOT / "benchmarks/prompts/extraction.jsonl")[24:30]]),
            ("code-edit", [p.turns[0] for p in load_prompt_file(ROOT / "benchmarks/prompts/code-edit.jsonl")[40:46]])]
    with open(out, "w", encoding="utf-8") as f:
        for tag, texts in sets:
            for text in texts:
                steps.clear()
                ids = eng.encode([{"role": "user", "content": text}])
                out_ids = [r.token for r in eng.stream_generate(ids, max_tokens=max_tokens)]
                f.write(json.dumps({"set": tag, "tokens": list(ids) + out_ids, "steps": steps}) + "\n")
                print(f"{tag}: {len(out_ids)} tokens, {len(steps)} steps", flush=True)


def analyse(path: Path):
    recs = [json.loads(line) for line in open(path, encoding="utf-8")]
    for tag in sorted({r["set"] for r in recs}) + ["all"]:
        first = collections.defaultdict(lambda: [0, 0, 0.0])    # reached, right, sum of predicted
        later = collections.defaultdict(lambda: [0, 0, 0.0])
        for r in recs:
            if tag != "all" and r["set"] != tag:
                continue
            full = r["tokens"]
            for st in r["steps"]:
                truth = full[st["pos"]:st["pos"] + 16]
                for rank, (n, toks, rate, *later_rate) in enumerate(st["cands"]):
                    later_rate = later_rate[0] if later_rate else rate   # one pooled rate before the split
                    kind = "shared" if toks[0] in st["head"] else "contested"
                    right = 0
                    while right < min(len(toks), len(truth)) and toks[right] == truth[right]:
                        right += 1
                    cell = first[(kind, min(n, 5), min(rank, 1))]
                    cell[0] += 1; cell[1] += right >= 1; cell[2] += rate
                    for d in range(1, min(len(toks), len(truth), right + 1)):
                        cell = later[(kind, min(n, 5))]
                        cell[0] += 1; cell[1] += right > d; cell[2] += later_rate
        print(f"== {tag}")
        print("first token   head    n  rank   count  observed  predicted")
        for (kind, n, rank), (c, ok, p) in sorted(first.items()):
            if c >= 5:
                print(f"{'':13} {kind:9} {n}{'+' if n == 5 else ' '} {'1' if rank == 0 else '2+':>4} {c:7} {ok / c:9.2f} {p / c:10.2f}")
        print("later tokens  head    n          count  observed  predicted")
        for (kind, n), (c, ok, p) in sorted(later.items()):
            if c >= 5:
                print(f"{'':13} {kind:9} {n}{'+' if n == 5 else ' '}      {c:7} {ok / c:9.2f} {p / c:10.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("ngram-ranking.jsonl"))
    ap.add_argument("--analyse-only", action="store_true", help="re-read --out instead of running")
    args = ap.parse_args(argv)
    if not args.analyse_only:
        record(args.max_tokens, args.out)
    analyse(args.out)


if __name__ == "__main__":
    main()
