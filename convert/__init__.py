"""`eagle3-mlx convert`: published checkpoints (PyTorch or GGUF targets, every EAGLE-3 head
layout) to MLX directories; installed as ``eagle3_mlx.convert`` (see ``cli.py``)."""
