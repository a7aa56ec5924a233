"""``eagle3-mlx bench``: speculative decoding against plain mlx-lm decoding.

For every prompt (MT-bench first turns by default, chat template applied,
greedy by default) the same process runs plain ``mlx_lm.stream_generate`` on
the same model and the EAGLE-3 engine on the same token ids, interleaved
(alternating which goes first) after a warm-up, and reports:

* tau   = generated tokens / target forwards (bonus token included; the
          prefill forward that yields the first token counts as one),
* tok/s = (tokens - 1) / (time from the first to the last token) for both, so
          prompt processing is excluded the same way on both sides,
* speedup = spec tok/s / plain tok/s,
* whether the two outputs are token-identical.

Totals pool tokens and seconds over all prompts (speedup = total spec tok/s /
total plain tok/s); the per-category summary does the same per category.

With ``--json FILE`` every finished prompt turn is also appended to
``FILE.partial.jsonl`` (a settings header, then one row a line), so
``--resume`` can continue a killed run and report old and new rows together.

Why one module of ~700 lines: a run, its rows, the sidecar and the command are
one procedure read top to bottom (``main`` lists its steps as functions); the
tables and the plot live in :mod:`eagle3_mlx.bench_report`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import distributed
from .bench_report import (format_grid, format_rows, format_sources,
                           format_summary, plot_result)
from .console import say
from .files import write_atomic
from .hybrid import from_model
from .platform import default_dtype, describe_machine, machine_info
from .prompts import BenchPrompt, PromptSetError, load_prompts
from .runs import Run, collect
from .tree import TreeSpec
from .tuning.cache import cache_path, quantization_of
from .tuning.choose import calibrate, parse_tree, seed_hybrid

#: Tree shapes compared by ``--grid`` (top_k, depth, total_tokens): chains,
#: narrow and wide trees, small to large. The auto-calibrated tree is added.
DEFAULT_GRID = [
    (1, 1, 3), (1, 2, 4), (1, 3, 5), (1, 5, 7), (2, 2, 6), (2, 3, 8), (2, 4, 10),
    (3, 3, 12), (4, 3, 16), (4, 4, 16), (4, 5, 24), (6, 5, 32), (8, 6, 48), (8, 8, 64),
]


def tree_label(spec: TreeSpec) -> str:
    return f"{spec.top_k},{spec.depth},{spec.num_nodes}"


# ----------------------------------------------------------------------------------
# one run of each kind
# ----------------------------------------------------------------------------------


def run_plain(model, tokenizer, ids: list, max_tokens: int, temp: float = 0.0,
              seed: Optional[int] = None) -> Run:
    """Plain mlx-lm decoding of ``ids``."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    kw = {}
    if temp > 0:
        kw["sampler"] = make_sampler(temp)
    if seed is not None:
        mx.random.seed(seed)
    return collect(stream_generate(model, tokenizer, list(ids), max_tokens=max_tokens, **kw))


def run_spec(engine, ids: list, max_tokens: int, temp: float = 0.0, seed: Optional[int] = None,
             draft_source: Optional[str] = None) -> Run:
    """EAGLE-3 speculative decoding of ``ids`` (fresh caches, no prefix reuse)."""
    engine.reset()
    run = collect(engine.stream_generate(list(ids), max_tokens=max_tokens, temp=temp, seed=seed,
                                         draft_source=draft_source))
    engine.reset()
    return run


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def row_for(item: "Item", spec_run: Run, plain: Run, tree: TreeSpec, greedy: bool) -> dict:
    mm = first_mismatch(spec_run.tokens, plain.tokens)
    st, pt = spec_run.tps, plain.tps
    return {
        "id": item.prompt.id,
        "category": item.prompt.category,
        "turn": item.turn,
        "tree": tree_label(tree),
        "prompt_tokens": len(item.ids),
        "tokens": len(spec_run.tokens),
        "target_forwards": spec_run.steps,
        "tau": len(spec_run.tokens) / spec_run.steps if spec_run.steps else None,
        "spec_decode_tokens": spec_run.decode_tokens,
        "spec_decode_s": spec_run.decode_s,
        "spec_tps": st,
        "spec_prompt_s": spec_run.first_s,
        "draft_ms": spec_run.draft_ms,
        "verify_ms": spec_run.verify_ms,
        "source_tokens": spec_run.source_tokens,
        "plain_tokens": len(plain.tokens),
        "plain_decode_tokens": plain.decode_tokens,
        "plain_decode_s": plain.decode_s,
        "plain_tps": pt,
        "plain_prompt_s": plain.first_s,
        "speedup": st / pt if st and pt else None,
        "identical": (mm is None) if greedy else None,
        "first_mismatch": mm if greedy else None,
        "finish_reason": spec_run.finish,
        "plain_finish_reason": plain.finish,
    }


