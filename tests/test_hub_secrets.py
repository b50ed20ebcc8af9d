"""The token scan of `minfm hub push` (minfm_hub.secrets): every file, every offset, redacted."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from minfm_core.errors import MinfmError
from minfm_hub import secrets

TOK = "hf_" + "A1b2C3d4E5" * 3 + "xyz"


@pytest.mark.parametrize("pre", range(0, 140, 9))
def test_tokens_across_chunk_boundaries_are_found_with_their_line(tmp_path, monkeypatch, pre):
    monkeypatch.setattr(secrets, "_CHUNK", 64)  # small chunks: the token straddles every boundary
    (tmp_path / "m.jsonl").write_text(("x" * pre + "\n") * 3 + "y" * pre + TOK + "\nz\n")
    assert secrets.scan_file(tmp_path / "m.jsonl", None) == f"a Hugging Face token at line 4: hf_A*** ({len(TOK)} chars)"


def test_the_active_token_is_found_even_when_not_token_shaped(tmp_path):
    (tmp_path / "notes.txt").write_text("a\nb my-secret-value c\n")
    assert secrets.scan_file(tmp_path / "notes.txt", "my-secret-value").startswith("a Hugging Face token at line 2: my-s***")
    assert secrets.scan_file(tmp_path / "notes.txt", None) is None


def test_short_or_underscored_hf_strings_are_not_tokens(tmp_path):
    (tmp_path / "r.toml").write_text('a = "hf_short"\nb = "hf_with_underscores_but_not_a_token_at_all"\n')
    assert secrets.scan_file(tmp_path / "r.toml", None) is None


def test_safetensors_are_scanned_in_their_header_only(tmp_path):
    save_file({"w": torch.zeros(64, dtype=torch.uint8)}, tmp_path / "a.safetensors", metadata={"note": TOK})
    assert secrets.scan_file(tmp_path / "a.safetensors", None).startswith("a Hugging Face token at byte ")
    body = torch.frombuffer(bytearray(TOK.encode()), dtype=torch.uint8).clone()
    save_file({"w": body}, tmp_path / "b.safetensors")  # tensor bytes that spell a token: numbers, not text
    assert secrets.scan_file(tmp_path / "b.safetensors", None) is None


def test_scan_for_tokens_names_the_file_never_the_token(tmp_path):
    (tmp_path / "recipe.toml").write_text(f'neg = "{TOK}"\n')
    (tmp_path / "README.md").write_text(f"copied {TOK}\n")
    with pytest.raises(MinfmError) as exc:
        secrets.scan_for_tokens({"README.md": tmp_path / "README.md", "recipe.toml": tmp_path / "recipe.toml"})
    assert str(exc.value).startswith("recipe.toml: refusing to push: a Hugging Face token at line 1: hf_A***")
    assert TOK not in str(exc.value)
    with pytest.raises(MinfmError) as exc:
        secrets.scan_for_tokens({f"checkpoint/{TOK}.json": tmp_path / "recipe.toml"})
    assert "name holds a Hugging Face token" in str(exc.value) and TOK not in str(exc.value)


def test_the_value_of_any_secret_named_variable_is_refused_too(tmp_path, monkeypatch):
    """Only Hub tokens were looked for: a recipe's ${WANDB_API_KEY}, expanded in recipe.toml and
    quoted by the card, was pushed (the demo's recipe panel already masked such values)."""
    monkeypatch.setenv("WANDB_API_KEY", "wandbSECRET456")
    monkeypatch.setenv("MY_PASSWORD", "short")  # under 8 characters: ordinary words, not looked for
    monkeypatch.setenv("EDITOR", "vim-is-not-secret")  # a name that says nothing of a secret
    (tmp_path / "recipe.toml").write_text('a = "vim-is-not-secret short"\nneg = "bad wandbSECRET456"\n')
    with pytest.raises(MinfmError) as exc:
        secrets.scan_for_tokens({"recipe.toml": tmp_path / "recipe.toml"})
    assert str(exc.value).startswith("recipe.toml: refusing to push: the value of $WANDB_API_KEY at line 2: wand*** "
                                     "(14 chars)")
    assert "wandbSECRET456" not in str(exc.value)
    with pytest.raises(MinfmError, match=r"^the commit message \(--message\): refusing to push: it holds the value "
                                         r"of \$WANDB_API_KEY, wand\*\*\* \(14 chars\)"):
        secrets.scan_text({"the commit message (--message)": "trained with wandbSECRET456"})


def test_a_secret_as_toml_escapes_it_is_refused(tmp_path, monkeypatch):
    import tomli_w

    monkeypatch.setenv("DB_PASSWORD", 'pa"ss\\word12')
    (tmp_path / "recipe.toml").write_text(tomli_w.dumps({"neg": 'x pa"ss\\word12'}))
    with pytest.raises(MinfmError, match=r"^recipe.toml: refusing to push: the value of \$DB_PASSWORD at line 1"):
        secrets.scan_for_tokens({"recipe.toml": tmp_path / "recipe.toml"})
