"""Prompt files: one prompt per line, blank lines skipped."""

from __future__ import annotations

from pathlib import Path

from ..errors import MinfmError
from ..textfiles import read_text


#: A prompt file is a list of prompts (a thousand class names: ~14 KB); beyond this it is a wrong file.
MAX_PROMPT_FILE_BYTES = 64 << 20


def read_prompt_file(path: str | Path) -> list[str]:
    # read_text refuses a missing file, a folder, a FIFO or /dev/zero, an oversized file and
    # bytes that are not UTF-8, each naming the file
    text = read_text(path, f"{path}: prompt file", MAX_PROMPT_FILE_BYTES)
    # lines end at "\n" only: str.splitlines() also broke a prompt at U+2028, a form feed, ...
    # which shifted every later prompt's index (and seed) against the same file read elsewhere
    prompts = [line.strip() for line in text.split("\n") if line.strip()]
    if not prompts:
        raise MinfmError(f"{path}: prompt file has no prompts (one per line)")
    return prompts
