"""eagle3-mlx: lossless EAGLE-3 speculative decoding for MLX."""

__version__ = "0.1.0"

from .api import generate, load, stream_generate  # noqa: F401
from .engine import ContextLimitError, Engine, GenerationResponse  # noqa: F401
from .head import Eagle3Head, HeadConfig, HeadError, load_head, quantize_head, save_head  # noqa: F401
from .target import TargetModel, UnsupportedModelError  # noqa: F401
from .tree import TreeSpec  # noqa: F401
