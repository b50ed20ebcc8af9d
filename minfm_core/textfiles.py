"""Files from outside minFM's own hands (a caption sidecar, a dataset's metadata, a label
list, a labels JSON that came with a download): read whole only when they are no larger
than their kind can be, and decoded as UTF-8, with every way that fails one MinfmError
naming the file (never a UnicodeDecodeError traceback, never a gigabyte read into memory).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import MinfmError, os_error_line


def read_bounded(path: str | Path, where: str, max_bytes: int) -> bytes:
    """The bytes of ``path``, refused unread when it holds more than ``max_bytes``.

    Only a regular file is read (a link to one is followed): a FIFO would block the reader
    forever and ``/dev/zero`` reports size 0 yet never ends. The file is opened without
    blocking and checked on its descriptor, and at most ``max_bytes + 1`` bytes are read,
    so a file swapped or grown after the check still cannot hang or flood the reader.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MinfmError(f"{where}: not a regular file")
            if info.st_size > max_bytes:
                raise MinfmError(f"{where}: {info.st_size:,} bytes is more than the {max_bytes:,} accepted")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = _read_upto(f, max_bytes + 1)
        finally:
            os.close(fd)
    except OSError as exc:  # ``where`` names the file already: the reason alone
        raise MinfmError(f"{where}: {exc.strerror or os_error_line(exc)}") from None
    if len(data) > max_bytes:
        raise MinfmError(f"{where}: more than the {max_bytes:,} bytes accepted (the file grew while it was read)")
    return data


def _read_upto(f, limit: int, chunk: int = 8 << 20) -> bytes:
    """Up to ``limit`` bytes of ``f``, in chunks: ``f.read(limit)`` reserves ``limit`` bytes
    first, and a limit of 16 GiB failed as "out of memory" for a 2 KB file (address-space
    limits, no overcommit)."""
    parts, total = [], 0
    while total < limit:
        part = f.read(min(chunk, limit - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def read_text(path: str | Path, where: str, max_bytes: int) -> str:
    """:func:`read_bounded`, decoded as UTF-8 (a leading byte-order mark is dropped)."""
    data = read_bounded(path, where, max_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MinfmError(f"{where}: not UTF-8 text (byte {exc.start})") from None
