"""The one bound on a caption, wherever it is read from (a ``.txt`` sidecar, a ``metadata.jsonl``
row, a latents index's ``prompt``): docs/security.md promises 1 MiB per caption, and a 2 GiB
metadata file or a 4 GiB index could otherwise hand the text encoder one caption of gigabytes."""

from __future__ import annotations

from minfm_core.errors import MinfmError

#: A caption is a sentence or a paragraph: a larger one is not one.
MAX_CAPTION_BYTES = 1 << 20


def bounded_caption(text: str, where: str) -> str:
    """``text`` when its UTF-8 form holds at most MAX_CAPTION_BYTES, else a MinfmError naming ``where``."""
    # A character is 1 to 4 bytes: only a caption that may be over the bound is encoded to measure it.
    if len(text) * 4 > MAX_CAPTION_BYTES:
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > MAX_CAPTION_BYTES:
            raise MinfmError(f"{where}: a caption of {size:,} bytes is more than the {MAX_CAPTION_BYTES:,} accepted")
    return text
