"""A small frozen word-vocabulary encoder for the built-in ``shapes`` captions.

Lower-cased words (runs of letters and digits) look up fixed embeddings; unknown words
share an ``<unk>`` row; every prompt ends with an ``<eos>`` token, so the empty prompt is
one token (the unconditional input) and no sequence is empty. Each row is drawn from its
own generator seeded by (seed, CRC-32 of the word): the same on every process and
machine, and adding a word never changes another word's row.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor, nn

from minfm_core.packing import segment_mean
from minfm_core.weights import DTYPES

from .configs import VOCAB_WORD, VocabEncoderConfig

EOS, UNK = "<eos>", "<unk>"


def tokenize(prompt: str) -> list[str]:
    return VOCAB_WORD.findall(prompt.lower())


def word_embedding(word: str, dim: int, seed: int) -> Tensor:
    """The fixed row of ``word``: Gaussian, scaled to unit RMS."""
    g = torch.Generator(device="cpu").manual_seed((seed * 0x9E3779B1 + zlib.crc32(word.encode())) % 2**63)
    v = torch.randn(dim, generator=g, device="cpu", dtype=torch.float64)
    return (v * math.sqrt(dim) / v.norm()).float()


class VocabEncoder(nn.Module):
    def __init__(self, cfg: VocabEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.pooled = cfg.pooled
        self.vocab = [EOS, UNK, *dict.fromkeys(w.lower() for w in cfg.words)]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        # fill() writes every row: nn.Embedding's own random init would be wasted work (and
        # normal_ on the meta device imports torch._dynamo, 2 s of every `minfm check`)
        self.table = nn.Embedding(len(self.vocab), cfg.dim, _weight=torch.empty(len(self.vocab), cfg.dim))

    def fill(self) -> None:
        rows = torch.stack([word_embedding(w, self.cfg.dim, self.cfg.seed) for w in self.vocab])
        with torch.no_grad():
            self.table.weight.copy_(rows.to(self.table.weight.dtype))

    def ids(self, prompt: str) -> list[int]:
        words = tokenize(prompt)[: self.cfg.max_length - 1]
        return [self.index.get(w, self.index[UNK]) for w in words] + [self.index[EOS]]

    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [1 if self.pooled else len(self.ids(p)) for p in prompts]

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor | tuple[Tensor, Tensor]:
        """Per-token: ``(tokens (sum of lens, dim), lens (n,))``; pooled: the per-prompt mean ``(n, dim)``."""
        w = self.table.weight
        seqs = [self.ids(p) for p in prompts]
        lens = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=w.device)
        flat = torch.tensor([i for s in seqs for i in s], dtype=torch.long, device=w.device)
        tokens = w[flat]
        if self.pooled:
            return segment_mean(tokens, lens)
        return tokens, lens


def build_vocab(cfg: VocabEncoderConfig, *, load_weights: bool = True) -> VocabEncoder:
    enc = VocabEncoder(cfg)
    if enc.table.weight.device.type != "meta":  # the table needs no file: fill it whenever it has storage
        enc.fill()
    return enc.to(DTYPES[cfg.dtype]).eval().requires_grad_(False)
