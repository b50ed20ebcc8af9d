"""T5 encoder: prompts -> packed per-token embeddings without padding, plus lengths."""

from __future__ import annotations

import torch
from torch import Tensor

from .configs import T5EncoderConfig
from .hf import HFTextEncoder, build_encoder
from .presets import T5_PRESETS


class T5Encoder(HFTextEncoder):
    def count_tokens(self, prompts: list[str]) -> list[int]:
        """The tokenizer's lengths, truncated as ``forward`` truncates (every prompt
        ``max_length`` tokens with ``keep_padding``)."""
        if self.cfg.keep_padding:
            return [self.cfg.max_length] * len(prompts)
        ids = self.tokenizer(list(prompts), truncation=True, max_length=self.cfg.max_length)["input_ids"]
        return [len(x) for x in ids]

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``(tokens (sum of lens, dim), lens (n,))``: padding tokens are never returned
        (unless ``keep_padding``), so the denoiser never attends to them."""
        cfg = self.cfg
        device = self.device
        if not prompts:
            return torch.empty(0, self.dim, device=device), torch.empty(0, dtype=torch.long, device=device)
        # Padding to max_length is only needed when pads are visible (BFL-style); with
        # masking, a real token's output does not depend on how many pads follow it.
        full = cfg.keep_padding or not cfg.mask_padding
        batch = self.tokenizer(
            list(prompts), truncation=True, max_length=cfg.max_length,
            padding="max_length" if full else "longest", return_tensors="pt",
        )
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        hidden = self.run(input_ids=ids, attention_mask=mask if cfg.mask_padding else torch.ones_like(mask))
        hidden = hidden.last_hidden_state  # (n, l, dim)
        keep = torch.ones_like(mask, dtype=torch.bool) if cfg.keep_padding else mask.bool()
        return hidden[keep], keep.sum(dim=1)


def build_t5(cfg: T5EncoderConfig, *, load_weights: bool = True) -> T5Encoder:
    """Frozen T5 encoder; ``load_weights=False`` builds the structure only (no file access)."""
    from transformers import T5Config, T5EncoderModel

    return build_encoder(T5Encoder, T5EncoderModel, T5Config, cfg, {**T5_PRESETS[cfg.variant], **cfg.arch},
                         ("d_model", "num_layers", "num_heads", "d_ff"), "t5", load_weights)
