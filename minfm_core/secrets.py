"""Masking secrets in text that is shown to others (the demo's page, what loggers send).

A run's ``recipe.toml`` is the resolved recipe: ``${WANDB_API_KEY}`` or a password in a
``https://user:pass@host`` URL arrives there expanded. What is masked: anything shaped like a
Hub token (``hf_`` and 30 or more letters/digits, the shape ``minfm hub push`` refuses to
upload), a URL's password, and the value of every environment variable whose name says it
holds a secret (``*TOKEN*``, ``*KEY*``, ``*SECRET*``, ``*PASSWORD*``, ...) and is at least
8 characters long (a shorter value would mask ordinary words).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

#: A Hugging Face Hub user access token's shape.
HUB_TOKEN_PATTERN = r"hf_[A-Za-z0-9]{30,}"
MASK = "***"
_HUB_TOKEN = re.compile(HUB_TOKEN_PATTERN)
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^/\s@]+(@)")
_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|PASS|CREDENTIAL|AUTH", re.IGNORECASE)
_MIN_SECRET_LEN = 8


def secret_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """name -> value of every environment variable whose name says it holds a secret and
    whose value is long enough to be one (see the module doc)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}


def written_forms(value: str) -> set[str]:
    """``value`` as it is, and as a TOML or JSON string writes it: one with a quote or a
    backslash is escaped in recipe.toml (``pa\\"ss``), where the raw value never matches."""
    return {value, json.dumps(value)[1:-1]}


def mask_secrets_in(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """:func:`mask_secrets` of every string in ``value`` (dicts, lists and tuples walked; keys
    kept): a resolved recipe as a logger sends it elsewhere (W&B's config, TensorBoard's text)."""
    if isinstance(value, str):
        return mask_secrets(value, environ)
    if isinstance(value, dict):
        return {k: mask_secrets_in(v, environ) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_secrets_in(v, environ) for v in value)
    return value


def mask_secrets(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret it holds replaced by ``***`` (see the module doc)."""
    values = {form for v in secret_environ(environ).values() for form in written_forms(v)}
    # the longest first: one value may hold another
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, MASK)
    text = _HUB_TOKEN.sub(MASK, text)
    return _URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(2), text)
