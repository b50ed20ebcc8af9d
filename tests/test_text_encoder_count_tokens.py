"""``TextEncoder.count_tokens``: a text encoder says how many tokens each prompt becomes, or
that a prompt cannot be encoded, without running the model. Sampling, the demo and a run's
galleries ask before any work (an unknown class was found only at its batch, or at the first
gallery hours into a run); the balancer's simulator counts text with it (it used to probe
the built-ins' own attributes, so a third-party encoder always got a random range)."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from conftest import ROOT, minfm_in_process
from engine_helpers import tiny
from minfm_core import hookimpl, protocols, testing
from minfm_core.cli.main import main
from minfm_core.errors import MinfmError, PluginError
from minfm_core.plugins import plugin
from minfm_core.registry import get_registry
from minfm_plugins.text_encoders.class_embedding import save_class_table

CLASSES = {"": 2, "tench": 0, "goldfish": 1}


class WordCounter(torch.nn.Module, protocols.TextEncoder):
    """A docs-only third-party encoder: one token per word plus an end token; refuses 'dragon'."""

    pooled = False

    def __init__(self, dim: int = 16):
        super().__init__()
        self.table = torch.nn.Embedding(64, dim)

    def count_tokens(self, prompts):
        for p in prompts:
            if "dragon" in p.split():
                raise MinfmError(f"word_counter: cannot encode {p!r}")
        return [len(p.split()) + 1 for p in prompts]

    @torch.no_grad()
    def forward(self, prompts):
        lens = torch.tensor(self.count_tokens(prompts))
        ids = torch.tensor([zlib.crc32(w.encode()) % 63 for p in prompts for w in p.split() + ["</s>"]], dtype=torch.long)
        return self.table(ids), lens


class Silent(WordCounter):
    """Inherits the protocol's default count_tokens: None (cannot tell)."""

    count_tokens = protocols.TextEncoder.count_tokens

    def forward(self, prompts):
        lens = torch.tensor([len(p.split()) + 1 for p in prompts])
        return self.table(torch.zeros(int(lens.sum()), dtype=torch.long)), lens


class Lying(Silent):
    def count_tokens(self, prompts):
        return [1.5] * len(prompts)


class NoEmpty(WordCounter):
    """Counts words but refuses the empty prompt, which the engine encodes for dropped captions."""

    def count_tokens(self, prompts):
        if "" in prompts:
            raise MinfmError("no_empty: an empty prompt")
        return super().count_tokens(prompts)


class Encoders:
    @hookimpl
    def register_text_encoders(self, register):
        for name, cls in (("word_counter", WordCounter), ("silent", Silent), ("lying", Lying), ("no_empty", NoEmpty)):
            register(name, lambda cfg=None, *, load_weights=True, cls=cls: cls(), doc=f"{name} (test)")


@pytest.fixture
def encoders():
    with plugin(Encoders(), "count_probe"):
        yield


def test_the_kit_holds_count_tokens_to_what_call_gives(encoders):
    testing.check_text_encoder(get_registry().get("text_encoder", "word_counter"), smoke=True)
    testing.check_text_encoder(get_registry().get("text_encoder", "silent"), smoke=True)  # None: allowed
    with pytest.raises(AssertionError, match=r"count_tokens\(prompts\): expected token counts \(ints >= 0\), got 1.5"):
        testing.check_text_encoder(get_registry().get("text_encoder", "lying"), smoke=True)


def _built_in_configs(table, tmp_path) -> dict[str, list[dict]]:
    """The configs each built-in text encoder is counted under (a new one must be added)."""
    from encoder_fixtures import CLIP_ARCH, T5_ARCH, clip_tokenizer, t5_tokenizer

    t5 = {"pretrained": "", "tokenizer": str(t5_tokenizer(tmp_path / "t5tok")), "variant": "t5-v1_1-small",
          "arch": T5_ARCH, "max_length": 6}
    clip = {"pretrained": "", "tokenizer": str(clip_tokenizer(tmp_path / "cliptok")), "arch": CLIP_ARCH}
    table_cfg = {"embeddings": str(table), "num_rows": 3, "dim": 6, "unknown": "unconditional"}
    return {
        "vocab": [{"dim": 8, "max_length": 8, "pooled": p} for p in (False, True)],
        "class_embedding": [{**table_cfg, "pooled": p} for p in (False, True)],
        "t5": [t5, {**t5, "keep_padding": True}, {**t5, "mask_padding": False}],
        "clip": [clip],
    }


