"""Pytest fixtures for Hub tests: a local Hub-compatible server (tests/hubserver.py).

Import from conftest.py (``from hub_fixtures import hub_server, hub_env``) or list this
module in ``pytest_plugins``.
"""

from __future__ import annotations

import pytest

from hubserver import HubServer


@pytest.fixture
def hub_server():
    """A fresh, empty in-process Hub for one test; ``.endpoint``, ``.env(hf_home)``, ``.upload(...)``."""
    with HubServer() as server:
        yield server


@pytest.fixture
def hub_env(hub_server, tmp_path):
    """Environment dict for a subprocess talking to ``hub_server`` (own HF_HOME under tmp_path)."""
    return hub_server.env(tmp_path / "hf_home")
