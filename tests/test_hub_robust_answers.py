"""A Hub (or a proxy, a captive portal, a wrong HF_ENDPOINT) answering what the client cannot parse.

HTML with status 200, JSON of another shape, deep nesting: one line naming the endpoint and
the request, exit 2, for push, pull and ``sample hf://``. The same exception types raised
by minFM's own code stay tracebacks: they are bugs, not the server's fault.
"""

from __future__ import annotations

import json

import pytest
from hub_helpers import TOKEN, env_for, main_in_process, make_model_folder, one_error_line
from hubserver import HubServer, _Handler

from minfm_hub.errors import hub_errors

SHA = "a" * 40
ANSWERS = {  # name -> (body, content type) of GET /api/models/org/m
    "html": (b"<html><body>Welcome to the captive portal</body></html>", "text/html"),
    "list": (b"[]", "application/json"),
    "no-rfilename": (json.dumps({"id": "org/m", "sha": SHA, "siblings": [{"size": 1}]}).encode(), "application/json"),
    "size-not-a-number": (json.dumps({"id": "org/m", "sha": SHA, "siblings": [
        {"rfilename": "model.safetensors", "size": "12x"}]}).encode(), "application/json"),
    "siblings-dict": (json.dumps({"id": "org/m", "sha": SHA, "siblings": {"a": 1}}).encode(), "application/json"),
    "no-sha": (json.dumps({"id": "org/m", "siblings": []}).encode(), "application/json"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
}


class _OddHandler(_Handler):
    def _dispatch(self, method):
        odd = self.server.odd  # (method, path prefix, body, content type) or None
        if odd and method == odd[0] and self.path.startswith(odd[1]):
            with self.state.lock:
                self.state.log.append((method, self.path))
            self._body()
            return self._send(200, odd[2], content_type=odd[3])
        return super()._dispatch(method)


class OddHub(HubServer):
    """The test Hub, answering one kind of request with a fixed body (``answer(...)``)."""

    def start(self):
        super().start()
        self._httpd.RequestHandlerClass = _OddHandler
        self._httpd.odd = None
        return self

    def answer(self, method: str, prefix: str, body: bytes, content_type: str) -> None:
        self._httpd.odd = (method, prefix, body, content_type)


@pytest.fixture
def odd_hub():
    with OddHub() as hub:
        yield hub


def _not_valid(proc, endpoint: str, request: str) -> str:
    line = one_error_line(proc)
    assert line.startswith(f"minfm: error: the Hub at {endpoint} answered ") and line.endswith(
        f" for the request to {request}: not a valid answer"), line
    assert TOKEN not in proc.stdout + proc.stderr
    return line


@pytest.mark.parametrize("name", list(ANSWERS))
def test_push_and_pull_of_an_answer_that_is_not_valid_is_one_line(odd_hub, tmp_path, name):
    folder = make_model_folder(tmp_path / "m")
    odd_hub.upload("org/m", {"model.safetensors": b"x"})
    odd_hub.answer("GET", "/api/models/org/m", *ANSWERS[name])
    env = env_for(odd_hub, tmp_path)
    push, pull = main_in_process(env, ["hub", "push", str(folder), "org/m"],
                                 ["hub", "pull", "org/m", "--local-dir", str(tmp_path / "out")])
    _not_valid(push, odd_hub.endpoint, "push to org/m@main")
    # pull.py checks some of these itself (a missing sha or file name): any one line will do
    line = one_error_line(pull)
    if name in ("html", "list", "siblings-dict", "deep"):
        _not_valid(pull, odd_hub.endpoint, "pull org/m")
    assert not (tmp_path / "out").exists(), line
    assert len(odd_hub.commits("org/m")) == 2  # the seed and the initial commit: nothing was pushed


def test_html_for_every_api_call_is_one_line_for_push_and_sample(odd_hub, tmp_path):
    env = env_for(odd_hub, tmp_path)
    folder = make_model_folder(tmp_path / "m")
    odd_hub.answer("POST", "/api/", *ANSWERS["html"])  # create_repo is the first request of a push
    (push,) = main_in_process(env, ["hub", "push", str(folder), "org/m"])
    assert "answered text that is not JSON" in _not_valid(push, odd_hub.endpoint, "push to org/m@main")
    odd_hub.answer("GET", "/api/", *ANSWERS["html"])
    (sample,) = main_in_process(env, ["sample", "hf://org/m", "--prompt", "x", "--out", str(tmp_path / "s")],
                                hub_only=False)
    assert "answered text that is not JSON" in _not_valid(sample, odd_hub.endpoint, "pull org/m")


def test_a_commit_answer_without_a_sha_is_one_line(odd_hub, tmp_path):
    url = f"{odd_hub.endpoint}/org/m/commit/{SHA}"
    odd_hub.answer("POST", "/api/models/org/m/commit/",
                   json.dumps({"commitOid": "../../x", "commitUrl": url, "pullRequestUrl": None}).encode(),
                   "application/json")
    (push,) = main_in_process(env_for(odd_hub, tmp_path), ["hub", "push", str(make_model_folder(tmp_path / "m")),
                                                           "org/m"])
    assert "answered a commit without a valid commit sha" in _not_valid(push, odd_hub.endpoint, "push to org/m@main")


def test_errors_of_minfms_own_code_stay_tracebacks(monkeypatch):
    """Only what huggingface_hub raises while reading an answer is translated, not the same types from minFM."""
    from huggingface_hub.hf_api import ModelInfo
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from minfm_hub import card
    from minfm_hub.errors import HubError

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(HubError, match="answered something unexpected .KeyError: 'rfilename'. for the request to "
                                       "pull org/m: not a valid answer"):
        with hub_errors("pull", "org/m"):
            ModelInfo(id="org/m", siblings=[{"size": 1}])  # the client parsing a server's answer
    with pytest.raises(KeyError):
        with hub_errors("pull", "org/m"):
            card._get({}, "not.declared")  # a bug of ours: a KeyError raised in minFM's code
    with pytest.raises(HFValidationError):  # the client refusing *our* argument: also ours
        with hub_errors("pull", "org/m"):
            validate_repo_id("a/b/c")