def summarize(rows: List[dict]) -> dict:
    """Pooled totals: tok/s = sum tokens / sum seconds; tau = sum tokens / sum forwards."""
    tok = sum(r["tokens"] for r in rows)
    fwd = sum(r["target_forwards"] for r in rows)
    sdt = sum(r["spec_decode_tokens"] for r in rows)
    sds = sum(r["spec_decode_s"] for r in rows)
    pdt = sum(r["plain_decode_tokens"] for r in rows)
    pds = sum(r["plain_decode_s"] for r in rows)
    spec_tps = sdt / sds if sds > 0 else None
    plain_tps = pdt / pds if pds > 0 else None
    ident = [r["identical"] for r in rows if r["identical"] is not None]
    sp = [r["speedup"] for r in rows if r["speedup"]]
    return {
        "prompts": len(rows),
        "tokens": tok,
        "target_forwards": fwd,
        "tau": tok / fwd if fwd else None,
        "spec_decode_tokens": sdt,
        "spec_decode_s": sds,
        "spec_tps": spec_tps,
        "plain_decode_tokens": pdt,
        "plain_decode_s": pds,
        "plain_tps": plain_tps,
        "speedup": spec_tps / plain_tps if spec_tps and plain_tps else None,
        "mean_prompt_speedup": sum(sp) / len(sp) if sp else None,
        "identical": sum(1 for x in ident if x) if ident else None,
        "compared": len(ident),
        "draft_ms": sum(r["draft_ms"] for r in rows),
        "verify_ms": sum(r["verify_ms"] for r in rows),
        "source_tokens": _sum_sources(r.get("source_tokens") or {} for r in rows),
    }


def _sum_sources(dicts) -> dict:
    """Accepted drafted tokens per source label, summed over runs."""
    out = {"eagle": 0, "ngram": 0, "both": 0}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def by_category(rows: List[dict]) -> Dict[str, dict]:
    cats: Dict[str, list] = {}
    for r in rows:
        cats.setdefault(r["category"], []).append(r)
    return {c: summarize(rs) for c, rs in cats.items()}


# ----------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------


@dataclass
class Item:
    prompt: BenchPrompt
    turn: int
    messages: list
    ids: list = field(default_factory=list)


def prompt_key(p: BenchPrompt) -> str:
    """Identifies a prompt across runs: its id plus a hash of its text, since JSONL ids default
    to line numbers and --limit reorders the set (so list indices are no key)."""
    h = hashlib.sha1(json.dumps([p.category, p.turns]).encode()).hexdigest()[:12]
    return f"{p.id}/{h}"


def encode_messages(engine, messages: list) -> list:
    tok = engine.tokenizer
    if getattr(tok, "chat_template", None) is not None:
        return engine.encode(messages)
    return engine.encode("\n\n".join(m["content"] for m in messages))


def config_label(spec: TreeSpec, source: Optional[str], sources: Sequence[Optional[str]]) -> str:
    """A row's configuration: the tree, plus the draft source when a run compares several."""
    return tree_label(spec) if len(sources) <= 1 else f"{tree_label(spec)} {source}"


