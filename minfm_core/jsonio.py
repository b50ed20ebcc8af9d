"""JSON from outside a run's own hands (a Hub repo, a checkpoint, a dataset folder, a trace):
parsed with every way it can fail named in one MinfmError.

``json.loads`` raises ``ValueError`` for bad syntax and ``RecursionError`` for deep nesting
(64 KiB of ``[`` is enough); the second escaped ``except ValueError`` and ended a command
in a traceback. Size bounds stay with the callers: they know what a sane file of theirs is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import MinfmError, first_line
from .textfiles import read_bounded


def parse_json(text: str | bytes, where: str) -> Any:
    """``json.loads(text)``; a MinfmError ``WHERE: not valid JSON (...)`` if it is not."""
    try:
        return json.loads(text)
    except RecursionError:
        raise MinfmError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError of bytes
        raise MinfmError(f"{where}: not valid JSON ({first_line(exc, 120)})") from None


def read_json_file(path: str | Path, where: str, max_bytes: int) -> Any:
    """:func:`parse_json` of a file of at most ``max_bytes`` (checked before it is read)."""
    return parse_json(read_bounded(path, where, max_bytes), where)


def last_jsonl_record(path: str | Path, key: str, tail_bytes: int = 1 << 20) -> dict[str, Any]:
    """The last line of a JSON Lines file that is an object holding ``key`` (``{}`` if none).

    For a run's ``metrics.jsonl``, which can be a live run's (its last line half-written) or a
    download's: lines that do not parse are passed over, and only the last ``tail_bytes`` are
    read, so a long run's file costs no more than a short one's.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - tail_bytes))
            lines = f.read(tail_bytes).decode("utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    if size > tail_bytes:
        lines = lines[1:]  # the first line read is (most likely) the end of a cut one
    for line in reversed(lines):
        try:
            record = parse_json(line, str(path))
        except MinfmError:
            continue
        if isinstance(record, dict) and key in record:
            return record
    return {}
