"""`eagle3-mlx chat`: the terminal chat (Textual); installed as ``eagle3_mlx.tui``.

The UI thread never touches MLX: ``engine_thread`` owns the engine (see ``app.py``, ``cli.py``)."""
