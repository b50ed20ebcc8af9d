"""Component summary with exact parameter counts, built on the meta device (no weights read)."""

from __future__ import annotations

from typing import Any

from .errors import PluginError

#: Slots whose components are torch modules; their factories take ``load_weights``.
MODEL_SLOTS = ("model.denoiser", "model.vae", "model.text_encoder", "model.clip_encoder")


def count_parameters(module: Any) -> tuple[int, int]:
    """(total, trainable) parameter counts of a module (0 for a component that is not one)."""
    import torch

    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return total, trainable


def meta_parameter_counts(resolved) -> dict[str, tuple[int, int] | str]:
    """Build each model slot on the meta device and count its parameters."""
    import torch

    counts: dict[str, tuple[int, int] | str] = {}
    for path in MODEL_SLOTS:
        slot = resolved.get(path)
        if slot is None:
            continue
        try:
            with torch.device("meta"):
                module = slot.build(load_weights=False)
            counts[path] = count_parameters(module)
        except PluginError:  # the plugin breaks the contract (a member missing): run would stop on it
            raise
        except Exception as exc:  # a summary must not hide the rest of the check
            counts[path] = f"not built on meta: {type(exc).__name__}: {exc}"
    return counts


def human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def summary_table(resolved, counts: dict[str, Any]) -> str:
    rows = [("slot", "kind", "component", "plugin", "parameters")]
    for path, slot in resolved.slots.items():
        c = counts.get(path)
        params = "" if c is None else (c if isinstance(c, str) else f"{c[0]:,} ({human(c[0])})")
        rows.append((path, slot.component.kind, slot.component.name, slot.component.plugin, params))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(r[j].ljust(widths[j]) for j in range(4)) + "  " + r[4])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 10)
    return "\n".join(lines)
