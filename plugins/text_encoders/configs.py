"""Configs of the built-in text encoders (no torch here: plugin loading stays fast).

Every config exposes ``dim`` (the width of what the encoder returns) without reading a
file, so ``minfm check`` can cross-check it against the denoiser and build the exact
structure on the meta device. T5 and CLIP name an architecture ``variant`` (a preset of
the transformers config) plus free-form ``arch`` overrides; a loaded checkpoint must
agree with them.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal

from minfm_core.config import Dtype, config, field
from minfm_core.validators import MAX_DEPTH, MAX_PROMPT_TOKENS, MAX_WIDTH, SEED, Range, RangeError

from .presets import CLIP_PRESETS, T5_PRESETS
from .words import SHAPES_WORDS

#: An embedding width.
WIDTH = Range(1, MAX_WIDTH)
#: Tokens per prompt.
TOKENS = Range(1, MAX_PROMPT_TOKENS)
#: Integer architecture fields (widths, layers, vocabularies: mT5's is 250,112, token ids).
MAX_ARCH_INT = 2**20
#: Heads of one attention layer (T5-XXL: 64).
MAX_HEADS = 1024

#: The range of each integer architecture field; any other is a size or count in [1, MAX_ARCH_INT].
#: Sizes and counts start at 1: 0 heads, d_kv or d_model ended in a ZeroDivisionError inside transformers.
ARCH_INT_RANGES: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("d_model", "d_kv", "d_ff", "hidden_size", "intermediate_size", "projection_dim"), (1, MAX_WIDTH)),
    **dict.fromkeys(("num_heads", "num_attention_heads"), (1, MAX_HEADS)),
    **dict.fromkeys(("num_layers", "num_hidden_layers"), (1, MAX_DEPTH)),
    # T5's relative position buckets: half per direction, and half of those exact (so at least 4)
    "relative_attention_num_buckets": (4, MAX_PROMPT_TOKENS),
    **dict.fromkeys(("relative_attention_max_distance", "max_position_embeddings"), (1, MAX_PROMPT_TOKENS)),
    **dict.fromkeys(("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id"), (0, MAX_ARCH_INT - 1)),
}


@functools.cache
def activation_names() -> frozenset[str]:
    """The activations transformers knows (``ACT2FN``): CLIP's ``hidden_act``. Imported only
    when a recipe overrides one (transformers imports torch)."""
    from transformers.activations import ACT2FN

    return frozenset(ACT2FN)


def _t5_feed_forward(value: str) -> bool:
    """T5Config's ``feed_forward_proj``: ``ACT`` or ``gated-ACT`` (it splits at '-')."""
    act = value.removeprefix("gated-")
    return "-" not in act and act in activation_names()


#: String architecture fields whose values transformers looks up: (accepts, what to say).
ARCH_STRINGS: dict[str, tuple[Any, str]] = {
    "feed_forward_proj": (_t5_feed_forward, "ACT or gated-ACT, ACT one of transformers' activations (ACT2FN)"),
    "hidden_act": (lambda v: v in activation_names(), "one of transformers' activations (ACT2FN)"),
}


def _arch_value_error(value: Any, like: Any, key: str = "") -> str | None:
    """Why ``value`` cannot stand for architecture field ``key``, where the preset has ``like``
    (None: it can)."""
    if isinstance(like, bool):
        return None if isinstance(value, bool) else "expected true or false"
    if isinstance(like, str):
        if not (isinstance(value, str) and len(value) <= 64):
            return "expected a short string"
        accepts, what = ARCH_STRINGS.get(key, (None, ""))
        if accepts is not None and not accepts(value):
            return f"expected {what}, e.g. {like!r}"
        return None
    if isinstance(like, float):  # epsilons and dropout rates
        ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
        return None if ok else "expected a number in [0, 1]"
    lo, hi = ARCH_INT_RANGES.get(key, (1, MAX_ARCH_INT))
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    return None if ok else f"expected an integer in [{lo}, {hi}]"


# Rules between the fields of a whole architecture (preset and overrides), each naming the
# overridden field: (key, why) pairs.
def _t5_arch_problems(arch: dict, given: dict) -> list[tuple[str, str]]:
    buckets, distance = arch.get("relative_attention_num_buckets"), arch.get("relative_attention_max_distance")
    if isinstance(buckets, int) and isinstance(distance, int) and distance <= buckets // 4:
        # the encoder's buckets: half per direction, half of those exact; the log-spaced rest
        # spans up to max_distance, which must lie beyond them (else a bucket index out of range)
        key = "relative_attention_max_distance" if "relative_attention_max_distance" in given \
            else "relative_attention_num_buckets"
        return [(key, f"relative_attention_max_distance = {distance} must exceed relative_attention_num_buckets "
                      f"// 4 = {buckets // 4}")]
    return []


