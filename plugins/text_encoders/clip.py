"""CLIP text encoder: prompts -> one pooled vector each (FLUX's vec input)."""

from __future__ import annotations

import torch
from torch import Tensor

from .configs import ClipEncoderConfig
from minfm_core.weights import DTYPES

from .hf import HFTextEncoder, build_structure, load_pretrained
from .presets import CLIP_PRESETS


class ClipEncoder(HFTextEncoder):
    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor:
        """``(n, dim)``: the final-layer state at each prompt's end-of-text token."""
        device = self.device
        if not prompts:
            return torch.empty(0, self.dim, device=device)
        # CLIP attends causally, so pads after the end token cannot change the pooled
        # state: padding to the longest prompt gives what padding to 77 gives.
        batch = self.tokenizer(
            list(prompts), truncation=True, max_length=self.cfg.max_length, padding="longest", return_tensors="pt"
        )
        out = self.run(input_ids=batch["input_ids"].to(device))
        return out.pooler_output


def build_clip(cfg: ClipEncoderConfig, *, load_weights: bool = True) -> ClipEncoder:
    """Frozen CLIP text tower; ``load_weights=False`` builds the structure only (no file access)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = {**CLIP_PRESETS[cfg.variant], **cfg.arch}
    dtype = DTYPES[cfg.dtype]
    if load_weights and cfg.pretrained:
        expect = {k: preset[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
        model = load_pretrained(CLIPTextModel, cfg.pretrained, dtype, expect, "clip")
    else:
        model = build_structure(CLIPTextModel, CLIPTextConfig, preset, {})
    enc = ClipEncoder(cfg, model.to(dtype), "clip").eval().requires_grad_(False)
    if load_weights:
        _ = enc.tokenizer  # fail at build time, not at the first batch
    return enc
