"""T5 (packed, no padding tokens) and CLIP (pooled) encoders with tiny random models."""

from __future__ import annotations

import pytest
import torch

from encoder_fixtures import CLIP_ARCH, T5_ARCH, clip_tokenizer, t5_tokenizer
from minfm_core.errors import MinfmError
from minfm_plugins.text_encoders.clip import build_clip
from minfm_plugins.text_encoders.configs import ClipEncoderConfig, T5EncoderConfig
from minfm_plugins.text_encoders.t5 import build_t5

PROMPTS = ["a red circle", "", "a small blue square on a yellow background", "a cat"]
WORDS_PER_PROMPT = [3, 0, 8, 2]


@pytest.fixture(scope="module")
def t5_tok(tmp_path_factory):
    return t5_tokenizer(tmp_path_factory.mktemp("t5tok"))


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory.mktemp("cliptok"))


def t5_cfg(tok, **kw) -> T5EncoderConfig:
    return T5EncoderConfig(**{"pretrained": None, "tokenizer": str(tok), "variant": "t5-v1_1-small",
                              "arch": T5_ARCH, "dtype": "fp32", **kw})


def clip_cfg(tok, **kw) -> ClipEncoderConfig:
    return ClipEncoderConfig(**{"pretrained": None, "tokenizer": str(tok), "arch": CLIP_ARCH, "dtype": "fp32", **kw})


@pytest.fixture(scope="module")
def t5(t5_tok):
    torch.manual_seed(0)
    return build_t5(t5_cfg(t5_tok))