def test_every_built_in_counts_the_tokens_it_returns(table, tmp_path):
    """Each built-in's count equals the lens its __call__ returns (1 each when pooled),
    truncation and padding included."""
    from minfm_core.config import structure

    configs = _built_in_configs(table, tmp_path)
    prompts = ["", "tench", "a red circle on a blue square", "goldfish " * 40]
    built_ins = {c.name for c in get_registry().components("text_encoder") if c.plugin == "text_encoders"}
    assert built_ins == set(configs), "count every built-in text encoder here"
    for name, options in configs.items():
        comp = get_registry().get("text_encoder", name)
        for opts in options:
            enc = comp.build(structure(dict(opts), comp.config))
            out = enc(prompts)
            want = [1] * len(prompts) if enc.pooled else out[1].tolist()
            assert enc.count_tokens(prompts) == want, (name, opts)


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "classes.safetensors"
    save_class_table(torch.arange(18, dtype=torch.float32).reshape(3, 6), CLASSES, path)
    return path


def _class_table_set(table) -> str:
    return f'model.text_encoder={{name = "class_embedding", embeddings = {json.dumps(str(table))}, num_rows = 3, dim = 16}}'


def test_sample_refuses_an_unknown_class_before_any_batch(trained_run, table, tmp_path):
    big = tmp_path / "t16.safetensors"  # the tiny model's text width is 16
    save_class_table(torch.randn(3, 16), CLASSES, big)
    out = tmp_path / "out"
    res = minfm_in_process("sample", str(trained_run), "--out", str(out), "--prompt", "tench", "--prompt", "dragon",
                           "--steps", "2", "--set", _class_table_set(big))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "the prompts: class_embedding: unknown prompt 'dragon'" in res.stderr
    assert not out.exists()  # no record of a request that drew nothing, no empty folder
    # the same folder then takes the corrected request
    res = minfm_in_process("sample", str(trained_run), "--out", str(out), "--prompt", "tench", "--prompt", "goldfish",
                           "--steps", "2", "--set", _class_table_set(big))
    assert res.returncode == 0, res.stderr
    assert len(list((out / "images").glob("*.png"))) == 2


