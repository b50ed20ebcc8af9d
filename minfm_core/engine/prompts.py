"""Prompt files: one prompt per line, blank lines skipped."""

from __future__ import annotations

from pathlib import Path

from ..errors import MinfmError
from ..textfiles import read_bounded


#: A prompt file is a list of prompts (a thousand class names: ~14 KB); beyond this it is a wrong file.
MAX_PROMPT_FILE_BYTES = 64 << 20


def read_prompt_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise MinfmError(f"{path}: prompt file not found")
    if not p.is_file():  # a folder; a FIFO or /dev/zero would never end a read
        raise MinfmError(f"{path}: prompt file is not a regular file")
    if p.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise MinfmError(f"{path}: {p.stat().st_size:,} bytes is too large for a prompt file "
                         f"(at most {MAX_PROMPT_FILE_BYTES:,})")
    try:
        text = read_bounded(p, f"{path}: prompt file", MAX_PROMPT_FILE_BYTES).decode("utf-8")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise MinfmError(f"{path}: prompt file is not UTF-8 text") from None
    if not prompts:
        raise MinfmError(f"{path}: prompt file has no prompts (one per line)")
    return prompts
