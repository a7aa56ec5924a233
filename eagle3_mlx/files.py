"""Writing files so a reader never sees half of one.

Contract: :func:`write_atomic` leaves ``path`` either as it was or holding all
of ``data``, whatever interrupts the write (the data goes to a temporary file
beside it, which is then renamed over it; a rename within one directory is
atomic on POSIX and Windows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union


def write_atomic(path, data: Union[str, bytes]) -> Path:
    """Write ``data`` (text or bytes) to ``path`` all-or-nothing; returns the path."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)
    return path