def _clip_arch_problems(arch: dict, given: dict) -> list[tuple[str, str]]:
    width, heads = arch.get("hidden_size"), arch.get("num_attention_heads")
    if isinstance(width, int) and isinstance(heads, int) and heads and width % heads:
        key = "num_attention_heads" if "num_attention_heads" in given else "hidden_size"
        return [(key, f"hidden_size = {width} is not divisible by num_attention_heads = {heads}")]
    return []


def _known_keys(presets: dict[str, dict[str, Any]], between=None):
    keys = set().union(*presets.values())
    example = {k: v for preset in presets.values() for k, v in preset.items()}

    def check(inst, attribute, value) -> None:
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{attribute.name}: keys must be strings, got {bad}")
        unknown = [k for k in value if k not in keys and k not in _EXTRA_ARCH_KEYS]
        if unknown:
            raise ValueError(f"{attribute.name}: unknown architecture key(s) {', '.join(unknown)}; known: {', '.join(sorted(keys))}")
        for k, v in value.items():
            why = _arch_value_error(v, example.get(k, 0), k)  # the extra keys are token ids
            if why:
                raise RangeError(f"{attribute.name}.{k}", f"{why}, got {v!r}"[:200])
        preset = presets.get(getattr(inst, "variant", None))
        if preset is None:
            return  # the variant's own check names it
        arch = {**preset, **value}
        vocab = arch.get("vocab_size")
        for k in sorted(_EXTRA_ARCH_KEYS & set(value)):
            if isinstance(vocab, int) and value[k] >= vocab:
                raise RangeError(f"{attribute.name}.{k}", f"{value[k]} is not a token of the vocabulary "
                                 f"(vocab_size = {vocab})")
        for k, why in between(arch, value) if between else ():
            raise RangeError(f"{attribute.name}.{k}", why)

    return check


PRETRAINED_DOC = ("folder with config.json and safetensors weights, or a Hub reference org/name[@rev][/path]; "
                  "None: random weights (tests)")
TOKENIZER_DOC = (
    "tokenizer folder or Hub reference; None: the pretrained folder, or its sibling tokenizer[_N] "
    "when pretrained is a diffusers pipeline's text_encoder[_N] folder"
)


def default_tokenizer(pretrained: str | None) -> str | None:
    """Where the tokenizer of ``pretrained`` lives: diffusers pipelines keep it in a sibling folder."""
    if not pretrained:
        return None
    head, _, last = pretrained.rstrip("/").rpartition("/")
    m = re.fullmatch(r"text_encoder(_\d+)?", last)
    if head and m:
        return f"{head}/tokenizer{m[1] or ''}"
    return pretrained


#: Config keys that no preset sets but tiny test models need (token ids).
_EXTRA_ARCH_KEYS = {"pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id"}


class _HubTextEncoder:
    """What T5 and CLIP configs share: where their tokenizer is, what `minfm cache models` fetches."""

    @property
    def tokenizer_ref(self) -> str | None:
        return self.tokenizer or default_tokenizer(self.pretrained)

    @property
    def pretrained_refs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r for r in (self.pretrained, self.tokenizer_ref) if r))


@config
class T5EncoderConfig(_HubTextEncoder):
    """T5 encoder (transformers): packed per-token prompt embeddings without padding tokens."""

    pretrained: str | None = field(
        "black-forest-labs/FLUX.1-schnell/text_encoder_2",
        doc=PRETRAINED_DOC,
        file="ref",
    )
    tokenizer: str | None = field(None, doc=TOKENIZER_DOC, file="ref")
    variant: Literal[tuple(T5_PRESETS)] = field(  # type: ignore[valid-type]
        "t5-v1_1-xxl", doc="architecture preset (flan-t5-* share the t5-v1_1-* shapes); builds the structure offline"
    )
    arch: dict = field(factory=dict, doc="overrides of the preset's transformers T5Config fields (e.g. tiny test models)",
                       validator=_known_keys(T5_PRESETS, _t5_arch_problems))
    max_length: int = field(256, doc="tokens per prompt, truncated beyond (FLUX-dev: 512, schnell: 256)", validator=TOKENS)
    mask_padding: bool = field(True, doc="hide padding tokens from T5's attention (False: BFL FLUX, pads to max_length)")
    keep_padding: bool = field(False, doc="return the padding tokens too (every prompt max_length tokens)")
    dtype: Dtype = field("bf16", doc="weights and compute dtype")
    compile: bool = field(True, doc="torch.compile the encoder when it runs on CUDA (never on CPU)")

    @property
    def dim(self) -> int:
        return int({**T5_PRESETS[self.variant], **self.arch}["d_model"])

    @property
    def pooled(self) -> bool:
        return False


