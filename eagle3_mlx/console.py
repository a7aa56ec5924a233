"""Where progress and notes go: stderr, flushed at once, so that stdout carries
only what a command produces (generate's answer, bench's table)."""
import sys


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
