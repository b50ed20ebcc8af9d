"""A fixed table of per-class embeddings addressed by prompt text (the seed's ImageNet setup).

One safetensors file holds the table ``(num_rows, dim)`` and, in its metadata under
``labels``, a JSON object ``{prompt: row}`` that maps the empty prompt ``""`` to the
unconditional row (a separate JSON file may be given instead). :func:`save_class_table`
writes it, e.g. from CLIP embeddings of the class names. Never pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from minfm_core.errors import MinfmError
from minfm_core.jsonio import parse_json, read_json_file
from minfm_core.pretrained import resolve_pretrained
from minfm_core.weights import DTYPES

from .configs import ClassEmbeddingConfig

UNCONDITIONAL = ""
LABELS_KEY = "labels"
#: A labels file maps prompts to rows (21,841 ImageNet-21k classes: ~1 MB); it may come with a download.
MAX_LABELS_BYTES = 64 << 20


def save_class_table(table: Tensor, labels: Mapping[str, int], path: str | Path, tensor: str = "embeddings") -> None:
    """Write a class-embedding table with its prompt -> row map (``""`` must name a row) in the metadata."""
    from minfm_core.weights import save_safetensors_file

    if UNCONDITIONAL not in labels:
        raise MinfmError("a class table needs a row for the empty prompt '' (the unconditional row)")
    meta = {LABELS_KEY: json.dumps(dict(labels), ensure_ascii=False, sort_keys=True)}
    save_safetensors_file({tensor: table.detach().cpu().contiguous()}, path, metadata=meta)


class ClassEmbedding(nn.Module):
    def __init__(self, cfg: ClassEmbeddingConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim
        self.pooled = cfg.pooled
        rows = torch.empty(cfg.num_rows, cfg.dim)
        if rows.device.type != "meta":  # nn.Embedding's own init; on meta (minfm check) normal_
            nn.init.normal_(rows)  # imports torch._dynamo: 2 s for values no one reads
        self.table = nn.Embedding(cfg.num_rows, cfg.dim, _weight=rows)
        self.rows: dict[str, int] = {}

    def load(self) -> None:
        from minfm_core.weights import open_safetensors

        cfg = self.cfg
        path = resolve_pretrained(cfg.embeddings)
        with open_safetensors(path) as f:  # may come with a downloaded model: bounded, checked
            if cfg.tensor not in f.keys():
                raise MinfmError(f"class_embedding: {cfg.embeddings} has no tensor {cfg.tensor!r}; it has {', '.join(f.keys())}")
            table = f.get_tensor(cfg.tensor)
            meta = f.metadata() or {}
        if tuple(table.shape) != (cfg.num_rows, cfg.dim):
            raise MinfmError(
                f"class_embedding: table {cfg.embeddings} is {tuple(table.shape)}, the config says "
                f"num_rows = {cfg.num_rows}, dim = {cfg.dim}"
            )
        if cfg.labels:
            where = cfg.labels
            rows = read_json_file(resolve_pretrained(cfg.labels), f"class_embedding: labels in {where}", MAX_LABELS_BYTES)
        elif LABELS_KEY in meta:
            where = f"{cfg.embeddings} (metadata)"
            rows = parse_json(meta[LABELS_KEY], f"class_embedding: labels in {where}")
        else:
            raise MinfmError(f"class_embedding: {cfg.embeddings} has no '{LABELS_KEY}' metadata; set labels to a JSON file")
        if not isinstance(rows, dict) or not all(type(v) is int and 0 <= v < cfg.num_rows for v in rows.values()):
            raise MinfmError(f"class_embedding: labels in {where} must be a JSON object of prompt -> row in [0, {cfg.num_rows})")
        if UNCONDITIONAL not in rows:
            raise MinfmError(f"class_embedding: labels in {where} have no row for the empty prompt '' (unconditional)")
        with torch.no_grad():
            self.table.weight.copy_(table.to(self.table.weight.dtype))
        self.rows = {str(k).strip(): v for k, v in rows.items()}

    def indices(self, prompts: list[str]) -> list[int]:
        out = []
        for p in prompts:
            row = self.rows.get(p.strip())
            if row is None:
                if self.cfg.unknown == "error":
                    raise MinfmError(f"class_embedding: unknown prompt {p!r} (not a class of {self.cfg.embeddings})")
                row = self.rows[UNCONDITIONAL]
            out.append(row)
        return out

    def count_tokens(self, prompts: list[str]) -> list[int]:
        """One token (or vector) per prompt; an unknown class is refused here, before any work,
        when ``unknown = "error"`` (a meta build has no labels yet and checks nothing)."""
        if self.rows:
            self.indices(list(prompts))
        return [1] * len(prompts)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Tensor | tuple[Tensor, Tensor]:
        """Pooled: ``(n, dim)``; otherwise one token per prompt: ``(n, dim), lens = ones(n)``."""
        w = self.table.weight
        emb = w[torch.tensor(self.indices(list(prompts)), dtype=torch.long, device=w.device)]
        if self.pooled:
            return emb
        return emb, torch.ones(len(prompts), dtype=torch.long, device=w.device)


def build_class_embedding(cfg: ClassEmbeddingConfig, *, load_weights: bool = True) -> ClassEmbedding:
    enc = ClassEmbedding(cfg)
    if load_weights:
        enc.load()
    return enc.to(DTYPES[cfg.dtype]).eval().requires_grad_(False)
