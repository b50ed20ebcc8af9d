"""hf:// URIs, repo-id and revision validation, size parsing, card metadata (in-process, no server)."""

from __future__ import annotations

import pytest

from minfm_core.errors import MinfmError
from minfm_hub.card import metadata
from minfm_hub.pull import is_pickle
from minfm_hub.push import parse_size
from minfm_hub.uri import HubRef, parse_hf_uri, parse_ref


@pytest.mark.parametrize("text, repo_id, revision", [
    ("org/name", "org/name", None),
    ("hf://org/name", "org/name", None),
    ("hf://Org-1/my_model.v2@v1.0", "Org-1/my_model.v2", "v1.0"),
    ("org/name@refs/pr/3", "org/name", "refs/pr/3"),
    ("org/name@" + "a" * 40, "org/name", "a" * 40),
])
def test_valid_refs(text, repo_id, revision):
    ref = parse_ref(text)
    assert ref == HubRef(repo_id, revision)
    assert parse_ref(ref.uri) == ref and ref.uri.startswith("hf://")


@pytest.mark.parametrize("text", [
    "name", "org/", "/name", "a/b/c", "org/na me", "org/--x", "org/a..b", "-org/x", "org/x.git",
    "org/" + "x" * 97, "org/x@", "org/x@a b", "org/x@../main", "org/x@main:y", "hf:///x",
])
def test_invalid_refs_are_user_errors(text):
    with pytest.raises(MinfmError):
        parse_ref(text)


def test_hf_uri_needs_the_scheme():
    with pytest.raises(MinfmError, match="expected an hf://"):
        parse_hf_uri("org/name")


@pytest.mark.parametrize("text, n", [("5GB", 5 * 10**9), ("2500B", 2500), ("1.5MiB", 3 * 2**19), (123, 123), ("7", 7)])
def test_parse_size(text, n):
    assert parse_size(text) == n


def test_pickle_suffixes():
    assert all(map(is_pickle, ["a.bin", "x/y.PT", "m.pth", "m.ckpt", "o.pkl"]))
    assert not any(map(is_pickle, ["model.safetensors", "binary.json", "checkpoint/.metadata", "x.distcp"]))


def test_card_metadata_from_recipe():
    recipe = {
        "model": {"denoiser": {"name": "flux", "pretrained": "black-forest-labs/FLUX.1-dev"}},
        "data": {"name": "image_folder", "root": "/data"},
        "train": {"init_from": "experiments/local-run"},
    }
    meta = metadata(recipe, license="apache-2.0")
    assert meta == {
        "library_name": "minfm", "pipeline_tag": "text-to-image", "license": "apache-2.0",
        "tags": ["minfm", "flow-matching", "text-to-image", "flux"],
        "base_model": "black-forest-labs/FLUX.1-dev",
    }
    assert "base_model" not in metadata({}, license="other")
