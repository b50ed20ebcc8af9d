"""A pushed folder's recipe.toml and samples.png are read as untrusted data by the model card.

Every key the card reads (``minfm_hub.card.RECIPE_KEYS``) gets every TOML shape: the wrong
ones are refused in one line naming recipe.toml and the key, the right ones render. A
samples.png Pillow cannot read (or a decompression bomb) is refused naming the file.
"""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest
import tomli_w
from hub_helpers import env_for, main_in_process, make_model_folder, one_error_line

from minfm_core.engine.video_io import recipe_makes_clips
from minfm_core.errors import MinfmError
from minfm_hub import card

pytest_plugins = ["hub_fixtures"]

# One value of each TOML shape, and which of them each declared shape accepts.
VALUES = {"int": 7, "float": 0.5, "bool": True, "str": "x", "ints": [5, 16, 16], "strs": ["a cat"],
          "table": {"a": 1}, "tables": [{"a": 1}], "empty": []}
ACCEPTS = {"table": {"table"}, "component": {"str", "table"}, "string": {"str"}, "integer": {"int"},
           "number": {"int", "float"}, "strings": {"strs", "empty"}, "integers": {"ints", "empty"}}


def _nest(key: str, value) -> dict:
    """``{"a": {"b": value}}`` for ``"a.b"``: the parents of a key as tables."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _full_recipe() -> dict:
    """Every declared key with a value of its shape (tables where a key has children)."""
    good = {"table": {}, "component": {}, "string": "x", "integer": 3, "number": 0.5, "strings": ["a cat"],
            "integers": [5, 16, 16]}
    recipe: dict = {}
    for key, shape in sorted(card.RECIPE_KEYS.items()):
        *parents, last = key.split(".")
        node = recipe
        for p in parents:
            node = node.setdefault(p, {})
        node.setdefault(last, good[shape])
    return recipe


def test_every_shape_of_every_key_the_card_reads_renders_or_is_refused_naming_it(tmp_path):
    assert set(card.RECIPE_KEYS.values()) <= set(ACCEPTS)
    folder = tmp_path / "m"
    folder.mkdir()
    cases = 0
    for key, shape in card.RECIPE_KEYS.items():
        for kind, value in VALUES.items():
            (folder / "recipe.toml").write_text(tomli_w.dumps(_nest(key, value)))
            if kind in ACCEPTS[shape]:
                card.render("org/m", {}, folder)
                continue
            with pytest.raises(MinfmError) as exc:
                card.render("org/m", {}, folder)
            assert str(exc.value).startswith(f"{folder / 'recipe.toml'}: {key} must be "), (key, kind, exc.value)
            assert "\n" not in str(exc.value)
            cases += 1
    assert cases > 100
    (folder / "recipe.toml").write_text(tomli_w.dumps(_full_recipe()))
    assert "## Training" in card.render("org/m", {}, folder)


class _Recording(dict):
    """A recipe that notes every dotted key read from it."""

    def __init__(self, data: dict, seen: set, prefix: str = ""):
        super().__init__({k: _Recording(v, seen, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in data.items()})
        self.seen, self.prefix = seen, prefix

    def get(self, key, default=None):
        self.seen.add(self.prefix + key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(self.prefix + key)
        return super().__getitem__(key)


def test_the_card_reads_no_recipe_key_it_does_not_declare(tmp_path, monkeypatch):
    """RECIPE_KEYS is the whole list: so the shapes above are every shape the card can meet."""
    recipe = _full_recipe()
    core: set = set()
    recipe_makes_clips(_Recording(recipe, core))  # the core's video rule reads a recipe tolerantly
    seen: set = set()
    monkeypatch.setattr(card, "read_recipe", lambda folder: _Recording(recipe, seen))
    card.render("org/m", {}, tmp_path)
    assert seen and seen - set(card.RECIPE_KEYS) <= core, seen - set(card.RECIPE_KEYS) - core


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _cut_gif() -> bytes:
    import io

    from PIL import Image

    frames = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(5)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()[:56]  # Pillow raises IndexError counting its frames


# The shapes the tester's recipes had (hand-edited run folders), through the real CLI.
HAND_EDITED = {
    "model": 'model = "x"\n', "train": "train = 5\n", "sample": 'sample = "x"\n',
    "sample.prompts": "[sample]\nprompts = {a = 1}\n", "sample.prompts ": "[sample]\nprompts = 5\n",
    "data": "data = [1, 2]\n", "data.name": "[data]\nname = [1]\n",
    "model.denoiser.name": "[model.denoiser]\nname = {a = 1}\n",
}


def test_push_of_a_hand_edited_recipe_or_a_bad_samples_png_is_one_line(hub_server, tmp_path: Path):
    cases, expect = [], []
    for i, (key, text) in enumerate(HAND_EDITED.items()):
        folder = make_model_folder(tmp_path / f"r{i}")
        (folder / "recipe.toml").write_text(text)
        cases.append(["hub", "push", str(folder), f"org/r{i}"])
        expect.append(f"{folder / 'recipe.toml'}: {key.strip()} must be ")
    for name, data, why in (("bomb", _png_header(20000, 20000), "image too large to decode safely"),
                            ("junk", b"not a picture", "not a readable image"),
                            ("cut-gif", _cut_gif(), "not a readable image")):
        folder = make_model_folder(tmp_path / name)
        (folder / "samples.png").write_bytes(data)
        cases.append(["hub", "push", str(folder), f"org/{name}"])
        expect.append(f"{folder / 'samples.png'}: {why} (")
    results = main_in_process(env_for(hub_server, tmp_path), *cases)
    for proc, want in zip(results, expect):
        assert want in one_error_line(proc)
    assert hub_server.requests == []  # refused before the first request


HOSTILE = "x\n```\n## Injected heading\n<script>alert(1)</script> [click](javascript:alert(1)) | cell ` tick"


@pytest.mark.parametrize("key", [k for k, shape in card.RECIPE_KEYS.items() if shape in ("string", "strings")])
def test_a_recipe_value_never_becomes_markup_in_the_card(tmp_path, key):
    """A pushed recipe is text someone wrote (a pulled repo, re-published): its values went
    into the card raw, so a prompt broke out of the code block and a data name or flavor
    became a heading, a script tag, a link. Every string the card reads, and a metric's name."""
    import json

    folder = make_model_folder(tmp_path / "m", extras=False)
    recipe = _full_recipe()
    value = [HOSTILE] if card.RECIPE_KEYS[key] == "strings" else HOSTILE
    node = recipe
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    (folder / "recipe.toml").write_text(tomli_w.dumps(recipe))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, HOSTILE: 0.5}) + "\n")
    text = card.render("org/m", {p.name: p for p in folder.iterdir()}, folder)
    body = text.split("\n---\n", 1)[1]
    lines = body.splitlines()
    assert "## Injected heading" not in lines and sum(x.startswith("```") for x in lines) == 2
    bare = re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", body)  # what is not inside a code span
    assert "<script" not in bare and "javascript:" not in bare, bare
    for line in lines:
        if line.startswith("| "):  # a table row keeps its two cells
            assert len(re.findall(r"(?<!\\)\|", line)) == 3, line
