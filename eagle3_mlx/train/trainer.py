"""TTT training loop: batching, AdamW + warm-up/cosine, clipping, held-out
per-step accuracy, checkpoints and exact resume.

Determinism: the head is initialised from ``seed``; epoch e visits the batches
in ``np.random.default_rng([seed, e]).permutation`` order; a checkpoint stores
the trainable weights, the optimizer state and the step. Resuming therefore
replays exactly the remaining batches, and (same seed, same data) ends with
the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..files import staged_dir
from ..head import Eagle3Head, HeadConfig
from .ttt import softmax, ttt_loss


@dataclass
class TrainConfig:
    steps_ttt: int = 7
    decay: float = 0.8
    lr: float = 3e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    epochs: float = 2.0
    max_steps: Optional[int] = None
    batch_tokens: int = 2048
    max_batch_seqs: int = 16
    grad_clip: float = 0.5
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    eval_every: int = 100
    ckpt_every: int = 50
    keep_ckpts: int = 2
    log_every: int = 10

    def to_dict(self):
        return asdict(self)


# ----------------------------------------------------------------------------
# Head construction


def head_config_for(target, *, draft_vocab_size: int, intermediate_size: Optional[int] = None,
                    num_attention_heads: Optional[int] = None,
                    num_key_value_heads: Optional[int] = None, head_dim: Optional[int] = None,
                    max_position_embeddings: int = 2048, fc_norm: bool = False,
                    norm_output: bool = False, qwen3_layer: bool = False,
                    draft_window: Optional[int] = None) -> HeadConfig:
    """The head for ``target``; the 2026 options: ``fc_norm`` / ``norm_output``
    (EAGLE-3.1), ``qwen3_layer`` (q/k RMSNorm per head) and ``draft_window``
    (sliding-window attention in the draft layer)."""
    args = target.model.args
    nh = num_attention_heads or args.num_attention_heads
    nkv = num_key_value_heads or getattr(args, "num_key_value_heads", nh)
    hd = head_dim or getattr(args, "head_dim", None) or target.hidden_size // args.num_attention_heads
    return HeadConfig(
        hidden_size=target.hidden_size,
        intermediate_size=intermediate_size or args.intermediate_size,
        num_attention_heads=nh,
        num_key_value_heads=nkv,
        head_dim=hd,
        vocab_size=target.vocab_size,
        draft_vocab_size=draft_vocab_size,
        target_hidden_size=target.hidden_size,
        rms_norm_eps=getattr(args, "rms_norm_eps", 1e-6),
        rope_theta=10000.0,
        max_position_embeddings=max_position_embeddings,
        aux_layer_ids=list(target.aux_layer_ids),
        fc_norm=fc_norm,
        norm_output=norm_output,
        qk_norm=qwen3_layer,
        sliding_window=draft_window or None,
    )


def lm_head_rows(target, used) -> mx.array:
    """The target's lm_head rows for the target ids ``used`` (float32), read from
    the weights (dequantized if needed) without a full-vocabulary matmul."""
    m = target.model
    mod = m.lm_head if "lm_head" in m else target.inner.embed_tokens
    idx = mx.array(np.asarray(used, dtype=np.int32))
    if hasattr(mod, "scales"):
        w = mx.dequantize(mod.weight[idx], mod.scales[idx],
                          None if getattr(mod, "biases", None) is None else mod.biases[idx],
                          group_size=mod.group_size, bits=mod.bits,
                          **({"mode": mod.mode} if hasattr(mod, "mode") else {}))
    else:
        w = mod.weight[idx]
    return w.astype(mx.float32)


def init_head(cfg: HeadConfig, d2t, *, seed: int, target=None, used=None,
              from_target: bool = True) -> Eagle3Head:
    """A fresh head. ``from_target``: lm_head from the target's rows for the
    draft vocabulary, final norm from the target's, and ``fc`` starting as the
    projection onto the high feature block (so the head starts as an extra
    layer on top of layer L-3); the rest uses MLX's default init."""
    mx.random.seed(seed)
    head = Eagle3Head(cfg)
    head.set_vocab_mapping(mx.array(np.asarray(d2t)).astype(mx.int32))
    if from_target and target is not None and used is not None:
        head.lm_head.weight = lm_head_rows(target, used)
        norm = target.inner.norm
        if hasattr(norm, "weight") and norm.weight.shape == head.norm.weight.shape:
            head.norm.weight = norm.weight.astype(mx.float32)
        if cfg.hidden_size == cfg.target_hidden_size:
            H = cfg.hidden_size
            w = head.fc.weight * 0.1
            w = mx.concatenate([w[:, : 2 * H], w[:, 2 * H:] + mx.eye(H)], axis=1)
            head.fc.weight = w
    mx.eval(head.parameters())
    return head


# ----------------------------------------------------------------------------
# Batching


def make_batches(items: List[dict], batch_tokens: int, max_batch_seqs: int) -> List[List[int]]:
    """Deterministic length-bucketed batches of item indices (padded tokens per
    batch <= batch_tokens, unless a single sequence is longer)."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i]["seq"].tokens), i))
    batches, cur, cur_max = [], [], 0
    for i in order:
        n = len(items[i]["seq"].tokens) - 1
        new_max = max(cur_max, n)
        if cur and (new_max * (len(cur) + 1) > batch_tokens or len(cur) >= max_batch_seqs):
            batches.append(cur)
            cur, new_max = [], n
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def collate(items: List[dict], idx: List[int], t2d: np.ndarray, steps: int, dtype=np.float32) -> dict:
    """numpy arrays for :func:`ttt_loss` with row gathering.

    Index t of a sequence pairs (f_t, x_{t+1}), t = 0..n-2. Only indices
    t >= n_prompt - steps can reach a loss at some TTT step, so the unroll runs
    on ``rows`` = start_b + k (k < R) and the prompt indices before them only
    provide step-0 keys/values. Columns j of ``tokens_rows``/``hid_rows``/
    ``valid`` stand for position start_b + j + 1."""
    seqs = [items[i] for i in idx]
    B = len(seqs)
    T = max(len(it["seq"].tokens) - 1 for it in seqs)
    starts = [max(0, it["seq"].n_prompt - steps) for it in seqs]
    R = max(len(it["seq"].tokens) - 1 - st for it, st in zip(seqs, starts))
    W = R + steps
    F = seqs[0]["feat"].shape[1]
    Ht = seqs[0]["hid"].shape[1]
    feats = np.zeros((B, T, F), dtype=dtype)
    tokens = np.zeros((B, T), dtype=np.int32)
    rows = np.zeros((B, R), dtype=np.int32)
    tok_r = np.zeros((B, W), dtype=np.int32)
    hid_r = np.zeros((B, W, Ht), dtype=dtype)
    valid = np.zeros((B, W), dtype=np.float32)
    for b, (it, st) in enumerate(zip(seqs, starts)):
        s = it["seq"]
        n = len(s.tokens)
        feats[b, : n - 1] = it["feat"][: n - 1]
        tokens[b, : n - 1] = s.tokens[1:]
        rows[b] = np.minimum(st + np.arange(R), T - 1)
        m = n - 1 - st                     # positions st+1 .. n-1
        tok_r[b, :m] = s.tokens[st + 1 : n]
        hid_r[b, :m] = it["hid"][st + 1 : n]
        j = np.arange(st + 1, n)
        top = s.top1[st + 1 : n]
        ok = (j >= s.n_prompt) & (top >= 0)
        ok[ok] &= t2d[top[ok]]
        valid[b, :m] = ok
    return dict(feats=feats, tokens=tokens, rows=rows, tokens_rows=tok_r, hid_rows=hid_r,
                valid=valid, T=T)


# ----------------------------------------------------------------------------
# Trainer


class Trainer:
    def __init__(self, head: Eagle3Head, target, w_used: mx.array, t2d: np.ndarray,
                 train_items: List[dict], heldout_items: List[dict], cfg: TrainConfig,
                 out_dir: Path, log=print):
        self.head, self.target, self.w_used, self.t2d = head, target, w_used, t2d
        self.train_items, self.heldout_items = train_items, heldout_items
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.log = log
        self.batches = make_batches(train_items, cfg.batch_tokens, cfg.max_batch_seqs)
        self.heldout_batches = make_batches(heldout_items, cfg.batch_tokens, cfg.max_batch_seqs)
        nb = len(self.batches)
        self.total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * nb)))
        warm = min(cfg.warmup_steps, max(1, self.total_steps // 10))
        self.warmup = warm
        sched = optim.join_schedules(
            [optim.linear_schedule(cfg.lr * 0.01, cfg.lr, warm),
             optim.cosine_decay(cfg.lr, max(1, self.total_steps - warm), cfg.lr * cfg.min_lr_ratio)],
            [warm],
        )
        self.opt = optim.AdamW(learning_rate=sched, betas=[cfg.beta1, cfg.beta2],
                               weight_decay=cfg.weight_decay)
        self.step = 0
        self.history: List[dict] = []
        self.train_time_s = 0.0
        self._vg = nn.value_and_grad(head, self._loss)

    # -- batches --------------------------------------------------------------

    def batch_at(self, step: int) -> List[int]:
        nb = len(self.batches)
        epoch, k = divmod(step, nb)
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(nb)
        return self.batches[int(perm[k])]

    def _arrays(self, items, idx):
        c = collate(items, idx, self.t2d, self.cfg.steps_ttt)
        dt = getattr(mx, self.cfg.dtype)
        embed = lambda t: mx.stop_gradient(self.target.embed(mx.array(t))).astype(dt)
        tl = mx.array(c["hid_rows"]) @ self.w_used.T
        tprob = mx.stop_gradient(softmax(tl.astype(mx.float32)))
        return (mx.array(c["feats"]).astype(dt), embed(c["tokens"]), tprob, mx.array(c["valid"]),
                mx.array(c["rows"]), embed(c["tokens_rows"]))

    def _loss(self, feats, emb, tprob, valid, rows, emb_rows):
        return ttt_loss(self.head, feats, emb, tprob, valid, self.cfg.steps_ttt, self.cfg.decay,
                        rows=rows, emb_rows=emb_rows)

    # -- one step ---------------------------------------------------------------

    def train_step(self, idx):
        arrays = self._arrays(self.train_items, idx)
        (loss, losses, correct, counts), grads = self._vg(*arrays)
        grads, gnorm = optim.clip_grad_norm(grads, self.cfg.grad_clip)
        self.opt.update(self.head, grads)
        mx.eval(self.head.parameters(), self.opt.state, loss, losses, correct, counts, gnorm)
        ntok = int(arrays[0].shape[0] * arrays[0].shape[1])
        return dict(loss=loss.item(), gnorm=gnorm.item(), tokens=ntok,
                    step_loss=np.array(losses).tolist(),
                    acc=(np.array(correct) / np.maximum(np.array(counts), 1)).tolist())

    def evaluate(self, max_batches: Optional[int] = None) -> dict:
        if not self.heldout_batches:
            return {}
        corr = np.zeros(self.cfg.steps_ttt)
        cnt = np.zeros(self.cfg.steps_ttt)
        loss_sum, n = 0.0, 0
        for idx in self.heldout_batches[:max_batches]:
            arrays = self._arrays(self.heldout_items, idx)
            loss, _, c, k = self._loss(*arrays)
            mx.eval(loss, c, k)
            corr += np.array(c)
            cnt += np.array(k)
            loss_sum += loss.item()
            n += 1
        return dict(heldout_loss=loss_sum / max(n, 1),
                    heldout_acc=(corr / np.maximum(cnt, 1)).round(4).tolist(),
                    heldout_positions=int(cnt[0]))

    # -- checkpoints --------------------------------------------------------------

    def save_checkpoint(self):
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        final = self.ckpt_dir / f"step_{self.step:07d}"
        with staged_dir(final) as tmp:
            mx.save_safetensors(str(tmp / "head.safetensors"),
                                dict(tree_flatten(self.head.trainable_parameters())))
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(self.opt.state)))
            (tmp / "state.json").write_text(json.dumps(dict(
                step=self.step, total_steps=self.total_steps, train_time_s=self.train_time_s,
                history=self.history, config=self.cfg.to_dict()), indent=1))
        for old in sorted(self.ckpt_dir.glob("step_*"))[: -self.cfg.keep_ckpts]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Optional[Path]:
        if not self.ckpt_dir.exists():
            return None
        c = [p for p in sorted(self.ckpt_dir.glob("step_*")) if (p / "state.json").exists()]
        return c[-1] if c else None

    def load_checkpoint(self, path: Path):
        w = mx.load(str(path / "head.safetensors"))
        self.head.load_weights(list(w.items()), strict=False)
        st = mx.load(str(path / "optimizer.safetensors"))
        self.opt.state = tree_unflatten(list(st.items()))
        meta = json.loads((path / "state.json").read_text())
        self.step = int(meta["step"])
        self.train_time_s = float(meta.get("train_time_s", 0.0))
        self.history = meta.get("history", [])
        mx.eval(self.head.parameters(), self.opt.state)

    # -- loop ---------------------------------------------------------------------

    def fit(self, *, progress: bool = True, stop_after: Optional[int] = None,
            time_budget_s: Optional[float] = None) -> dict:
        """Train to ``total_steps`` (resuming from the latest checkpoint).
        ``stop_after``: stop (with a checkpoint) after that many steps of this
        call, as if the process had been killed; for tests."""
        ck = self.latest_checkpoint()
        if ck is not None:
            self.load_checkpoint(ck)
            self.log(f"resumed from {ck.name} (step {self.step}/{self.total_steps})")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                       dynamic_ncols=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.out_dir / "train_log.jsonl", "a")
        t_call = time.perf_counter()
        done_here = 0
        win = dict(loss=0.0, n=0, tok=0, t=0.0, acc=np.zeros(self.cfg.steps_ttt))
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                r = self.train_step(self.batch_at(self.step))
                dt = time.perf_counter() - t0
                self.train_time_s += dt
                self.step += 1
                done_here += 1
                win["loss"] += r["loss"]
                win["n"] += 1
                win["tok"] += r["tokens"]
                win["t"] += dt
                win["acc"] += np.array(r["acc"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{r['loss']:.3f}", acc0=f"{r['acc'][0]:.2f}",
                                    tok_s=f"{win['tok'] / max(win['t'], 1e-9):.0f}")
                rec = None
                if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                    rec = dict(step=self.step, lr=float(self.opt.learning_rate.item()),
                               loss=round(win["loss"] / win["n"], 5),
                               train_acc=(win["acc"] / win["n"]).round(4).tolist(),
                               tokens_per_s=round(win["tok"] / max(win["t"], 1e-9), 1),
                               gnorm=round(r["gnorm"], 4))
                    win = dict(loss=0.0, n=0, tok=0, t=0.0, acc=np.zeros(self.cfg.steps_ttt))
                if self.cfg.eval_every and (self.step % self.cfg.eval_every == 0
                                            or self.step == self.total_steps):
                    ev = self.evaluate()
                    if ev:
                        rec = dict(rec or dict(step=self.step), **ev)
                        self.log(f"step {self.step}: held-out acc per TTT step "
                                 f"{ev['heldout_acc']} loss {ev['heldout_loss']:.4f}")
                if rec is not None:
                    self.history.append(rec)
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                stop_now = (stop_after is not None and done_here >= stop_after) or (
                    time_budget_s is not None and time.perf_counter() - t_call > time_budget_s)
                if self.step % self.cfg.ckpt_every == 0 or self.step == self.total_steps or stop_now:
                    self.save_checkpoint()
                if stop_now:
                    break
        finally:
            logf.close()
            if bar is not None:
                bar.close()
        return dict(step=self.step, total_steps=self.total_steps, train_time_s=round(self.train_time_s, 1),
                    finished=self.step >= self.total_steps,
                    last=self.history[-1] if self.history else None)
