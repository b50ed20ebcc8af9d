"""Prompt files: one prompt per line, blank lines skipped."""

from __future__ import annotations

from pathlib import Path

from ..errors import MinfmError
from ..textfiles import read_text
from ..validators import prompt_problem


#: A prompt file is a list of prompts (a thousand class names: ~14 KB); beyond this it is a wrong file.
MAX_PROMPT_FILE_BYTES = 64 << 20


def read_prompt_file(path: str | Path) -> list[str]:
    # read_text refuses a missing file, a folder, a FIFO or /dev/zero, an oversized file and
    # bytes that are not UTF-8, each naming the file
    text = read_text(path, f"{path}: prompt file", MAX_PROMPT_FILE_BYTES)
    # lines end at "\n" only: str.splitlines() also broke a prompt at U+2028, a form feed, ...
    # which shifted every later prompt's index (and seed) against the same file read elsewhere
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if problem := prompt_problem(line):
            raise MinfmError(f"{path}: line {number}: {problem}")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise MinfmError(f"{path}: prompt file has no prompts (one per line)")
    return prompts


def gallery_prompts(recipe) -> list[str]:
    """What a training run's galleries draw: ``sample.prompts``, else the first 16 of
    ``sample.prompt_file``, else 4 empty prompts (unconditional pictures)."""
    s = recipe.sample
    if s.prompts:
        return list(s.prompts)
    if s.prompt_file:
        return read_prompt_file(s.prompt_file)[:16]
    return ["" for _ in range(4)]


def sample_job_prompts(recipe) -> list[str]:
    """What a sample job draws (``job = "sample"``, ``minfm sample`` without ``--prompt``):
    ``sample.prompts``, then every line of ``sample.prompt_file``."""
    s = recipe.sample
    return list(s.prompts) + (read_prompt_file(s.prompt_file) if s.prompt_file else [])


def job_prompts(recipe, job: str) -> list[tuple[str, list[str]]]:
    """The prompts ``job`` (``"train"`` or ``"sample"``) encodes, each list with the recipe key
    it comes from: a sample job's ``sample.prompts`` and ``sample.prompt_file``; a training
    run's gallery prompts when it draws galleries; ``sample.neg_prompt`` with either. What the
    trainer asks the text encoders to count before its first step, and ``minfm check`` before
    any run."""
    s = recipe.sample
    if job == "sample":
        asked = [("sample.prompts", list(s.prompts))]
        if s.prompt_file:
            asked.append(("sample.prompt_file", read_prompt_file(s.prompt_file)))
    elif job == "train" and (recipe.train.sample_every or recipe.train.sample_at_start):
        asked = [("sample.prompt_file" if s.prompt_file and not s.prompts else "sample.prompts", gallery_prompts(recipe))]
    else:
        return []
    return [(what, prompts) for what, prompts in asked if prompts] + [("sample.neg_prompt", [s.neg_prompt])]
