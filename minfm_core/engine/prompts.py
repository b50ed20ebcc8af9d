"""Prompt files: one prompt per line, blank lines skipped."""

from __future__ import annotations

from pathlib import Path

from ..errors import MinfmError


def read_prompt_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise MinfmError(f"{path}: prompt file not found")
    try:
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise MinfmError(f"{path}: prompt file is not UTF-8 text") from None
    if not prompts:
        raise MinfmError(f"{path}: prompt file has no prompts (one per line)")
    return prompts