def run_bench(engine, prompts: List[BenchPrompt], *, trees: List[TreeSpec], turns: int = 1,
              max_tokens: int = 256, temp: float = 0.0, seed: Optional[int] = 0, warmup: bool = True,
              progress: bool = True, system: Optional[str] = None, log=None,
              done: Optional[dict] = None, on_row: Optional[Callable[[dict], None]] = None,
              sources: Optional[Sequence[str]] = None) -> dict:
    """Run every prompt (and turn) plainly once and speculatively once per tree
    and draft source (``sources``; default the engine's). Rows are keyed by
    :func:`config_label`. Every speculative run starts from the engine's n-gram
    acceptance as it was on entry, so a row does not depend on the rows before it.

    ``done`` maps (tree label, prompt key, turn) to a record from an earlier run (see
    ``on_row``); those trees are not run again for that turn and their rows are reported as
    they are. ``on_row`` gets one record per new row: {"key", "index", "turn", "tree",
    "plain_text", "row"} (plain_text carries the answer a second turn is conditioned on).
    Returns {"rows": {tree label: [row, ...]}, "summary": ..., "categories": ...}."""
    bench = _Bench(engine, trees, list(sources or [None]), max_tokens, temp, seed, dict(done or {}), on_row)
    todo = {(key, t): [lab for lab in bench.labels if (lab, key, t) not in bench.done]
            for key, p in zip(map(prompt_key, prompts), prompts)
            for t in range(1, min(turns, len(p.turns)) + 1)}
    # A turn with any tree left runs plain again too (every row pairs with its own plain run).
    n_left = sum(1 + len(labs) for labs in todo.values() if labs)
    base = [{"role": "system", "content": system}] if system else []
    if warmup and prompts and n_left:
        bench.warm_up(base + [{"role": "user", "content": prompts[0].turns[0]}])
    if progress:
        n_items = sum(min(turns, len(p.turns)) for p in prompts)
        bench.bar = _progress_bar(n_items * (1 + len(bench.configs)), n_left)
    k = 0
    try:
        for i, p in enumerate(prompts):
            history = list(base)
            for t in range(1, min(turns, len(p.turns)) + 1):
                history.append({"role": "user", "content": p.turns[t - 1]})
                # Alternate the order so slow drift (thermal, other load) hits both sides alike;
                # k counts skipped turns too, so a resumed run keeps a single run's order.
                answer = bench.turn(Item(p, t, list(history)), i, todo[(prompt_key(p), t)], plain_first=k % 2 == 0)
                history.append({"role": "assistant", "content": answer})
                k += 1
    finally:
        if bench.bar is not None:
            bench.bar.close()
    engine.ngram_acceptance = bench.ngram_start
    return {"rows": bench.rows, "summary": {lab: summarize(r) for lab, r in bench.rows.items()},
            "categories": {lab: by_category(r) for lab, r in bench.rows.items()}}


def _progress_bar(total: int, left: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=total - left, unit="run", desc="bench", file=sys.stderr, dynamic_ncols=True)