def test_t5_packs_tokens_without_padding(t5):
    tokens, lens = t5(PROMPTS)
    assert lens.tolist() == [n + 1 for n in WORDS_PER_PROMPT]  # words + </s>; "" is just </s>
    assert lens.dtype == torch.long
    assert tokens.shape == (sum(lens.tolist()), 32) and tokens.dtype == torch.float32
    assert t5.pooled is False and t5.dim == 32
    # each prompt alone (no padding at all) gives exactly its packed slice
    tok = t5.tokenizer
    for prompt, piece in zip(PROMPTS, torch.split(tokens, lens.tolist())):
        ids = tok([prompt], return_tensors="pt")["input_ids"]
        assert (ids != tok.pad_token_id).all()
        alone = t5.model(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(piece, alone, rtol=1e-5, atol=1e-5)


def test_t5_truncates_and_keeps_padding_on_request(t5_tok):
    torch.manual_seed(0)
    short = build_t5(t5_cfg(t5_tok, max_length=4))
    _, lens = short(PROMPTS)
    assert lens.tolist() == [4, 1, 4, 3]
    padded = build_t5(t5_cfg(t5_tok, max_length=12, keep_padding=True))
    tokens, lens = padded(PROMPTS)
    assert lens.tolist() == [12] * 4 and tokens.shape == (48, 32)


def test_t5_unmasked_padding_changes_outputs_masked_does_not(t5_tok, t5):
    torch.manual_seed(0)
    bfl = build_t5(t5_cfg(t5_tok, max_length=12, mask_padding=False))
    bfl.load_state_dict(t5.state_dict())
    a, lens_a = t5(PROMPTS)
    b, lens_b = bfl(PROMPTS)
    assert torch.equal(lens_a, lens_b)
    assert not torch.allclose(a, b, atol=1e-4)  # pads are visible to attention without the mask


def test_t5_dtype_and_frozen(t5_tok):
    enc = build_t5(t5_cfg(t5_tok, dtype="bf16"))
    tokens, _ = enc(PROMPTS)
    assert tokens.dtype == torch.bfloat16
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert enc.__dict__["_compiled"] is None  # compile is for CUDA only


def test_t5_loads_a_saved_folder_and_checks_its_shape(t5, t5_tok, tmp_path):
    t5.model.save_pretrained(tmp_path / "t5", safe_serialization=True)
    loaded = build_t5(t5_cfg(t5_tok, pretrained=str(tmp_path / "t5")))
    torch.testing.assert_close(loaded(PROMPTS)[0], t5(PROMPTS)[0])
    with pytest.raises(MinfmError, match="d_model = 32 \\(the config says 512\\)"):
        build_t5(t5_cfg(t5_tok, pretrained=str(tmp_path / "t5"), arch={}))


def test_t5_empty_batch(t5):
    tokens, lens = t5([])
    assert tokens.shape == (0, 32) and lens.shape == (0,)


def test_t5_xxl_structure_on_meta_without_files():
    cfg = T5EncoderConfig(pretrained="nobody/not-cached", tokenizer="nobody/not-cached")
    assert cfg.dim == 4096
    with torch.device("meta"):
        enc = build_t5(cfg, load_weights=False)
    assert sum(p.numel() for p in enc.parameters()) == 4_762_310_656  # T5 v1.1 XXL encoder


def test_clip_pooled_vector(clip_tok):
    torch.manual_seed(0)
    enc = build_clip(clip_cfg(clip_tok))
    vec = enc(PROMPTS)
    assert enc.pooled is True and vec.shape == (4, 32) and vec.dtype == torch.float32
    # FLUX pads CLIP prompts to max_length: the pooled vector must not depend on that
    batch = enc.tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    want = enc.model(input_ids=batch["input_ids"]).pooler_output
    torch.testing.assert_close(vec, want, rtol=1e-5, atol=1e-5)
    # the pooled state sits on each prompt's end token
    for i, prompt in enumerate(PROMPTS):
        ids = enc.tokenizer([prompt], return_tensors="pt")["input_ids"]
        last = enc.model(input_ids=ids).last_hidden_state[0, -1]
        torch.testing.assert_close(vec[i], last, rtol=1e-5, atol=1e-5)


def test_clip_large_structure_on_meta():
    cfg = ClipEncoderConfig()
    assert cfg.dim == 768
    # a diffusers pipeline's text_encoder folder finds its tokenizer in the sibling folder
    assert cfg.pretrained_refs == ("black-forest-labs/FLUX.1-schnell/text_encoder", "black-forest-labs/FLUX.1-schnell/tokenizer")
    assert ClipEncoderConfig(pretrained="openai/clip-vit-large-patch14").pretrained_refs == ("openai/clip-vit-large-patch14",)
    with torch.device("meta"):
        enc = build_clip(cfg, load_weights=False)
    assert sum(p.numel() for p in enc.parameters()) == 123_060_480  # CLIP ViT-L/14 text tower


def test_unknown_arch_key_is_a_recipe_error():
    from minfm_core.config import structure
    from minfm_core.errors import RecipeError

    with pytest.raises(RecipeError, match="unknown architecture key\\(s\\) d_modle"):
        structure({"arch": {"d_modle": 8}}, T5EncoderConfig, path="model.text_encoder")


def test_a_pretrained_config_that_is_not_its_weights_is_one_line(t5, t5_tok, tmp_path):
    """config.json is from outside: one saying a bigger model than its weights hold was built in
    full before any check (a memory bomb), and one whose shapes disagree with its own weights
    was transformers' RuntimeError traceback, 'a bug in minFM'."""
    import json

    folder = tmp_path / "t5"
    t5.model.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "d_ff": 10**7}))
    with pytest.raises(MinfmError, match=r"config.json describes a model of [\d,]+ parameters, but the folder's "
                                         r"weights hold [\d,]+ bytes: they cannot be that model"):
        build_t5(t5_cfg(t5_tok, pretrained=str(folder)))
    # (a field the recipe does not state: the weights' table of 32 buckets against 64)
    (folder / "config.json").write_text(json.dumps({**config, "relative_attention_num_buckets": 64}))
    with pytest.raises(MinfmError, match=rf"\({folder}\) does not load: "):
        build_t5(t5_cfg(t5_tok, pretrained=str(folder)))
