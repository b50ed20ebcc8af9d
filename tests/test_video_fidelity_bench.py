"""bench/video_fidelity.py: its prompt set covers every motion (>= 8 prompts, >= 4 clips each) and its
scoring counts what the classifier reads; on real clips it scores 100% motion and colour."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from minfm_core.config import structure
from minfm_core.recipe import load_recipe
from minfm_core.registry import get_registry
from minfm_plugins.data.mix import dataset_config
from minfm_plugins.data.moving_shapes import classify_clip

ROOT = Path(__file__).resolve().parent.parent


def bench():
    spec = importlib.util.spec_from_file_location("video_fidelity", ROOT / "bench" / "video_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_quickstart_prompt_set_covers_every_motion():
    b = bench()
    cfg = dataset_config(load_recipe(ROOT / "recipes" / "quickstart_video.toml").get("data"), "moving_shapes")
    assert cfg.frames == 5 and tuple(cfg.sizes) == ((16, 16),)
    wants = b.prompts_for(cfg, 4)
    prompts = {w for w in wants}
    assert len(prompts) >= 8 and len(wants) == 4 * len(prompts)
    assert {m for _, _, m in wants} == {"left", "right", "up", "down", "still"}
    assert {c for c, _, _ in wants} == set(cfg.colours) and {s for _, s, _ in wants} == set(cfg.shapes)


def test_scoring_real_clips():
    b = bench()
    comp = get_registry().get("dataset", "moving_shapes")
    ds = comp.build(structure({"frames": 5, "sizes": [[16, 16]], "num_val_samples": 60}, comp.config), split="val")
    specs = [ds.spec(i) for i in range(60)]
    res = b.score([classify_clip(ds[i]["image"]) for i in range(60)], [(s.colour, s.shape, s.motion) for s in specs])
    assert res["motion"] == 1.0 and res["colour"] == 1.0 and res["shape"] >= 0.9
    assert set(res["motion_by_prompt"].values()) == {1.0}
    wrong = b.score([{"colour": "red", "shape": "circle", "motion": "left"}] * 2,
                    [("red", "square", "left"), ("blue", "circle", "still")])
    assert (wrong["colour"], wrong["shape"], wrong["motion"]) == (0.5, 0.5, 0.5)
    assert wrong["motion_confusion"] == {"left": {"left": 1}, "still": {"left": 1}}


def test_dataset_config_finds_a_mix_source_or_says_what_is_missing():
    import pytest

    from minfm_core.errors import MinfmError

    mix = load_recipe(ROOT / "recipes" / "quickstart_video.toml").get("data")
    assert tuple(dataset_config(mix, "shapes").sizes) == ((32, 32),)
    plain = load_recipe(ROOT / "recipes" / "quickstart.toml").get("data")
    assert dataset_config(plain, "shapes") is plain.config
    with pytest.raises(MinfmError, match="data: 'shapes' holds no moving_shapes data"):
        dataset_config(plain, "moving_shapes")