class _Bench:
    """One bench run's configurations and rows (see :func:`run_bench`)."""

    def __init__(self, engine, trees, sources, max_tokens, temp, seed, done, on_row):
        import copy

        self.engine, self.sources, self.max_tokens, self.temp, self.seed = engine, sources, max_tokens, temp, seed
        self.done, self.on_row, self.bar = done, on_row, None
        self.configs = [(t, src) for t in trees for src in sources]
        self.labels = [config_label(t, src, sources) for t, src in self.configs]
        self.rows: Dict[str, list] = {lab: [] for lab in self.labels}
        self.ngram_start = copy.deepcopy(engine.ngram_acceptance)   # node_costs are constant

    def plain(self, ids, n) -> Run:
        return run_plain(self.engine.model, self.engine.tokenizer, ids, n, self.temp, self.seed)

    def spec(self, label, ids, n) -> Run:
        import copy

        spec, src = self.configs[self.labels.index(label)]
        self.engine.set_tree(top_k=spec.top_k, depth=spec.depth, total_tokens=spec.total_tokens)
        self.engine.ngram_acceptance = copy.deepcopy(self.ngram_start)
        return run_spec(self.engine, ids, n, self.temp, self.seed, draft_source=src)

    def warm_up(self, messages):
        ids = encode_messages(self.engine, messages)
        n = min(16, self.max_tokens)
        self.plain(ids, n)
        for lab in self.labels:
            self.spec(lab, ids, n)

    def turn(self, item: "Item", index: int, left: List[str], plain_first: bool) -> str:
        """Runs the configurations ``left`` for this turn (and plain once); returns the plain answer."""
        key = prompt_key(item.prompt)
        if left:
            item.ids = encode_messages(self.engine, item.messages)
            runs = {}
            for what in (["plain"] + left if plain_first else left + ["plain"]):
                runs[what] = (self.plain(item.ids, self.max_tokens) if what == "plain"
                              else self.spec(what, item.ids, self.max_tokens))
                if self.bar is not None:
                    self.bar.update(1)
            for lab in left:
                spec = self.configs[self.labels.index(lab)][0]
                rec = {"key": key, "index": index, "turn": item.turn, "tree": lab, "plain_text": runs["plain"].text,
                       "row": row_for(item, runs[lab], runs["plain"], spec, self.temp == 0)}
                self.done[(lab, key, item.turn)] = rec
                if self.on_row is not None:
                    self.on_row(rec)
            answer = runs["plain"].text
        for lab in self.labels:
            self.rows[lab].append(self.done[(lab, key, item.turn)]["row"])
        self.show_progress()
        return answer if left else self.done[(self.labels[0], key, item.turn)]["plain_text"]

    def show_progress(self):
        if self.bar is not None:
            s = summarize(self.rows[self.labels[0]])
            if s["speedup"]:
                self.bar.set_postfix(tau=f"{s['tau']:.2f}", speedup=f"{s['speedup']:.2f}x")


# ----------------------------------------------------------------------------------
# resumable runs: the per-prompt sidecar
# ----------------------------------------------------------------------------------

#: Settings a sidecar's rows depend on (header key -> CLI option); --resume refuses on any change.
SIDECAR_SETTINGS = {
    "model": "--model", "draft": "--draft", "dtype": "--dtype", "prompts": "--prompts",
    "turns": "--turns", "max_tokens": "--max-tokens", "temp": "--temp", "seed": "--seed",
    "system": "--system", "draft_source": "--draft-source",
}


def sidecar_path(json_path) -> Path:
    return Path(str(json_path) + ".partial.jsonl")


