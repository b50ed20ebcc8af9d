"""Tiny tokenizers and encoder configs built locally for the encoder tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

WORDS = ("a", "an", "the", "red", "blue", "green", "yellow", "small", "large", "circle", "square", "triangle",
         "on", "background", "photo", "of", "cat", "dog")

T5_ARCH = dict(d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2, vocab_size=64)


def _word_level(vocab: dict[str, int], unk: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def t5_tokenizer(folder: Path) -> Path:
    """A T5-like tokenizer: <pad>=0, </s>=1 appended to every prompt, <unk>=2."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = _word_level(vocab, "<unk>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


CLIP_BOS, CLIP_EOS = len(WORDS) + 1, len(WORDS) + 2
CLIP_ARCH = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
                 max_position_embeddings=16, projection_dim=32, bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS,
                 pad_token_id=CLIP_EOS)


def clip_tokenizer(folder: Path) -> Path:
    """A CLIP-like tokenizer: <|startoftext|> prompt <|endoftext|>, padded with <|endoftext|>."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}, "<|startoftext|>": CLIP_BOS,
             "<|endoftext|>": CLIP_EOS}
    tok = _word_level(vocab, "<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", CLIP_BOS), ("<|endoftext|>", CLIP_EOS)],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder
