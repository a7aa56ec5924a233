"""Target features, cached on disk.

For every data shard ``data/shard_XXXXX.npz`` this stage writes
``features/feat_XXXXX.npy`` ([n_tokens, 3*Ht] float16: the three aux hidden
states, exactly what :meth:`TargetModel.forward` returns to the engine) and
``features/hid_XXXXX.npy`` ([n_tokens, Ht] float16: the target's final *normed*
hidden state). The teacher over the draft vocabulary is recomputed in the
trainer as ``softmax(hid @ lm_head[used].T)``, so neither the full-vocabulary
softmax nor the draft-vocabulary logits are ever stored: disk use is
``(3*Ht + Ht) * 2`` bytes per token (7 KiB for a 896-wide target).
Shards holding given (teacher-forced) answers also get ``top1_XXXXX.npy``
(int32 per token): the target's greedy prediction, which the generated
shards already carry and which decides the positions that reach the loss.

Why cached and not online: one target forward costs several times a whole
7-step TTT step of the head per token, and training reads every token
``epochs`` times; see the measured numbers in docs/training.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..files import write_atomic
from .data import read_shard, shard_paths


def bytes_per_token(target_hidden_size: int) -> int:
    return (3 * target_hidden_size + target_hidden_size) * 2


def feature_paths(feat_dir: Path, shard: Path):
    i = shard.stem.split("_")[-1]
    return Path(feat_dir) / f"feat_{i}.npy", Path(feat_dir) / f"hid_{i}.npy"


def extract_sequence(target, tokens: np.ndarray, chunk: int = 0):
    """(features [n, 3Ht], final normed hidden [n, Ht]) as float16 numpy arrays.
    With ``cache=None`` the target runs causal attention over the tokens; the
    lm_head is built lazily and never evaluated."""
    import mlx.core as mx

    x = mx.array(np.asarray(tokens, dtype=np.int32))[None]
    if chunk and x.shape[1] > chunk:
        cache = target.make_cache()
        fs, hs = [], []
        for s in range(0, x.shape[1], chunk):
            _, f, h = target.forward(x[:, s:s + chunk], cache, return_hidden=True)
            f, h = f.astype(mx.float16), h.astype(mx.float16)
            mx.eval(f, h)
            fs.append(np.array(f[0]))
            hs.append(np.array(h[0]))
        return np.concatenate(fs), np.concatenate(hs)
    _, f, h = target.forward(x, None, return_hidden=True)
    f, h = f.astype(mx.float16)[0], h.astype(mx.float16)[0]
    mx.eval(f, h)
    return np.array(f), np.array(h)


def top1_path(feat_dir: Path, shard: Path) -> Path:
    return Path(feat_dir) / f"top1_{shard.stem.split('_')[-1]}.npy"


def needs_top1(seq) -> bool:
    """Sequences with a given (not target-generated) answer have no greedy
    prediction stored; the features pass supplies it."""
    return bool((seq.top1[seq.n_prompt - 1: len(seq.tokens) - 1] < 0).any())


def answer_top1(target, hid: np.ndarray, seq, chunk: int = 256) -> np.ndarray:
    """``seq.top1`` with the target's greedy prediction filled in at every
    answer position (from the final normed hidden state, full vocabulary)."""
    import mlx.core as mx

    top = np.array(seq.top1, dtype=np.int32, copy=True)
    lo, hi = seq.n_prompt - 1, len(seq.tokens) - 1
    for s in range(lo, hi, chunk):
        e = min(s + chunk, hi)
        logits = target.lm_head(mx.array(hid[s:e]).astype(mx.float32))
        top[s:e] = np.array(mx.argmax(logits, axis=-1))
    return top


def extract_features(target, data_dir: Path, feat_dir: Path, *, max_disk_gb: float = 8.0,
                     progress: bool = True, log=print) -> dict:
    """Extract features for every data shard that has none yet (resumable:
    one feature file pair per data shard, each written atomically)."""
    feat_dir = Path(feat_dir)
    feat_dir.mkdir(parents=True, exist_ok=True)
    shards = shard_paths(data_dir)
    bpt = bytes_per_token(target.hidden_size)
    todo = []
    total_tokens = 0
    for sp in shards:
        fp, hp = feature_paths(feat_dir, sp)
        seqs = read_shard(sp)
        n = sum(len(s.tokens) for s in seqs)
        total_tokens += n
        if not (fp.exists() and hp.exists()) or (
                any(needs_top1(s) for s in seqs) and not top1_path(feat_dir, sp).exists()):
            todo.append((sp, seqs, n))
    need_gb = total_tokens * bpt / 1e9
    if need_gb > max_disk_gb:
        raise SystemExit(
            f"features for {total_tokens} tokens need {need_gb:.2f} GB on disk, over the "
            f"--max-feature-gb limit of {max_disk_gb} GB; generate less data or raise the limit"
        )
    stats = dict(tokens=total_tokens, disk_gb=round(need_gb, 3), bytes_per_token=bpt,
                 shards=len(shards), extracted_shards=len(todo))
    if not todo:
        return stats
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(n for _, _, n in todo), desc="features", unit="tok",
                   dynamic_ncols=True, unit_scale=True)
    t0 = time.perf_counter()
    done_tok = 0
    try:
        for sp, seqs, n in todo:
            fs, hs, tops = [], [], []
            fill = any(needs_top1(s) for s in seqs)
            for s in seqs:
                f, h = extract_sequence(target, s.tokens)
                fs.append(f)
                hs.append(h)
                if fill:
                    tops.append(answer_top1(target, h, s))
                if bar is not None:
                    bar.update(len(s.tokens))
            F, Hh = np.concatenate(fs), np.concatenate(hs)
            fp, hp = feature_paths(feat_dir, sp)
            # top1 first: the feature pair's presence marks the shard as done.
            if fill:
                T1 = np.concatenate(tops)
                write_atomic(top1_path(feat_dir, sp), lambda fh: np.save(fh, T1))
            write_atomic(hp, lambda fh: np.save(fh, Hh))
            write_atomic(fp, lambda fh: np.save(fh, F))
            done_tok += n
    finally:
        if bar is not None:
            bar.close()
    el = time.perf_counter() - t0
    stats.update(elapsed_s=round(el, 2), tokens_per_s=round(done_tok / max(el, 1e-9), 2))
    return stats


class FeatureStore:
    """All sequences with memory-mapped features, for the trainer."""

    def __init__(self, data_dir: Path, feat_dir: Path, split_of=None):
        self.items: List[dict] = []
        for sp in shard_paths(data_dir):
            fp, hp = feature_paths(feat_dir, sp)
            if not (fp.exists() and hp.exists()):
                continue
            F = np.load(fp, mmap_mode="r")
            Hh = np.load(hp, mmap_mode="r")
            tp = top1_path(feat_dir, sp)
            T1 = np.load(tp) if tp.exists() else None
            off = 0
            for s in read_shard(sp):
                n = len(s.tokens)
                if T1 is not None:
                    s.top1 = T1[off:off + n]
                self.items.append(dict(seq=s, feat=F[off:off + n], hid=Hh[off:off + n]))
                off += n

    def split(self, prompts: Optional[List[dict]], max_train: Optional[int] = None):
        """(train, held-out) items; only the first ``max_train`` train prompts."""
        from .data import selected_indices

        keep = set(selected_indices(prompts, max_train)) if prompts else None
        train, held = [], []
        for it in self.items:
            i = it["seq"].prompt_idx
            if keep is not None and i not in keep:
                continue
            sp = prompts[i].get("split", "train") if prompts else "train"
            (held if sp == "heldout" else train).append(it)
        return train, held
