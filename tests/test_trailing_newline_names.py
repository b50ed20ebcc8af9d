"""A name checked with a pattern ending in ``$`` let one trailing newline through (``$``
matches before a final ``\\n``): ``hub pull $'org/good\\n'`` passed minFM's check and died in
huggingface_hub's with a traceback, and a server's ``"sha": "<40 hex>\\n"`` was recorded
in minfm_source.json. Every such pattern now ends with ``\\Z``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from minfm_core.errors import MinfmError

ROOT = Path(__file__).resolve().parent.parent
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_a_repo_id_or_ref_with_a_trailing_newline_is_refused():
    from minfm_core.pretrained import parse_hub_ref
    from minfm_hub.uri import parse_hf_uri, validate_repo_id

    assert validate_repo_id("org/good") == "org/good"
    for bad in ("org/good\n", "org/good\n\n"):
        with pytest.raises(MinfmError, match="invalid Hub repo id"):
            validate_repo_id(bad)
    with pytest.raises(MinfmError):
        parse_hf_uri("hf://org/good\n")
    assert parse_hub_ref("org/good") is not None and parse_hub_ref("org/good\n") is None


def test_a_commit_sha_with_a_trailing_newline_is_not_a_sha():
    from minfm_hub.answers import checked_commit

    assert checked_commit(SHA, "org/x") == SHA
    with pytest.raises(MinfmError, match="not a commit sha"):
        checked_commit(SHA + "\n", "org/x")


def test_step_folders_and_component_names_are_whole_matches():
    from minfm_core.checkpoint import _STEP_DIR
    from minfm_core.components import NAME_RE

    assert _STEP_DIR.match("step_00000012") and not _STEP_DIR.match("step_00000012\n")
    assert NAME_RE.match("acme") and not NAME_RE.match("acme\n")


def _anchored_with_dollar(path: Path) -> list[str]:
    """Patterns given to re.compile that start with ``^`` and end with ``$``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "compile" and node.args:
            arg = node.args[0]
            parts = arg.values if isinstance(arg, ast.JoinedStr) else [arg]
            first, last = parts[0], parts[-1]
            if all(isinstance(p, ast.Constant) and isinstance(p.value, str) for p in (first, last)):
                if first.value.startswith("^") and last.value.endswith("$") and not last.value.endswith(r"\s*$"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_whole_name_pattern_ends_with_dollar():
    files = [p for d in ("minfm_core", "plugins", "hub", "apps") for p in (ROOT / d).rglob("*.py")]
    found = [where for p in files for where in _anchored_with_dollar(p)]
    # re.DOTALL patterns that mean "the rest of the message" are fine: none ends a name
    assert [w for w in found if "config.py" not in w] == []
