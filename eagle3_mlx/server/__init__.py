"""`eagle3-mlx serve`: an OpenAI-compatible local HTTP server (see app.py, worker.py, cli.py)."""
