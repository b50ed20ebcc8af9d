"""CLIP text encoder: prompts -> one pooled vector each (FLUX's vec input)."""

from __future__ import annotations

import torch
from torch import Tensor

from .configs import ClipEncoderConfig
from .hf import HFTextEncoder, build_encoder
from .presets import CLIP_PRESETS


class ClipEncoder(HFTextEncoder):
    def count_tokens(self, prompts: list[str]) -> list[int]:
        return [1] * len(prompts)  # one pooled vector each; CLIP truncates, so any prompt goes

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor:
        """``(n, dim)``: the final-layer state at each prompt's end-of-text token."""
        device = self.device
        if not prompts:
            return torch.empty(0, self.dim, device=device)
        # CLIP attends causally, so pads after the end token cannot change the pooled
        # state: padding to the longest prompt gives what padding to 77 gives.
        # no longer than CLIP's position table (a tiny `arch` may have fewer than max_length)
        longest = min(self.cfg.max_length, self.model.config.max_position_embeddings)
        batch = self.tokenizer(list(prompts), truncation=True, max_length=longest, padding="longest",
                               return_tensors="pt")
        out = self.run(input_ids=batch["input_ids"].to(device))
        return out.pooler_output


def build_clip(cfg: ClipEncoderConfig, *, load_weights: bool = True) -> ClipEncoder:
    """Frozen CLIP text tower; ``load_weights=False`` builds the structure only (no file access)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return build_encoder(ClipEncoder, CLIPTextModel, CLIPTextConfig, cfg, {**CLIP_PRESETS[cfg.variant], **cfg.arch},
                         ("hidden_size", "num_hidden_layers", "num_attention_heads"), "clip", load_weights)
