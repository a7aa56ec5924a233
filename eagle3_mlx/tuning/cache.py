"""Calibrations on disk: what was measured, for which target, head and machine.

Contract: a :class:`Calibration` (costs, acceptance, chosen tree, n-gram counts)
is stored under :func:`calibration_key` (target and head identity, quantization,
:func:`eagle3_mlx.platform.device_description`, mlx version) in
``$EAGLE3_MLX_HOME/calibration``; :func:`load_calibration` returns it only for
exactly that key. Writes are atomic. Nothing here measures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from ..files import write_atomic
from ..platform import cache_home, device_description
from ..treespec import TreeSpec
from .acceptance import AcceptanceModel
from .costs import CostModel
from .optimise import Candidate, evaluate, optimise

# 2: n-gram counts split into a candidate's first token and the tokens after it
CACHE_FORMAT = 2


def cache_dir() -> Path:
    return cache_home() / "calibration"


def _module_digest(module, config) -> str:
    import numpy as np
    import mlx.core as mx
    from mlx.utils import tree_flatten

    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = tree_flatten(module.parameters())
    picks = params[:2] + params[len(params) // 2 : len(params) // 2 + 1] + params[-2:]
    for name, p in picks:
        flat = p.reshape(-1)[:2048]
        if mx.issubdtype(flat.dtype, mx.floating):
            flat = flat.astype(mx.float32)
        h.update(name.encode())
        h.update(str(p.shape).encode())
        h.update(np.array(flat).tobytes())
    return h.hexdigest()[:16]


def _config_dict(obj) -> dict:
    if obj is None:
        return {}
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return dict(vars(obj))


def quantization_of(model) -> str:
    """'float32', 'bfloat16', 'q4g64', 'q8g64-mxfp4', ... of a target or head."""
    import mlx.core as mx
    import mlx.nn as nn

    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            mode = getattr(m, "mode", "affine")
            s = f"q{m.bits}g{m.group_size}"
            return s if mode == "affine" else f"{s}-{mode}"
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return str(p.dtype).replace("mlx.core.", "")
    return "unknown"


def model_identity(model) -> dict:
    args = getattr(model, "args", None)
    cfg = _config_dict(args)
    return {
        "model_type": cfg.get("model_type", type(model).__name__),
        "hidden_size": cfg.get("hidden_size"),
        "num_layers": cfg.get("num_hidden_layers"),
        "vocab_size": cfg.get("vocab_size"),
        "digest": _module_digest(model, cfg),
    }


def head_identity(head) -> dict:
    cfg = head.config.to_dict() if hasattr(head.config, "to_dict") else _config_dict(head.config)
    return {"hidden_size": cfg.get("hidden_size"), "draft_vocab_size": cfg.get("draft_vocab_size"),
            "digest": _module_digest(head, cfg)}


def calibration_key(model, head, *, device: Optional[dict] = None, mlx_version: Optional[str] = None,
                    quantization: Optional[str] = None) -> dict:
    """Everything a calibration depends on. The overrides exist for tests."""
    import mlx.core as mx

    return {
        "format": CACHE_FORMAT,
        "model": model_identity(model),
        "head": head_identity(head),
        "quantization": quantization or f"{quantization_of(model)}/{quantization_of(head)}",
        "device": device or device_description(),
        "mlx": mlx_version or mx.__version__,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(key: dict, directory: Optional[Path] = None) -> Path:
    directory = Path(directory) if directory else cache_dir()
    m = key["model"]
    return directory / f"{m.get('model_type', 'model')}-{m.get('digest', '')[:8]}-{key_digest(key)}.json"


def load_calibration(key: dict, directory: Optional[Path] = None) -> Optional["Calibration"]:
    """The cached calibration for exactly this key, or None."""
    p = cache_path(key, directory)
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("key") != key:
        return None
    try:
        return Calibration.from_dict(rec)
    except (KeyError, TypeError, ValueError):
        return None


def save_calibration(cal: "Calibration", directory: Optional[Path] = None) -> Path:
    p = cache_path(cal.key, directory)
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(p, json.dumps(cal.to_dict(), indent=1))


def list_calibrations(directory: Optional[Path] = None) -> List[Tuple[Path, dict]]:
    directory = Path(directory) if directory else cache_dir()
    out = []
    for p in sorted(directory.glob("*.json")):
        try:
            out.append((p, json.loads(p.read_text())))
        except (OSError, ValueError):
            continue
    return out


@dataclass
class Calibration:
    key: dict
    costs: CostModel
    acceptance: AcceptanceModel
    choice: Optional[Candidate] = None
    created: float = field(default_factory=time.time)
    seconds: float = 0.0
    online_steps: int = 0
    info: dict = field(default_factory=dict)
    # n-gram drafts' acceptance on the same continuations,
    # {"first"|"later": {match_len: [accepted, rejected]}} (NgramAcceptance.counts)
    ngram: dict = field(default_factory=dict)

    def pick(self, **kw) -> Tuple[Candidate, List[Candidate]]:
        best, cands = optimise(self.costs, self.acceptance, **kw)
        self.choice = best
        return best, cands

    @property
    def spec(self) -> TreeSpec:
        if self.choice is None:
            self.pick()
        return self.choice.spec

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "costs": self.costs.to_dict(),
            "acceptance": self.acceptance.to_dict(),
            "choice": None if self.choice is None else self.choice.to_dict(),
            "created": self.created,
            "seconds": round(self.seconds, 2),
            "online_steps": self.online_steps,
            "info": self.info,
            "ngram": {kind: {str(n): c for n, c in cells.items()} for kind, cells in self.ngram.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        cal = cls(key=d["key"], costs=CostModel.from_dict(d["costs"]),
                  acceptance=AcceptanceModel.from_dict(d["acceptance"]), created=d.get("created", 0.0),
                  seconds=d.get("seconds", 0.0), online_steps=d.get("online_steps", 0),
                  info=d.get("info", {}),
                  ngram={kind: {int(n): c for n, c in cells.items()}
                         for kind, cells in d.get("ngram", {}).items()})
        c = d.get("choice")
        if c:
            cal.choice = evaluate(TreeSpec(c["top_k"], c["depth"], c["total_tokens"]), cal.costs,
                                  cal.acceptance)
        return cal