def append_line(f, obj: dict):
    # fsync each line: a killed run loses at most the prompt in flight.
    f.write(json.dumps(obj) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_sidecar(path: Path) -> Tuple[Optional[dict], List[dict], int]:
    """(header settings or None, records, byte length of the intact part). A run killed
    mid-write can leave a torn last line; reading stops there."""
    data = path.read_bytes()
    settings, records, good = None, [], 0
    for n, line in enumerate(data.split(b"\n")[:-1]):  # the piece after the last newline is torn
        try:
            obj = json.loads(line)
        except ValueError:
            break
        if n == 0:
            if not isinstance(obj, dict) or not isinstance(obj.get("settings"), dict):
                break
            settings = obj["settings"]
        else:
            records.append(obj)
        good += len(line) + 1
    return settings, records, good


def settings_mismatch(old: dict, new: dict) -> List[str]:
    # Greedy rows do not depend on the seed, so a greedy run may resume under another one.
    greedy = old.get("temp") == 0 and new["temp"] == 0
    # Sidecars from before --draft-source existed were drafted by the head alone.
    get = lambda d, k: d.get(k, "eagle" if k == "draft_source" else None)  # noqa: E731
    return [f"{opt} {get(old, k)!r} (this run: {get(new, k)!r})"
            for k, opt in SIDECAR_SETTINGS.items()
            if get(old, k) != get(new, k) and not (greedy and k == "seed")]


# ----------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------


def _parse_sources(text: str) -> List[str]:
    from .hybrid import SOURCES

    out = [t.strip() for t in str(text).split(",") if t.strip()]
    bad = [t for t in out if t not in SOURCES]
    if not out or bad or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(
            f"expected one or more of {', '.join(SOURCES)} separated by commas, each once; got {text!r}")
    return out


def _parse_grid(text: Optional[str]) -> List[TreeSpec]:
    if not text:
        return [TreeSpec(*t) for t in DEFAULT_GRID]
    return [parse_tree(t) for t in text.replace(";", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eagle3-mlx bench",
        description="Measure EAGLE-3 speculative decoding against plain mlx-lm decoding of the same "
                    "prompts in the same process: tau, tok/s, speedup and token identity.")
    from .entry import add_dtype_arg, add_model_args, add_sampling_args, add_tree_arg

    add_model_args(p, draft_source=False)
    add_dtype_arg(p, "platform default")
    p.add_argument("--prompts", default="mtbench", help="'mtbench' (built in) or a JSONL file")
    p.add_argument("--turns", type=int, choices=(1, 2), default=1, help="MT-bench turns per question")
    add_sampling_args(p, max_tokens=256, top_p=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N prompts (round-robin over categories)")
    p.add_argument("--category", action="append", default=None, help="only this category (repeatable)")
    p.add_argument("--system", default=None, help="system prompt")
    add_tree_arg(p)
    p.add_argument("--draft-source", default="hybrid", type=_parse_sources, metavar="SOURCES",
                   help="what drafts the tree: eagle (the EAGLE-3 head), ngram (context n-grams), "
                        "hybrid (both in one tree; the default), or several separated by commas, "
                        "e.g. eagle,ngram,hybrid: each prompt then runs once per source against one "
                        "plain run, and the first source is the headline")
    p.add_argument("--grid", action="store_true",
                   help="also run a grid of tree shapes and rank the auto-calibrated tree among them")
    p.add_argument("--grid-trees", default=None, help="grid shapes, e.g. '1,3,5 4,4,16 8,6,48'")
    p.add_argument("--recalibrate", action="store_true", help="with --tree auto: measure again")
    p.add_argument("--quick-calibration", action="store_true",
                   help="with --tree auto: a faster, coarser calibration when none is cached")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write all results to this JSON file (atomically, at the end); every finished "
                        "prompt turn is also appended to FILE.partial.jsonl as it completes. That sidecar "
                        "is kept after the run (it is small); a run without --resume replaces it")
    p.add_argument("--resume", action="store_true",
                   help="with --json: continue an interrupted run from FILE.partial.jsonl, running only "
                        "the prompt turns (per tree) not in it, then report old and new rows together. "
                        "Refused if the sidecar was written with another --model, --draft, --dtype, "
                        "--prompts, --turns, --max-tokens, --temp, --seed or --system")
    p.add_argument("--plot", default=None, help="write a PNG of speedup and tau per category, or per tree "
                                                  "with --grid (needs matplotlib: pip install 'eagle3-mlx[plot]')")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no per-prompt table")
    return p


class _Refused(Exception):
    """A bench run that cannot start; ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        distributed_args(args)
        check_args(args)
        prompts, fixed, grid = read_selection(args)
        engine, target, settings, records = open_bench_engine(args)
    except _Refused as e:
        print(f"eagle3-mlx bench: error: {e}", file=sys.stderr)
        return e.code
    machine = machine_info()
    say(f"machine: {describe_machine(machine)}")
    tree, calibration = choose_tree(engine, args, fixed)
    trees = [tree] + [g for g in grid if tree_label(g) != tree_label(tree)]
    res = run_with_sidecar(engine, prompts, trees, args, settings, records, fixed, grid)
    if res is None:
        return 130
    result = build_result(res, engine, args, prompts, tree, fixed, grid, calibration, machine,
                          target.model, target.draft, settings["dtype"])
    print_report(result, res, args, prompts, tree, fixed, grid, target.model, target.draft)
    write_outputs(result, args)
    return 0


def open_bench_engine(args):
    """(engine, target, run settings, resumed records): the target is resolved
    and a ``--resume`` sidecar checked before anything is loaded; the trees
    are the bench's to set, so none is applied on load."""
    from .entry import EngineOptions, SetupError, load_engine, resolve_target

    dtype = args.dtype or default_dtype()
    try:
        target = resolve_target(args.model, args.draft)
    except SetupError as e:
        raise _Refused(str(e), 1) from None
    settings = run_settings(args, target.model, target.draft, dtype)
    records = resume_records(args, settings)
    opts = EngineOptions.from_args(args, dtype=dtype, draft_source=args.draft_source[0], tree=None)
    try:
        return load_engine(opts, target), target, settings, records
    except (ValueError, FileNotFoundError, OSError) as e:
        raise _Refused(str(e), 1) from None


def distributed_args(args):
    """Under mlx.launch only rank 0 writes files; a resumed run would skip rows
    on rank 0 alone, so it is refused."""
    if distributed.group() is None:
        return
    if args.resume:
        raise _Refused("--resume does not run under mlx.launch; rerun without it", 2)
    if not distributed.is_main():
        args.json = args.plot = None


def check_args(args):
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise _Refused("--plot needs matplotlib, which is not installed; install the optional "
                           "extra: pip install 'eagle3-mlx[plot]' (or pip install matplotlib)", 2) from None
    if args.max_tokens < 1:
        raise _Refused("--max-tokens must be >= 1", 2)
    if args.resume and not args.json:
        raise _Refused("--resume needs --json FILE (the run to continue is FILE.partial.jsonl)", 2)


def read_selection(args):
    """(prompts, the --tree spec or None for auto, the --grid trees)."""
    try:
        prompts = load_prompts(args.prompts, limit=args.limit, categories=args.category)
        fixed = parse_tree(args.tree)
        grid = _parse_grid(args.grid_trees) if args.grid else []
    except (PromptSetError, ValueError) as e:
        raise _Refused(str(e), 2) from None
    return prompts, fixed, grid


def run_settings(args, model, draft, dtype) -> dict:
    """What a resumed run must share with the run it continues."""
    return {"model": str(model), "draft": str(draft), "dtype": dtype, "prompts": args.prompts,
            "turns": args.turns, "max_tokens": args.max_tokens, "temp": args.temp, "seed": args.seed,
            "system": args.system, "draft_source": ",".join(args.draft_source)}


def resume_records(args, settings) -> List[dict]:
    """Rows already in the sidecar of the run ``--resume`` continues (checked
    before anything is loaded; a refused sidecar is left untouched)."""
    sidecar = sidecar_path(args.json) if args.json else None
    if not args.resume:
        return []
    if not (sidecar.exists() and sidecar.stat().st_size):
        say(f"note: no {sidecar} to resume; starting from scratch")
        return []
    old, records, good = read_sidecar(sidecar)
    if old is None:
        raise _Refused(f"--resume: {sidecar} has no settings header; not a bench sidecar", 2)
    diff = settings_mismatch(old, settings)
    if diff:
        raise _Refused(f"--resume: {sidecar} was written with {'; '.join(diff)}; rerun with the same "
                       "settings, or without --resume to start over", 2)
    if good < sidecar.stat().st_size:
        say(f"note: dropping the torn last line of {sidecar}")
        os.truncate(sidecar, good)
    return records


def choose_tree(engine, args, fixed):
    """The tree to measure (``--tree``, or calibrated for ``auto``) and the
    calibration behind it (None for a fixed tree); seeds hybrid drafting."""
    calibration = None
    if engine.head is None:
        tree = fixed or engine.spec
        say(f"tree: {tree} (no draft head: context n-grams draft)")
        return tree, None
    if fixed is None:
        # Sharded (mlx.launch): every rank measures in lockstep and takes rank 0's choice.
        measure = distributed.calibration if distributed.group() is not None else calibrate
        calibration = measure(engine, force=args.recalibrate, quick=args.quick_calibration, log=say)
        tree = calibration.spec
        say(f"tree: auto -> {tree} (calibrated: expected tau {calibration.choice.tau:.2f}, "
            f"{calibration.choice.speedup:.2f}x)")
    else:
        tree = fixed
        say(f"tree: {tree}")
    # hybrid trees rank and size n-gram candidates by what calibration measured
    seed_hybrid(engine, calibration)
    return tree, calibration


def run_with_sidecar(engine, prompts, trees, args, settings, records, fixed, grid):
    """:func:`run_bench` over every configuration, appending each finished row
    to the sidecar; None when interrupted (the sidecar keeps what finished)."""
    sources = args.draft_source
    sidecar = sidecar_path(args.json) if args.json else None
    n_items = sum(min(args.turns, len(p.turns)) for p in prompts)
    n_cfg = len(trees) * len(sources)
    say(f"{n_items} prompt turns x (plain + {n_cfg} speculative configuration{'s' if n_cfg > 1 else ''}: "
        f"{len(trees)} tree{'s' if len(trees) > 1 else ''} x draft sources {','.join(sources)}), "
        f"max_tokens {args.max_tokens}, temp {args.temp}")
    done = {(r["tree"], r["key"], r["turn"]): r for r in records}
    wanted = {(config_label(t, src, sources), prompt_key(p), turn) for t in trees for src in sources
              for p in prompts
              for turn in range(1, min(args.turns, len(p.turns)) + 1)}
    if done:
        say(f"resume: {len(wanted & done.keys())} of {len(wanted)} rows already in {sidecar}"
            + (f" ({len(done.keys() - wanted)} others there are outside this selection and not reported)"
               if done.keys() - wanted else ""))
    mode = {"tree": "auto" if fixed is None else "fixed", "grid": bool(grid)}
    f = None
    if sidecar:
        if not args.resume and sidecar.exists():
            say(f"note: replacing {sidecar} from an earlier run (pass --resume to continue it instead)")
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        f = open(sidecar, "a" if args.resume else "w", encoding="utf-8")
        if f.tell() == 0:
            append_line(f, {"eagle3_mlx_bench_sidecar": 1, "settings": settings})
    try:
        return run_bench(engine, prompts, trees=trees, turns=args.turns, max_tokens=args.max_tokens,
                         temp=args.temp, seed=args.seed, warmup=not args.no_warmup,
                         progress=not args.no_progress, system=args.system, log=say, done=done,
                         on_row=(lambda rec: append_line(f, {**rec, "mode": mode})) if f else None,
                         sources=sources)
    except KeyboardInterrupt:
        if f is None:
            raise
        say(f"interrupted: finished prompts are in {sidecar}; rerun with --resume to continue")
        return None
    finally:
        if f is not None:
            f.close()


def build_result(res, engine, args, prompts, tree, fixed, grid, calibration, machine, model, draft,
                 dtype) -> dict:
    """The JSON record of the run (``--json``)."""
    sources = args.draft_source
    lab = config_label(tree, sources[0], sources)
    rows, total, cats = res["rows"][lab], res["summary"][lab], res["categories"][lab]
    model_desc = {
        "model": str(model), "draft": None if draft is None else str(draft), "dtype": dtype,
        "quantization": quantization_of(engine.model),
        "model_type": engine.target.model_type, "layers": engine.target.num_layers,
        "hidden_size": engine.target.hidden_size, "vocab_size": engine.target.vocab_size,
    }
    result = {
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "config": {
            **model_desc, "prompts": args.prompts, "n_prompts": len(prompts), "turns": args.turns,
            "max_tokens": args.max_tokens, "temp": args.temp, "seed": args.seed, "limit": args.limit,
            "draft_source": ",".join(sources),
            "tree": {"top_k": tree.top_k, "depth": tree.depth, "total_tokens": tree.num_nodes,
                     "source": "auto" if fixed is None else "fixed"},
            "tps_definition": "(tokens - 1) / seconds from the first to the last token",
            "tau_definition": "tokens / target forwards (bonus included; the prefill forward counts)",
        },
        "total": total,
        "categories": cats,
        "prompts": rows,
        "notes": run_notes(total, sources, args.temp),
    }
    if calibration is not None:
        result["calibration"] = {
            "choice": calibration.choice.to_dict(),
            "cache_file": str(cache_path(calibration.key)),
            "verify_ms": calibration.costs.to_dict()["verify_ms"],
            "acceptance_top1": [round(x, 4) for x in calibration.acceptance.top1_rates()],
        }
    if len(sources) > 1:
        result["sources"] = {src: {"summary": res["summary"][config_label(tree, src, sources)],
                                   "categories": res["categories"][config_label(tree, src, sources)]}
                             for src in sources}
    if grid:
        glist = [{"tree": label, "summary": res["summary"][label], "categories": res["categories"][label]}
                 for label in res["summary"]]
        best = max(glist, key=lambda g: g["summary"]["spec_tps"] or 0)
        result["grid"] = glist
        result["grid_best"] = best["tree"]
        if best["summary"]["spec_tps"] and total["spec_tps"]:
            result["chosen_vs_best"] = total["spec_tps"] / best["summary"]["spec_tps"]
    return result


def run_notes(total: dict, sources, temp: float) -> List[str]:
    """What a reader of the numbers must know (an untrained head, differing outputs, sampling)."""
    notes = []
    # The head's own share: one token per forward plus the drafted tokens it proposed.
    src, fwd = total["source_tokens"], total["target_forwards"]
    head_tau = (fwd + sum(v for k, v in src.items() if from_model(k))) / fwd if fwd else None
    if sources[0] != "ngram" and head_tau is not None and head_tau < 1.2:
        notes.append(f"the draft head accepts almost nothing (tau {head_tau:.2f}); it is untrained, "
                     "random or made for another target, so speculation cannot speed anything up here")
    if temp == 0 and total["compared"] and total["identical"] < total["compared"]:
        notes.append(f"{total['compared'] - total['identical']} of {total['compared']} outputs differ from "
                     "plain decoding (near-tie argmax flips between a T-token and a 1-token forward are "
                     "possible in low precision; in float32 this should be rare)")
    if temp > 0:
        notes.append("sampling (temp > 0): outputs are equal in distribution, not token-identical")
    return notes


def print_report(result, res, args, prompts, tree, fixed, grid, model, draft):
    sources = args.draft_source
    lab = config_label(tree, sources[0], sources)
    total = result["total"]
    n_items = sum(min(args.turns, len(p.turns)) for p in prompts)
    print(f"\nmachine : {describe_machine(result['machine'])}")
    print(f"model   : {model} ({result['config']['quantization']}), draft {draft}")
    print(f"drafts  : {sources[0]}; accepted drafted tokens by source {total['source_tokens']}")
    print(f"tree    : {tree}{' (auto)' if fixed is None else ''} | prompts {args.prompts} "
          f"({n_items} turns) | max_tokens {args.max_tokens} | temp {args.temp}")
    if not args.quiet:
        print()
        print(format_rows(res["rows"][lab]))
    print()
    print(format_summary(result["categories"], total))
    if len(sources) > 1:
        print()
        print(format_sources(result["sources"]))
    if grid:
        print()
        print(format_grid(result["grid"], lab if fixed is None else None))
        if "chosen_vs_best" in result:
            print(f"{'auto' if fixed is None else 'chosen'} tree {lab} reaches {result['chosen_vs_best']:.1%} "
                  f"of the best grid tree {result['grid_best']}")
    for n in result["notes"]:
        print(f"note: {n}")


def write_outputs(result, args):
    if args.json:
        write_atomic(Path(args.json), json.dumps(result, indent=1))
        print(f"wrote {args.json} (per-prompt rows also in {sidecar_path(args.json)})")
    if args.plot:
        plot_result(result, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
