"""Class-embedding tables and the shapes word-vocabulary encoder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from minfm_core.config import structure
from minfm_core.errors import MinfmError, RecipeError
from minfm_core.registry import get_registry
from minfm_plugins.text_encoders.class_embedding import build_class_embedding, save_class_table
from minfm_plugins.text_encoders.configs import ClassEmbeddingConfig, VocabEncoderConfig
from minfm_plugins.text_encoders.vocab import build_vocab

CLASSES = {"": 3, "tench": 0, "goldfish": 1, "great white shark": 2}


@pytest.fixture
def table_files(tmp_path):
    table = torch.arange(4 * 6, dtype=torch.float32).reshape(4, 6)
    save_class_table(table, CLASSES, tmp_path / "t.safetensors")
    return table, tmp_path / "t.safetensors"


def class_cfg(files, **kw):
    return ClassEmbeddingConfig(**{"embeddings": str(files[1]), "num_rows": 4, "dim": 6, **kw})


def test_class_embedding_lookup_including_the_empty_prompt(table_files):
    table = table_files[0]
    enc = build_class_embedding(class_cfg(table_files))
    tokens, lens = enc(["goldfish", "", " tench ", "great white shark"])
    assert lens.tolist() == [1, 1, 1, 1]
    assert torch.equal(tokens, table[[1, 3, 0, 2]])
    assert not any(p.requires_grad for p in enc.parameters())


def test_class_embedding_pooled_feeds_the_vec_input(table_files):
    enc = build_class_embedding(class_cfg(table_files, pooled=True))
    vec = enc(["", "tench"])
    assert vec.shape == (2, 6) and torch.equal(vec, table_files[0][[3, 0]])


def test_class_embedding_unknown_prompt(table_files):
    with pytest.raises(MinfmError, match="unknown prompt 'dragon'"):
        build_class_embedding(class_cfg(table_files))(["dragon"])
    enc = build_class_embedding(class_cfg(table_files, unknown="unconditional", pooled=True))
    assert torch.equal(enc(["dragon"])[0], table_files[0][3])


def test_class_embedding_labels_from_a_json_file(table_files, tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"": 0, "koi": 2}))
    enc = build_class_embedding(class_cfg(table_files, labels=str(tmp_path / "labels.json"), pooled=True))
    assert torch.equal(enc(["koi", ""]), table_files[0][[2, 0]])
    with pytest.raises(MinfmError, match="unknown prompt 'tench'"):
        enc(["tench"])


def test_class_embedding_checks_its_files(table_files, tmp_path):
    with pytest.raises(MinfmError, match="is \\(4, 6\\), the config says num_rows = 1001, dim = 6"):
        build_class_embedding(class_cfg(table_files, num_rows=1001))
    (tmp_path / "nouncond.json").write_text(json.dumps({"tench": 0}))
    with pytest.raises(MinfmError, match="have no row for the empty prompt"):
        build_class_embedding(class_cfg(table_files, labels=str(tmp_path / "nouncond.json")))
    with pytest.raises(MinfmError, match="missing.safetensors: no such file"):
        build_class_embedding(class_cfg(table_files, embeddings=str(tmp_path / "missing.safetensors")))


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe\x00 not text", "not valid JSON"),  # was a UnicodeDecodeError traceback
    (json.dumps({"": 3, "tench": True}).encode(), "must be a JSON object of prompt -> row in \\[0, 4\\)"),
    (json.dumps({"": 3, "tench": 4}).encode(), "must be a JSON object of prompt -> row"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_class_embedding_labels_from_outside_are_checked(table_files, tmp_path, content, message):
    """A labels file can come with a downloaded model: any bytes are one error naming it."""
    labels = tmp_path / "labels.json"
    labels.write_bytes(content)
    with pytest.raises(MinfmError, match=f"class_embedding: labels in {labels}.*{message}"):
        build_class_embedding(class_cfg(table_files, labels=str(labels)))


def test_class_embedding_labels_file_is_bounded(table_files, tmp_path, monkeypatch):
    from minfm_plugins.text_encoders import class_embedding

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(CLASSES) + " " * 100)
    monkeypatch.setattr(class_embedding, "MAX_LABELS_BYTES", 64)
    with pytest.raises(MinfmError, match="bytes is more than the 64 accepted"):
        build_class_embedding(class_cfg(table_files, labels=str(labels)))


def test_class_embedding_on_meta_reads_no_file():
    cfg = ClassEmbeddingConfig(embeddings="/nope/t.safetensors")
    with torch.device("meta"):
        enc = build_class_embedding(cfg, load_weights=False)
    assert sum(p.numel() for p in enc.parameters()) == 1001 * 768


# --- vocab ---------------------------------------------------------------------------


def test_vocab_per_token_and_unknown_words():
    enc = build_vocab(VocabEncoderConfig())
    tokens, lens = enc(["a red circle", "", "A small BLUE square on a yellow background", "a zorblax"])
    assert lens.tolist() == [4, 1, 9, 3]  # words + <eos>
    assert tokens.shape == (17, 64) and tokens.dtype == torch.float32
    pieces = torch.split(tokens, lens.tolist())
    eos = pieces[1][0]
    assert all(torch.equal(p[-1], eos) for p in pieces)  # every prompt ends with <eos>
    assert torch.equal(pieces[0][0], pieces[2][5])  # "a" is the same row wherever it appears
    assert torch.equal(pieces[0][1], enc.table.weight[enc.index["red"]])
    assert torch.equal(pieces[3][1], enc.table.weight[enc.index["<unk>"]])
    assert torch.allclose(tokens.pow(2).mean(-1), torch.ones(17))  # unit RMS rows


def test_vocab_pooled_is_the_token_mean():
    per_token = build_vocab(VocabEncoderConfig(dim=16))
    pooled = build_vocab(VocabEncoderConfig(dim=16, pooled=True))
    tokens, lens = per_token(["a red circle", ""])
    vec = pooled(["a red circle", ""])
    assert vec.shape == (2, 16)
    torch.testing.assert_close(vec[0], tokens[:4].mean(0))
    torch.testing.assert_close(vec[1], tokens[4])


def test_vocab_rows_depend_only_on_seed_and_word():
    a = build_vocab(VocabEncoderConfig(words=("red", "circle")))
    b = build_vocab(VocabEncoderConfig(words=("circle", "blue", "red")))
    c = build_vocab(VocabEncoderConfig(words=("red", "circle"), seed=1))
    assert torch.equal(a(["red circle"])[0], b(["red circle"])[0])
    assert not torch.equal(a(["red"])[0], c(["red"])[0])


def test_vocab_is_deterministic_across_processes():
    code = (
        "from minfm_plugins.text_encoders.vocab import build_vocab;"
        "from minfm_plugins.text_encoders.configs import VocabEncoderConfig;"
        "t, _ = build_vocab(VocabEncoderConfig())(['a large green triangle']);"
        "print(repr(t.double().sum().item()), repr(t[0, :3].tolist()))"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    t, _ = build_vocab(VocabEncoderConfig())(["a large green triangle"])
    assert outs == {f"{t.double().sum().item()!r} {t[0, :3].tolist()!r}\n"}


def test_vocab_truncates_to_max_length():
    _, lens = build_vocab(VocabEncoderConfig(max_length=3))(["a small red circle on white"])
    assert lens.tolist() == [3]


def test_registered_encoders_have_documented_configs_and_dims():
    import attrs

    reg = get_registry()
    assert set(reg.names("text_encoder")) >= {"t5", "clip", "class_embedding", "vocab"}
    for comp in reg.components("text_encoder"):
        if comp.plugin != "text_encoders":
            continue
        assert comp.doc and all(a.metadata.get("doc") for a in attrs.fields(comp.config))
    assert structure({"dim": 32}, reg.get("text_encoder", "vocab").config).dim == 32
    with pytest.raises(RecipeError, match="model.text_encoder.pooled: expected bool"):
        structure({"pooled": 1}, reg.get("text_encoder", "vocab").config, path="model.text_encoder")


def test_a_sharded_frozen_encoder_computes_in_its_own_dtype(runtime, tmp_path):
    """With several processes the text encoders are sharded with the recipe's parallelizer; FSDP2
    gave them the training's mixed precision too, so the fp32 `vocab` tables ran in bf16 on 2
    processes and in fp32 on 1: a world-size-dependent input to the model."""
    import copy

    import torch

    from engine_helpers import tiny

    resolved = tiny(tmp_path, "parallel.name=fsdp2", "parallel.param_dtype=bf16")
    enc = resolved["model.text_encoder"].build()
    prompts = ["a red circle", "a large blue square on a white background"]
    want, want_lens = enc(prompts)
    parallel = resolved["parallel"].build()
    got, lens = parallel.parallelize(copy.deepcopy(enc), world_size=1, device=torch.device("cpu"), trainable=False)(prompts)
    assert torch.equal(lens, want_lens) and got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
