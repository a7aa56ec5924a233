"""The one error type of `eagle3-mlx convert`: it names the offending file and
the reason, and the CLI prints it as a single line (no traceback)."""

from __future__ import annotations


class ConvertError(Exception):
    def __init__(self, file, reason: str):
        self.file = str(file)
        # Keep it on one line: nested library messages often carry newlines.
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{self.file}: {self.reason}")


def short(exc: BaseException, limit: int = 300) -> str:
    """One line describing a library exception, cut to ``limit`` characters."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class GGUFError(ValueError):
    """A GGUF file that cannot be converted: corrupt, truncated or unsupported.

    ``str(err)`` is a single line that names the file and the reason.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # keep it on one line
        super().__init__(f"{self.path}: {self.reason}")
