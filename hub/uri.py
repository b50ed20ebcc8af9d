"""Hub references: ``org/name[@rev]`` and ``hf://org/name[@rev]``, validated before any request.

A repo id is ``namespace/name`` as the Hub allows them (letters, digits, ``-``, ``_``,
``.``; no ``--`` or ``..``; at most 96 characters each side). A revision is a branch,
a tag or a commit sha; we refuse what git itself would (spaces, control characters, ``..``,
``~^:?*[\\``, a ``.`` starting a component, ``.lock`` ending one) and any other non-printable
character (a text-direction override shows a revision as another one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from minfm_core.errors import MinfmError

SCHEME = "hf://"
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID_RE = re.compile(rf"^{_PART}/{_PART}\Z")
_BAD_REV_RE = re.compile(r"[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.|//|@\{|^[/.-]|[/.]$|/\.|\.lock(?:/|$)|^@$")


@dataclass(frozen=True)
class HubRef:
    """A repo on the Hub at an optional revision (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self}"

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def validate_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``namespace/name``, else a MinfmError saying why."""
    if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise MinfmError(
            f"invalid Hub repo id {repo_id!r}: expected 'namespace/name' with letters, digits, '-', '_' or '.' "
            "(no '--' or '..', at most 96 characters each)"
        )
    if repo_id.endswith(".git"):
        raise MinfmError(f"invalid Hub repo id {repo_id!r}: must not end with '.git'")
    return repo_id


def validate_revision(revision: str) -> str:
    """``revision`` if it can name a branch, tag or commit, else a MinfmError."""
    if not isinstance(revision, str) or not revision or len(revision) > 255 or not revision.isprintable() \
            or _BAD_REV_RE.search(revision):
        # repr: a control character in the message would act on the terminal; a long one is cut
        shown = repr(revision) if not isinstance(revision, str) or len(revision) <= 80 else repr(revision[:60]) + "..."
        raise MinfmError(f"invalid Hub revision {shown}: expected a branch, tag or commit sha "
                         "(no spaces, control characters, '..' or any of ~^:?*[\\)")
    return revision


def parse_ref(text: str) -> HubRef:
    """``org/name``, ``org/name@rev`` or the same with ``hf://`` in front."""
    body = text[len(SCHEME):] if text.startswith(SCHEME) else text
    repo_id, sep, revision = body.partition("@")
    validate_repo_id(repo_id)
    if sep:
        validate_revision(revision)
    return HubRef(repo_id, revision if sep else None)


def parse_hf_uri(uri: str) -> HubRef:
    """An ``hf://org/name[@rev]`` URI (the scheme is required)."""
    if not uri.startswith(SCHEME):
        raise MinfmError(f"{uri!r}: expected an hf://org/name[@revision] URI")
    return parse_ref(uri)
