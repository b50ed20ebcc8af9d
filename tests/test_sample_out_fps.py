"""An --out folder's other request is refused naming only what the user changed: fps belongs to
a clip request only, so a picture request into a clip's folder (or back) differs in its size."""

from __future__ import annotations

import json
import re

import pytest

from minfm_core.engine.sample import image_name, prepare_out
from minfm_core.errors import MinfmError


def _folder_of(tmp_path, settings: dict, suffix: str):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "metadata.json").write_text(json.dumps({"settings": settings, "complete": True, "images": []}))
    (out / "images" / image_name(0, 0, suffix)).write_bytes(b"drawn")
    return out


CLIP = {"seed": 0, "size": [5, 16, 16], "fps": 8}  # what request_settings records: fps only for a clip
PICTURE = {"seed": 0, "size": [1, 16, 16]}


@pytest.mark.parametrize(("old", "new", "shown"), [
    (CLIP, PICTURE, "size"),  # was: "different fps, size", with no --fps given
    (PICTURE, CLIP, "size"),
    (CLIP, {**CLIP, "fps": 12}, "fps"),
    (CLIP, {**CLIP, "size": [9, 16, 16], "fps": 12}, "fps, size"),
])
def test_the_refusal_names_only_what_changed(tmp_path, old, new, shown):
    out = _folder_of(tmp_path, old, "mp4" if "fps" in old else "png")
    with pytest.raises(MinfmError, match=re.escape(f"holds samples of another request (different {shown});")):
        prepare_out(out, new, overwrite=False, flag="--out")
