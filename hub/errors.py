"""Hub failures as one clear line (a MinfmError, exit code 2), never with the token in it.

``huggingface_hub`` raises its own exceptions (and its HTTP library's, which differ
between client versions: requests, httpx, httpx2); :func:`hub_errors` maps them all.
A server (or a proxy, a captive portal, a wrong ``HF_ENDPOINT``) may also answer with
something that is not what the client expects: HTML with status 200, JSON of another shape.
The client then fails while parsing it with a plain ``ValueError`` / ``KeyError`` /
``TypeError`` ...; those are one line too, but only when raised inside huggingface_hub, so
that the same exception types raised by minFM's own code stay tracebacks (they are bugs).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from minfm_core.errors import MinfmError, first_line

_TOKEN_SHAPED = re.compile(r"hf_[A-Za-z0-9]{30,}")
_NETWORK_MODULES = ("httpx", "httpx2", "requests", "urllib3", "httpcore", "socket", "ssl")
#: What the client raises when a server's answer does not parse or has the wrong shape
#: (AssertionError: e.g. snapshot_download asserts the repo info has a sha).
_BAD_ANSWER_ERRORS = (ValueError, LookupError, TypeError, AttributeError, AssertionError, RecursionError)


class HubError(MinfmError):
    """A Hub request failed (missing repo or revision, auth, network): one line, exit 2."""


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def scrub(text: str) -> str:
    """``text`` with the Hub token (env or login cache) and anything shaped like one masked."""
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # a broken token file must not hide the original error
        token = None
    if token:
        text = text.replace(token, "***")
    return _TOKEN_SHAPED.sub("hf_***", text)  # any other token a library echoed


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return any(type(e).__module__.split(".")[0] in _NETWORK_MODULES for e in (exc, exc.__cause__) if e is not None)


def _raised_by_client(exc: BaseException) -> bool:
    """Whether ``exc`` comes from huggingface_hub's own code rather than minFM's.

    The innermost frame that is either huggingface_hub's or minFM's decides: frames below it
    (json, httpx) are libraries the client called to read the answer; a minFM frame below
    a client frame (a callback) makes it ours.
    """
    owner = None
    tb = exc.__traceback__
    while tb is not None:
        top = str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0]
        if top == "huggingface_hub":
            owner = "client"
        elif top.startswith("minfm"):
            owner = "minfm"
        tb = tb.tb_next
    return owner == "client"


def _bad_answer(exc: BaseException) -> str | None:
    """What was wrong with a server answer the client could not parse, or None if ``exc`` is not that."""
    from huggingface_hub.utils import HFValidationError

    # HFValidationError: the client checking *our* arguments before any request: a bug of ours
    if not isinstance(exc, _BAD_ANSWER_ERRORS) or isinstance(exc, HFValidationError) or not _raised_by_client(exc):
        return None
    if isinstance(exc, RecursionError):
        return "JSON nested too deep"
    if type(exc).__name__ == "JSONDecodeError":  # json's and simplejson's (requests may use either)
        return "text that is not JSON"
    return f"something unexpected ({type(exc).__name__}: {first_line(exc, 120)})"


def translate(exc: BaseException, what: str, target: str) -> HubError | None:
    """A :class:`HubError` for a Hub/network exception raised while doing ``what`` on ``target``, else None."""
    from huggingface_hub import utils as hf

    offline_cls = getattr(hf, "OfflineModeIsEnabled", ())
    if isinstance(exc, hf.GatedRepoError):
        msg = f"{target} is gated: accept its conditions on the Hub, then log in (HF_TOKEN or `hf auth login`)"
    elif isinstance(exc, hf.RepositoryNotFoundError):
        msg = f"Hub repo {target} not found at {endpoint()} (or it is private and your token cannot read it)"
    elif isinstance(exc, hf.RevisionNotFoundError):
        msg = f"{target}: no such revision (branch, tag or commit) on the Hub"
    elif isinstance(exc, hf.LocalEntryNotFoundError) or (offline_cls and isinstance(exc, offline_cls)):
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"cannot reach the Hub at {endpoint()}"
        msg = f"{why} and {target} is not in the local cache"
    elif isinstance(exc, hf.EntryNotFoundError):
        msg = f"{target}: file not found on the Hub ({first_line(exc)})"
    elif isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            msg = f"not allowed to {what} {target} (HTTP {status}): check HF_TOKEN or `hf auth login`"
        elif status == 412:
            msg = f"{target} changed on the Hub while pushing (another commit landed); push again"
        else:
            msg = f"Hub request to {what} {target} failed (HTTP {status}): {first_line(exc)}"
    elif _is_network_error(exc):
        msg = f"cannot reach the Hub at {endpoint()} to {what} {target}: {type(exc).__name__}"
    elif (answer := _bad_answer(exc)) is not None:
        msg = f"the Hub at {endpoint()} answered {answer} for the request to {what} {target}: not a valid answer"
    else:
        return None
    return HubError(scrub(msg))


@contextlib.contextmanager
def hub_errors(what: str, target: str) -> Iterator[None]:
    """Turn Hub and network exceptions raised inside into one-line :class:`HubError`."""
    try:
        yield
    except MinfmError:
        raise
    except Exception as exc:
        err = translate(exc, what, target)
        if err is None:
            raise
        raise err from None
