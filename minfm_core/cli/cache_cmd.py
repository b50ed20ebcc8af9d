"""``minfm cache``: pre-fetch pretrained weights (and, later, latents)."""


def register(sub) -> None:
    """Add ``minfm cache ...`` (being written)."""
