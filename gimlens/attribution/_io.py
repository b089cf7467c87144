"""Atomic file writes: a reader sees the old file or the complete new one, never a part."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import GimlensError

__all__ = ["atomic_write", "check_writable"]


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """The path, after checking that its folder exists and it is not a folder itself."""
    p = Path(path)
    if p.is_dir():
        raise GimlensError(f"{what} path {str(p)!r} is a folder; expected a file name")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise GimlensError(f"the folder of {what} path {str(p)!r} does not exist")
    return p


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    p = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