def test_a_gallery_prompt_the_encoder_refuses_stops_the_run_before_step_1(encoders, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tiny(run, 'model.text_encoder={name = "word_counter"}', "train.sample_every=2", "train.ckpt_every=2",
                  'sample.prompts=["a red circle", "a dragon"]')
    from minfm_core.engine.train import train

    with pytest.raises(MinfmError, match=r"^sample.prompts: word_counter: cannot encode 'a dragon'$"):
        train(recipe)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    # the encoder trains and draws galleries otherwise
    train(tiny(run, 'model.text_encoder={name = "word_counter"}', "train.sample_every=2", "train.max_steps=2"))
    assert (run / "samples").is_dir()


def test_a_count_that_breaks_the_protocol_names_the_encoder(encoders, trained_run, tmp_path):
    res = minfm_in_process("sample", str(trained_run), "--out", str(tmp_path / "out"), "--prompt", "a red circle",
                           "--set", 'model.text_encoder={name = "lying"}')
    assert res.returncode != 0
    assert ("text_encoder 'lying' of plugin 'count_probe': count_tokens(prompts): "
            "expected token counts (ints >= 0), got 1.5") in res.stderr


def test_the_demo_refuses_an_unknown_class_without_naming_files(trained_run, tmp_path):
    from minfm_apps.model import DemoModel
    from minfm_plugins.text_encoders.class_embedding import build_class_embedding
    from minfm_plugins.text_encoders.configs import ClassEmbeddingConfig

    big = tmp_path / "secret_place" / "t16.safetensors"
    big.parent.mkdir()
    save_class_table(torch.randn(3, 16), CLASSES, big)
    model = DemoModel.load(str(trained_run), device="cpu", max_images=2)
    model.pipe.text_encoder = build_class_embedding(ClassEmbeddingConfig(embeddings=str(big), num_rows=3, dim=16))
    args = ("16x16", 2, 1.0, False, "euler", 0, 1)
    model.check_request("tench", "", *args)
    for prompt, neg, name in (("dragon", "", "Prompt"), ("tench", "dragon", "Negative prompt")):
        with pytest.raises(MinfmError) as info:
            model.check_request(prompt, neg, *args)
        assert str(info.value) == f"{name}: this model's text encoder cannot encode it; try one of the examples."
        assert not isinstance(info.value, PluginError)


def test_simulate_counts_text_with_a_third_party_encoders_count_tokens(encoders, tmp_path, capsys):
    quickstart = str(ROOT / "recipes" / "quickstart.toml")
    traces = {}
    for name in ("word_counter", "silent"):
        out = tmp_path / f"{name}.json"
        assert main(["balance", "simulate", quickstart, "--world-size", "2", "--bags", "g1n2", "--steps", "2",
                     "--batch-size", "3", "--set", f'model.text_encoder={{name = "{name}"}}', "--set",
                     "model.denoiser.d_txt=16", "--set", "train.text_dropout=0", "--text-range", "900", "900",
                     "--trace-out", str(out)]) == 0
        traces[name] = [v for step in json.loads(out.read_text()) for r in step for v in r]
        traces[name + ".err"] = capsys.readouterr().err
    # 32x32 .. 48x32 pixels, 2x2 patches: 256-384 image tokens, plus a caption's words + 1
    assert all(256 + 2 <= v <= 384 + 32 for v in traces["word_counter"])
    assert "drawn from" not in traces["word_counter.err"]
    # an encoder that cannot tell gets the range, said aloud
    assert all(v >= 256 + 900 for v in traces["silent"])
    assert "text lengths: drawn from 900-900 tokens" in traces["silent.err"]


def test_simulate_names_an_encoder_whose_counts_break_the_protocol(encoders, tmp_path, capsys):
    """A count list one short was an IndexError in the simulator, reported as a bug in minFM."""
    quickstart = str(ROOT / "recipes" / "quickstart.toml")
    assert main(["balance", "simulate", quickstart, "--world-size", "2", "--bags", "g1n2", "--steps", "1",
                 "--set", 'model.text_encoder={name = "lying"}', "--set", "model.denoiser.d_txt=16"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bug" not in err
    assert err.strip().endswith("text_encoder 'lying' of plugin 'count_probe': count_tokens(prompts): "
                                "expected token counts (ints >= 0), got 1.5")


@pytest.mark.parametrize("job", ["train", "sample"])
def test_check_counts_the_jobs_prompts_as_the_run_would(encoders, trained_run, job):
    """``minfm check`` builds the text encoders on the meta device, where count_tokens works
    (protocols.TextEncoder): a prompt the run would refuse before its first step fails the
    check too."""
    recipe = str(ROOT / "tests" / "recipes" / "tiny.toml")
    sets = ["--set", 'model.text_encoder={name = "word_counter"}', "--set",
            f"job={job}", "--set", f"sample.source={json.dumps(str(trained_run))}" if job == "sample"
            else "train.sample_every=2"]
    res = minfm_in_process("check", recipe, *sets, "--set", 'sample.prompts=["a red circle", "a dragon"]')
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "sample.prompts: word_counter: cannot encode 'a dragon'" in res.stderr, res.stderr
    res = minfm_in_process("check", recipe, *sets, "--set", 'sample.prompts=["a red circle"]',
                           "--set", 'sample.neg_prompt="a dragon"')
    assert res.returncode == 2 and "sample.neg_prompt: word_counter: cannot encode 'a dragon'" in res.stderr
    res = minfm_in_process("check", recipe, *sets, "--set", 'sample.prompts=["a red circle"]')
    assert res.returncode == 0, res.stderr
    if job == "train":  # no galleries: no prompts to encode
        res = minfm_in_process("check", recipe, *sets[:4], "--set", 'sample.prompts=["a dragon"]')
        assert res.returncode == 0, res.stderr


def test_check_names_an_encoder_that_refuses_the_empty_prompt(encoders):
    """``minfm check`` asks ``count_tokens([""])`` first to learn whether the encoder can count
    here at all; one refusing only the empty prompt passed the check and failed the run."""
    recipe = str(ROOT / "tests" / "recipes" / "tiny.toml")
    sets = ["--set", "train.sample_every=2"]  # galleries: prompts the job encodes, the probe of whether it counts
    res = minfm_in_process("check", recipe, *sets, "--set", 'model.text_encoder={name = "no_empty"}')
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert ("model.text_encoder: text_encoder 'no_empty' of plugin 'count_probe': count_tokens(['']): refuses the "
            "empty prompt, which the engine encodes (a dropped caption, the unconditional branch of guidance): "
            "no_empty: an empty prompt") in res.stderr, res.stderr
    assert minfm_in_process("check", recipe, *sets, "--set", 'model.text_encoder={name = "word_counter"}').returncode == 0


def test_check_downloads_nothing_to_count(tmp_path, monkeypatch):
    """T5 counts with its tokenizer, which ``minfm check`` must not fetch (check comes before
    ``minfm cache models``): an encoder that cannot count yet is not asked."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    res = minfm_in_process("check", str(ROOT / "recipes" / "flux_dev_inference.toml"),
                           "--set", "model.text_encoder.keep_padding=false")
    assert res.returncode == 0, res.stderr
    import os

    assert "HF_HUB_OFFLINE" not in os.environ  # set while counting only
