"""All-or-nothing output directories.

Conversion writes into a hidden temporary directory beside OUT and renames it
to OUT only when everything is written, so an error, Ctrl-C or SIGTERM never
leaves a half-written OUT (and, with --force, the old OUT stays until the new
one is complete).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path

from .errors import ConvertError


def check_output(out, force: bool) -> Path:
    """Refuse an existing OUT unless ``force``; return it as a Path."""
    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        if not force:
            raise ConvertError(out, "already exists (pass --force to replace it)")
        if not out.is_dir() or out.is_symlink():
            raise ConvertError(out, "exists and is not a directory; refusing to replace it")
    if not out.parent.exists():
        raise ConvertError(out.parent, "parent directory does not exist")
    return out


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so the cleanup below also runs on kill."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def staged_output(out, force: bool = False):
    """Yield an empty staging directory; on success it becomes ``out``.

    On any exception (KeyboardInterrupt included) the staging directory is
    removed and ``out`` is left exactly as it was.
    """
    out = check_output(out, force)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage = out.parent / f".{out.name}.partial-{tag}"
    stage.mkdir()
    with _sigterm_as_interrupt():
        try:
            yield stage
            # Re-check: something may have created OUT while we were working.
            check_output(out, force)
            if out.exists():
                old = out.parent / f".{out.name}.old-{tag}"
                os.rename(out, old)
                try:
                    os.rename(stage, out)
                except BaseException:
                    os.rename(old, out)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(stage, out)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
