"""Bad input, told in one line: which file, and what is wrong with it.

Every command ends a run on unusable input with exit status 2 and one line, never a traceback (a traceback
says the program is broken, which it is not). The readers raise errors that name the file and line where
they can (``AnnotationError``, ``SweepConfigError``...); an ``OSError`` from the operating system names its
file too, but in Python's spelling (``[Errno 21] Is a directory: '/x'``), which ``describe`` rewrites.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from timerefine.data.storage import StorageError

# What bad input raises: a reader's ValueError (a malformed file, UnicodeDecodeError included), the operating
# system's OSError (a missing, unreadable or unwritable path), a location that cannot be reached.
INPUT_ERRORS = (ValueError, OSError, StorageError)

_REASONS = {
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EEXIST: "already exists as a file",
    errno.EACCES: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
}


def describe(error: BaseException) -> str:
    """``error`` as one line for the person who gave the input: ``PATH: reason`` for operating-system
    errors, the message itself for the readers' errors (which name their file)."""
    if isinstance(error, OSError) and error.filename is not None:
        reason = _REASONS.get(error.errno or 0) or (error.strerror or str(error)).lower()
        return f"{os.fsdecode(error.filename)}: {reason}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def check_output_path(path: str | Path, *, folder: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a folder where a file is wanted (or a file
    where a folder is), or a path below an existing file."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise ValueError(f"{path}: is a file; the output must be a folder (or not exist yet)")
        if not folder and path.is_dir():
            raise ValueError(f"{path}: is a folder; the output must be a file name")
        return
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{path}: cannot be written, {parent} is a file, not a folder")
            return
