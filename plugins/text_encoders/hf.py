"""Shared by the transformers-backed encoders (T5, CLIP): structure, weights, tokenizer, compile."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minfm_core.errors import MinfmError, first_line
from minfm_core.pretrained import resolve_pretrained
from minfm_core.weights import DTYPES, LIBRARY_LOAD_ERRORS, check_weights_folder, pretrained_meta_model


def build_encoder(enc_cls: Any, model_cls: Any, config_cls: Any, cfg, preset: dict, checked: tuple[str, ...],
                  what: str, load_weights: bool) -> nn.Module:
    """A frozen transformers-backed encoder: ``cfg.pretrained`` weights (their config checked
    on ``checked`` against ``preset``), or the structure only (random, or meta tensors under
    ``torch.device('meta')``) when ``load_weights`` is False or nothing is pretrained."""
    dtype = DTYPES[cfg.dtype]
    if load_weights and cfg.pretrained:
        model = load_pretrained(model_cls, cfg.pretrained, dtype, {k: preset[k] for k in checked}, what)
    else:
        model = model_cls(config_cls(**preset))
    enc = enc_cls(cfg, model.to(dtype), what).eval().requires_grad_(False)
    if load_weights:
        _ = enc.tokenizer  # fail at build time, not at the first batch
    return enc


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    import transformers
    from packaging.version import Version

    # transformers 4.56 renamed `torch_dtype` to `dtype`.
    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


def load_pretrained(model_cls: Any, ref: str, dtype: torch.dtype, expect: dict[str, Any], what: str) -> nn.Module:
    """Load safetensors weights from a folder or Hub reference and check the architecture."""
    folder = resolve_pretrained(ref)
    if not folder.is_dir() or not (folder / "config.json").exists():
        raise MinfmError(f"{what}: {ref} ({folder}) is not a model folder with config.json")
    if not any(folder.glob("*.safetensors")):
        raise MinfmError(f"{what}: {ref} has no .safetensors weights (minFM never reads pickled weights)")
    check_weights_folder(folder)  # shard names and links stay inside, headers bounded: before transformers reads
    # The folder's config.json decides the model transformers builds: checked against the
    # recipe and against the weights' size on the meta device first (it is from outside).
    meta = pretrained_meta_model(lambda: model_cls(model_cls.config_class.from_pretrained(str(folder))),
                                 folder, f"{what}: {ref}")
    bad = [f"{k} = {getattr(meta.config, k, None)!r} (the config says {v!r})"
           for k, v in expect.items() if getattr(meta.config, k, None) != v]
    if bad:
        raise MinfmError(f"{what}: {ref} has {', '.join(bad)}; pick the matching variant or set arch")
    try:
        return model_cls.from_pretrained(str(folder), use_safetensors=True, **_dtype_kwarg(dtype))
    except LIBRARY_LOAD_ERRORS as exc:  # weights that do not fit their own config.json
        raise MinfmError(f"{what}: {ref} ({folder}) does not load: {first_line(exc, 300)}") from None


def load_tokenizer(ref: str, what: str) -> Any:
    from transformers import AutoTokenizer

    folder = resolve_pretrained(ref)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise MinfmError(f"{what}: no usable tokenizer in {ref} ({folder}): {first_line(exc, 200)}") from None


class HFTextEncoder(nn.Module):
    """Holds a frozen transformers encoder and its (lazily loaded) tokenizer."""

    def __init__(self, cfg: Any, model: nn.Module, what: str):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.dim = cfg.dim
        self.pooled = cfg.pooled
        self._what = what
        self._tokenizer: Any = None
        self.__dict__["_compiled"] = None  # not a submodule: keeps state_dict names plain

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            ref = self.cfg.tokenizer_ref
            if not ref:
                raise MinfmError(f"{self._what}: no tokenizer (set tokenizer or pretrained)")
            tokenizer = load_tokenizer(ref, self._what)
            # A token id past the embedding table is an IndexError deep inside the first batch
            # (or, on CUDA, a device assert): refuse the pair at build time instead.
            vocab = getattr(self.model.config, "vocab_size", None)
            if isinstance(vocab, int) and len(tokenizer) > vocab:
                raise MinfmError(f"{self._what}: the tokenizer in {ref} has {len(tokenizer)} tokens but the encoder's "
                                 f"vocab_size is {vocab}; raise arch.vocab_size or use the encoder's own tokenizer")
            self._tokenizer = tokenizer
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def run(self, **inputs: Any) -> Any:
        """Call the encoder, compiled on first use when on CUDA and ``compile`` is set."""
        if self.cfg.compile and self.device.type == "cuda":
            if self.__dict__["_compiled"] is None:
                self.__dict__["_compiled"] = torch.compile(self.model)
            return self.__dict__["_compiled"](**inputs)
        return self.model(**inputs)
