"""Files from outside minFM's own hands (a caption sidecar, a dataset's metadata, a label
list, a labels JSON that came with a download): read whole only when they are no larger
than their kind can be, and decoded as UTF-8, with every way that fails one MinfmError
naming the file (never a UnicodeDecodeError traceback, never a gigabyte read into memory).
"""

from __future__ import annotations

from pathlib import Path

from .errors import MinfmError, os_error_line


def read_bounded(path: str | Path, where: str, max_bytes: int) -> bytes:
    """The bytes of ``path``, refused unread when it holds more than ``max_bytes``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise MinfmError(f"{where}: {size:,} bytes is more than the {max_bytes:,} accepted")
        return path.read_bytes()
    except OSError as exc:
        raise MinfmError(f"{where}: {os_error_line(exc)}") from None


def read_text(path: str | Path, where: str, max_bytes: int) -> str:
    """:func:`read_bounded`, decoded as UTF-8 (a leading byte-order mark is dropped)."""
    data = read_bounded(path, where, max_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MinfmError(f"{where}: not UTF-8 text (byte {exc.start})") from None
