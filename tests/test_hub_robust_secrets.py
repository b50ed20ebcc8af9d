"""The token in what a push publishes besides its files: the commit message, the license, the names.

Each is refused before the first request, in one line that names the option and never the token.
"""

from __future__ import annotations

import pytest
from hub_helpers import TOKEN, env_for, main_in_process, make_model_folder, one_error_line

from minfm_core.errors import MinfmError
from minfm_hub import secrets

pytest_plugins = ["hub_fixtures"]

SHAPED = "hf_" + "Q" * 34  # not the active token, but shaped like one


def test_push_refuses_a_token_in_the_message_license_or_names(hub_server, tmp_path):
    folder = str(make_model_folder(tmp_path / "m"))
    cases = {
        "the commit message (--message)": ["hub", "push", folder, "org/m", "--message", f"fix: token {TOKEN}"],
        "the commit message (--message) ": ["hub", "push", folder, "org/m", "-m", f"see\n{SHAPED}"],
        "the license (--license)": ["hub", "push", folder, "org/m", "--license", f"mit\nbase_model: {TOKEN}"],
        "the repo id": ["hub", "push", folder, f"org/{TOKEN}"],
        "the revision (--revision)": ["hub", "push", folder, "org/m", "--revision", f"b-{SHAPED}"],
    }
    results = main_in_process(env_for(hub_server, tmp_path), *cases.values())
    for what, proc in zip(cases, results):
        line = one_error_line(proc)
        assert line.startswith(f"minfm: error: {what.strip()}: refusing to push: it holds a Hugging Face token, hf_"), line
        assert TOKEN not in proc.stdout + proc.stderr and SHAPED not in proc.stdout + proc.stderr
    assert hub_server.requests == []  # refused before anything was sent
    (ok,) = main_in_process(env_for(hub_server, tmp_path), ["hub", "push", folder, "org/m", "-m", "hf_short is fine"])
    assert ok.returncode == 0, ok.stderr
    assert hub_server.commits("org/m")[0].message == "hf_short is fine"


def test_scan_text_checks_the_active_token_even_when_not_token_shaped():
    secrets.scan_text({"the commit message": "nothing to see", "the revision": None}, token="my-secret-value")
    with pytest.raises(MinfmError, match=r"^the commit message: refusing to push: .* my-s\*\*\* \(15 chars\)"):
        secrets.scan_text({"the commit message": "a my-secret-value b"}, token="my-secret-value")
