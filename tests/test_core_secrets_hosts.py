"""Two small core rules the servers rely on: which hosts are loopback, and what the demo masks
in the recipe it shows (minfm_core.cli.argtypes, minfm_core.secrets)."""

from __future__ import annotations

import pytest

from minfm_core.cli.argtypes import host_allowed, is_loopback
from minfm_core.secrets import mask_secrets


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("127.255.255.254", True), ("::1", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("192.168.1.5", False),
    ("evil.example", False), ("localhost.evil.example", False), ("", False),
])
def test_loopback_is_any_loopback_address(host, loopback):
    """--host 127.0.0.2 is as private as 127.0.0.1: it was warned about as public and served
    without the Host check (the DNS-rebinding guard)."""
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("header, allowed", [
    ("127.0.0.2:7860", True), ("[::1]:7860", True), ("localhost:7860", True), ("app.localhost", True),
    ("evil.example", False), ("evil.example:7860", False), ("10.0.0.1", False), ("", True),
])
def test_host_headers_a_loopback_server_answers(header, allowed):
    assert host_allowed(header) is allowed
    assert host_allowed("proxy.example:443", ("proxy.example",))


def test_mask_secrets_hides_tokens_passwords_and_secret_variables():
    token = "hf_" + "Ab1" * 12
    env = {"WANDB_API_KEY": "0123456789abcdef", "MY_TOKEN": "tok-longer-value", "SHORT_KEY": "abc",
           "HOME": "/home/someone", "DATA_ROOT": "/data/imagenet"}
    text = (f'host = "https://bob:pa55word@wandb.example/x"\nkey = "{env["WANDB_API_KEY"]}"\n'
            f'note = "{token}"\nprompt = "tok-longer-value-and-more"\nroot = "/data/imagenet"\nname = "abc"\n')
    masked = mask_secrets(text, env)
    assert masked == ('host = "https://bob:***@wandb.example/x"\nkey = "***"\nnote = "***"\n'
                      'prompt = "***-and-more"\nroot = "/data/imagenet"\nname = "abc"\n')
    # nothing to mask: the text is unchanged
    plain = '[sample]\nprompts = ["a red circle"]\nurl = "https://example.com/a:b"\n'
    assert mask_secrets(plain, env) == plain


def test_a_recipe_a_logger_sends_elsewhere_is_masked(tmp_path, monkeypatch):
    """W&B's run config (an upload) and TensorBoard's recipe text got the resolved recipe with
    its expanded ${WANDB_API_KEY}; every string of it is masked now, its shape kept."""
    from minfm_core.secrets import mask_secrets_in

    monkeypatch.setenv("WANDB_API_KEY", "wandbSECRET456")
    recipe = {"sample": {"prompts": ["a red circle wandbSECRET456"], "steps": 3, "neg_prompt": "x"},
              "logging": {"loggers": [{"name": "wandb", "host": "https://u:pa55word@w.example"}]}}
    assert mask_secrets_in(recipe) == {"sample": {"prompts": ["a red circle ***"], "steps": 3, "neg_prompt": "x"},
                                       "logging": {"loggers": [{"name": "wandb", "host": "https://u:***@w.example"}]}}
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from minfm_plugins.loggers.configs import TensorboardConfig
    from minfm_plugins.loggers.tensorboard_logger import TensorboardLogger

    TensorboardLogger(TensorboardConfig(), str(tmp_path), recipe).close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "a red circle ***" in text and "wandbSECRET456" not in text and "pa55word" not in text


def test_a_secret_with_quotes_or_backslashes_is_masked_as_toml_writes_it():
    import tomli_w

    env = {"DB_PASSWORD": 'pa"ss\\word12'}
    text = tomli_w.dumps({"neg_prompt": f"x {env['DB_PASSWORD']} y"})
    assert "pa\\\"ss" in text  # escaped in the file: the raw value is not there to match
    assert mask_secrets(text, env) == 'neg_prompt = "x *** y"\n'


def test_an_error_quoting_an_expanded_secret_masks_it(monkeypatch, capsys):
    """`--set sample.file_ext=${WANDB_API_KEY}` printed the key in the refusal (a CI log)."""
    from engine_helpers import TINY
    from minfm_core.cli.main import main

    monkeypatch.setenv("WANDB_API_KEY", "wandbSECRET456")
    assert main(["check", str(TINY), "--set", "sample.steps=${WANDB_API_KEY}"]) == 2
    err = capsys.readouterr().err
    assert "wandbSECRET456" not in err and "***" in err, err
