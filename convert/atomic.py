"""All-or-nothing output directories for the converter.

Conversion writes into a hidden temporary directory beside OUT and renames it
to OUT only when everything is written, so an error, Ctrl-C or SIGTERM never
leaves a half-written OUT (and, with --force, the old OUT stays until the new
one is complete). The staging itself is :func:`eagle3_mlx.files.staged_dir`;
this module adds the converter's refusals (an existing OUT without --force, a
file in its place, a missing parent) as :class:`ConvertError`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from eagle3_mlx.files import staged_dir

from eagle3_mlx.convert.errors import ConvertError


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
def staged_output(out, force: bool = False):
    """Yield an empty staging directory; on success it becomes ``out``.

    On any exception (KeyboardInterrupt included) the staging directory is
    removed and ``out`` is left exactly as it was.
    """
    out = check_output(out, force)
    with staged_dir(out, check=lambda: check_output(out, force)) as stage:
        yield stage
