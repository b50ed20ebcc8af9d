"""Refuse to publish a Hub token: the scan ``minfm hub push`` runs before its first request.

A run's ``recipe.toml`` is the *resolved* recipe, so ``${HF_TOKEN}`` in the user's own
recipe arrives there expanded; a logger may put it in ``metrics.jsonl``; the model card
quotes the recipe. Once pushed to a public repo the token is everyone's. So every file a
push would upload is scanned for the active token (the ``token`` argument, else
huggingface_hub's ``get_token()``: ``HF_TOKEN`` or the login cache) and for anything
shaped like a Hub token (``hf_`` and 30 or more letters/digits). A hit is one MinfmError
naming the file and the line (or byte offset), with the token shown redacted.

Files are read in chunks that overlap by more than a token's length. A safetensors file
is scanned in its JSON header only (the metadata strings; the rest is tensor bytes);
everything else (text, images, the DCP training state) whole. Text files report a line
number, others a byte offset.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from minfm_core.errors import MinfmError
from minfm_core.secrets import HUB_TOKEN_PATTERN, secret_environ, written_forms

#: Something shaped like a Hub user access token.
TOKEN_RE = re.compile(HUB_TOKEN_PATTERN.encode())
#: Files read as text, reported with line numbers.
TEXT_SUFFIXES = (".toml", ".json", ".jsonl", ".md", ".txt", ".yaml", ".yml", ".csv", ".cfg", ".ini", ".py", ".html")
_CHUNK = 1 << 22
_OVERLAP = 512  # longer than any token we look for


def redact(token: str) -> str:
    """``hf_m***`` (36 chars): enough to recognise which token, not enough to use it."""
    return f"{token[:4]}*** ({len(token)} chars)"


def active_token(token: str | None = None) -> str | None:
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # a broken token file: the shape check still runs
        return None


def _needles(token: str | None) -> list[tuple[bytes, str]]:
    """What a push must not publish, each with what to call it: the active Hub token, and the
    value of every environment variable whose name says it holds a secret (a recipe's
    ``${WANDB_API_KEY}`` arrives expanded in recipe.toml and the card just as ``${HF_TOKEN}``)."""
    out = [(token.encode(), "a Hugging Face token")] if token else []
    for name, value in sorted(secret_environ().items()):
        if value != token:
            out += [(form.encode("utf-8", "replace"), f"the value of ${name}") for form in sorted(written_forms(value))]
    return out


def _hit(data: bytes, needles: list[tuple[bytes, str]]) -> tuple[int, bytes, str] | None:
    """(offset, matched bytes, what it is) of the first secret in ``data``, or None."""
    found = [(i, needle, what) for needle, what in needles if (i := data.find(needle)) >= 0]
    m = TOKEN_RE.search(data)
    if m:
        found.append((m.start(), m.group(), "a Hugging Face token"))
    return min(found) if found else None


def _scan(path: Path, needles: list[tuple[bytes, str]], limit: int | None = None) -> tuple[int, int, bytes, str] | None:
    """(byte offset, line number, secret, what it is) of the first secret in ``path`` (its first
    ``limit`` bytes), or None.

    Read in chunks that overlap by more than a token's length, so no token is cut in two
    and no line, however long, is held whole.
    """
    done = newlines = 0
    tail = b""
    with open(path, "rb") as f:
        while True:
            want = _CHUNK if limit is None else min(_CHUNK, limit - done)
            chunk = f.read(want) if want > 0 else b""
            if not chunk:  # the end: a match left for the next chunk is reported now
                hit = _hit(tail, needles)
                if hit is None:
                    return None
                return done - len(tail) + hit[0], newlines - tail[hit[0]:].count(b"\n") + 1, hit[1], hit[2]
            data = tail + chunk
            hit = _hit(data, needles)
            # a match that runs to the end of the data may go on in the next chunk: look again there
            cut = hit and hit[0] + len(hit[1]) == len(data) and len(hit[1]) < _OVERLAP // 2 and len(chunk) == want
            if hit and not cut:
                line = newlines - tail.count(b"\n") + data[:hit[0]].count(b"\n") + 1
                return done - len(tail) + hit[0], line, hit[1], hit[2]
            done += len(chunk)
            newlines += chunk.count(b"\n")
            tail = data[-_OVERLAP:]


def _safetensors_header_len(path: Path) -> int:
    with open(path, "rb") as f:
        prefix = f.read(8)
    return 8 + int.from_bytes(prefix, "little") if len(prefix) == 8 else 8


def scan_file(path: Path, token: str | None) -> str | None:
    """What secret is where in ``path`` (``a Hugging Face token at line N: hf_m*** ...``, ``the
    value of $WANDB_API_KEY at byte N: ...``), or None."""
    from minfm_core.weights import MAX_HEADER_BYTES

    name = path.name.lower()
    limit = min(_safetensors_header_len(path), 8 + MAX_HEADER_BYTES) if name.endswith(".safetensors") else None
    hit = _scan(path, _needles(token), limit)
    if hit is None:
        return None
    offset, line, found, what = hit
    where = f"line {line}" if name.endswith(TEXT_SUFFIXES) else f"byte {offset}"
    return f"{what} at {where}: {redact(found.decode('utf-8', 'replace'))}"


def scan_text(fields: Mapping[str, str | None], token: str | None = None) -> None:
    """Refuse (one MinfmError) if any piece of user text a push publishes holds a token.

    ``fields`` maps what the text is (``"the commit message (--message)"``) to the text: the
    commit message, the license and the names travel outside any file, so the file scan
    never sees them (the card quotes some of them, but would point at README.md, not at
    the option that put the token there).
    """
    needles = _needles(active_token(token))
    for what, text in fields.items():
        hit = _hit(text.encode("utf-8", "replace"), needles) if text else None
        if hit:
            raise MinfmError(f"{what}: refusing to push: it holds {hit[2]}, "
                             f"{redact(hit[1].decode('utf-8', 'replace'))}; remove it and push again")


def scan_for_tokens(files: Mapping[str, Path], token: str | None = None) -> None:
    """Refuse (one MinfmError) if any file to upload (repo path -> local file) holds a token.

    The generated model card (``README.md``) is scanned last, so a token copied into it from
    the recipe is reported where it came from.
    """
    active = active_token(token)
    needles = _needles(active)
    for repo_path in sorted(files):  # names travel too (commit paths, the card's file table)
        hit = _hit(repo_path.encode(), needles)
        if hit:
            raise MinfmError(f"refusing to push a file whose name holds {hit[2]}: "
                             f"{repo_path.replace(hit[1].decode(), redact(hit[1].decode()))}")
    for repo_path in sorted(files, key=lambda p: (p == "README.md", p)):
        where = scan_file(Path(files[repo_path]), active)
        if where:
            raise MinfmError(
                f"{repo_path}: refusing to push: {where}; remove it "
                "(a recipe's ${VAR} is expanded in the run's recipe.toml) and push again"
            )
