"""Errors the chat explains to the user instead of showing a traceback."""


class ChatSetupError(RuntimeError):
    """The chat cannot start a model; the message says what to pass instead."""