@config
class ClipEncoderConfig(_HubTextEncoder):
    """CLIP text encoder (transformers): one pooled vector per prompt for the denoiser's vec input."""

    pretrained: str | None = field(
        "black-forest-labs/FLUX.1-schnell/text_encoder",
        doc=PRETRAINED_DOC,
        file="ref",
    )
    tokenizer: str | None = field(None, doc=TOKENIZER_DOC, file="ref")
    variant: Literal[tuple(CLIP_PRESETS)] = field(  # type: ignore[valid-type]
        "clip-vit-large-patch14", doc="architecture preset of the text tower; builds the structure offline"
    )
    arch: dict = field(factory=dict, doc="overrides of the preset's transformers CLIPTextConfig fields",
                       validator=_known_keys(CLIP_PRESETS, _clip_arch_problems))
    max_length: int = field(77, doc="tokens per prompt, truncated beyond (CLIP's position table: 77)", validator=TOKENS)
    dtype: Dtype = field("bf16", doc="weights and compute dtype")
    compile: bool = field(True, doc="torch.compile the encoder when it runs on CUDA (never on CPU)")

    @property
    def dim(self) -> int:
        return int({**CLIP_PRESETS[self.variant], **self.arch}["hidden_size"])

    @property
    def pooled(self) -> bool:
        return True


@config
class ClassEmbeddingConfig:
    """A fixed table of per-class embeddings addressed by prompt text (ImageNet labels; '' = unconditional)."""

    embeddings: str = field(doc="safetensors file (or Hub reference) holding the (num_rows, dim) table", file="ref")
    labels: str | None = field(
        None, doc="JSON file (or Hub reference) mapping prompt text -> row, '' = unconditional; "
        "None: the 'labels' JSON stored in the safetensors file's metadata",
        file="ref",
    )
    tensor: str = field("embeddings", doc="name of the table inside the safetensors file")
    num_rows: int = field(1001, doc="rows of the table: classes plus the unconditional row (ImageNet: 1000 + 1)",
                          validator=Range(1, 2**24))  # ImageNet-21k: 21,841 classes
    dim: int = field(768, doc="embedding width", validator=WIDTH)
    pooled: bool = field(False, doc="True: one (n, dim) vector per prompt (vec input); False: one token per prompt")
    unknown: Literal["error", "unconditional"] = field(
        "error", doc="what an unknown prompt gets: an error, or the unconditional row"
    )
    dtype: Dtype = field("fp32", doc="dtype of the table")

    @property
    def pretrained_refs(self) -> tuple[str, ...]:
        return tuple(r for r in (self.embeddings, self.labels) if r)


#: A vocabulary word: what the vocab encoder splits a lower-cased prompt into (vocab.tokenize).
VOCAB_WORD = re.compile(r"[a-z0-9]+")
MAX_VOCAB_WORDS = 1 << 20


def _vocab_words(instance, attribute, value) -> None:
    """Words a prompt can hold: ``""``, ``"a b"`` or ``"x-ray"`` never match a token, and an
    empty vocabulary makes every prompt <unk> (the text teaches nothing)."""
    if not value:
        raise RangeError(attribute.name, "an empty vocabulary: every prompt would read as <unk>", own=True)
    if len(value) > MAX_VOCAB_WORDS:
        raise RangeError(attribute.name, f"{len(value):,} words, more than {MAX_VOCAB_WORDS:,}", own=True)
    for i, word in enumerate(value):
        if not VOCAB_WORD.fullmatch(word):
            raise RangeError(f"{attribute.name}[{i}]", f"{word[:80]!r} can never match: prompts are lower-cased and "
                             "split into runs of a-z and 0-9", own=True)
    if len(set(value)) != len(value):
        twice = sorted({w for w in value if value.count(w) > 1})[:5]
        raise RangeError(attribute.name, f"listed twice: {', '.join(map(repr, twice))}", own=True)


@config
class VocabEncoderConfig:
    """Frozen word-vocabulary encoder for the built-in shapes captions: fixed seeded embeddings, no files."""

    dim: int = field(64, doc="embedding width", validator=WIDTH)
    pooled: bool = field(False, doc="True: the mean over a prompt's tokens (n, dim); False: packed per-token")
    words: tuple[str, ...] = field(SHAPES_WORDS, doc="vocabulary: lower-case runs of a-z and 0-9; other words map "
                                   "to <unk>", validator=_vocab_words)
    max_length: int = field(32, doc="tokens per prompt including the closing <eos>", validator=Range(2, MAX_PROMPT_TOKENS))
    seed: int = field(0, doc="seed of the embeddings; each word's row depends only on (seed, word)", validator=SEED)
    dtype: Dtype = field("fp32", doc="dtype of the table")
