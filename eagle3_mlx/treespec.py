"""The shape of a draft tree: (top_k, depth, total_tokens).

Pure Python (no MLX), so the cost model and tree optimiser in ``tuning/`` can
reason about shapes without importing MLX; :mod:`eagle3_mlx.tree` builds trees
of this shape on device.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TreeSpec:
    top_k: int = 4
    depth: int = 4
    total_tokens: int = 16

    def __post_init__(self):
        for name in ("top_k", "depth", "total_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"tree {name} must be a positive integer, got {v!r}")
        if self.total_tokens < 2:
            raise ValueError(f"tree total_tokens must be >= 2 (root + 1 draft), got {self.total_tokens}")

    @property
    def pool_size(self) -> int:
        return self.top_k + self.depth * self.top_k * self.top_k

    @property
    def num_nodes(self) -> int:
        """Tree size including the root."""
        return 1 + min(self.total_tokens - 1, self.pool_size)

    @property
    def is_chain(self) -> bool:
        return self.top_k == 1

    def __str__(self):
        return f"top_k={self.top_k} depth={self.depth} total_tokens={self.num_nodes}"

