"""Errors the chat explains to the user instead of showing a traceback."""

from eagle3_mlx.entry import SetupError

# The chat cannot start a model; the message says what to pass instead.
ChatSetupError = SetupError
