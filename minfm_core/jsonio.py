"""JSON from outside a run's own hands (a Hub repo, a checkpoint, a dataset folder, a trace):
parsed with every way it can fail named in one MinfmError.

``json.loads`` raises ``ValueError`` for bad syntax and ``RecursionError`` for deep nesting
(64 KiB of ``[`` is enough); the second escaped ``except ValueError`` and ended a command
in a traceback. Size bounds stay with the callers: they know what a sane file of theirs is.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import MinfmError, first_line


def parse_json(text: str | bytes, where: str) -> Any:
    """``json.loads(text)``; a MinfmError ``WHERE: not valid JSON (...)`` if it is not."""
    try:
        return json.loads(text)
    except RecursionError:
        raise MinfmError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError of bytes
        raise MinfmError(f"{where}: not valid JSON ({first_line(exc, 120)})") from None
