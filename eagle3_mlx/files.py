"""Writing files and directories so a reader never sees half of one.

Contract: :func:`write_atomic` leaves ``path`` either as it was or holding all
of its new content, whatever interrupts the write (the content goes to a
temporary file beside it, flushed to disk, which is then renamed over it; a
rename within one directory is atomic on POSIX and Windows).
:func:`staged_dir` does the same for a whole directory: the caller fills an
empty staging directory beside ``out``, which replaces ``out`` only when the
``with`` block ends without an exception (Ctrl-C and SIGTERM included); on any
failure the staging directory is removed and ``out`` is left as it was. Those
are the only two implementations of the job in the package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Union


def write_atomic(path, data: Union[str, bytes, Callable[[BinaryIO], object]]) -> Path:
    """Write ``data`` to ``path`` all-or-nothing; returns the path.

    ``data`` is text, bytes, or a function that writes to the open binary file
    (large arrays stream to disk without a copy in memory)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            # the data must be on disk before the rename is, or a crash can
            # leave the new name pointing at an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
def staged_dir(out, check: Optional[Callable[[], object]] = None) -> Iterator[Path]:
    """Yield an empty hidden staging directory beside ``out``; on success it
    becomes ``out`` (an existing ``out`` is replaced, and stays until the new
    one is complete). ``check`` runs just before the swap (something may have
    created ``out`` meanwhile) and may raise to refuse it."""
    out = Path(out)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage = out.parent / f".{out.name}.partial-{tag}"
    stage.mkdir()
    with _sigterm_as_interrupt():
        try:
            yield stage
            if check is not None:
                check()
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
