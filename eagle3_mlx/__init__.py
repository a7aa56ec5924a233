"""eagle3-mlx: lossless EAGLE-3 speculative decoding for MLX."""

__version__ = "0.1.0"

from .head import Eagle3Head, HeadConfig, HeadError, load_head, quantize_head, save_head  # noqa: F401
