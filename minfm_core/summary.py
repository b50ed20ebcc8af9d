"""What ``minfm check`` builds, and its summary: exact parameter counts, built on the meta device
(no weights read)."""

from __future__ import annotations

import contextlib
from typing import Any

from .components import at_path
from .errors import MinfmError, RecipeError, first_line
from .protocols import CHECK_BUILDS


def count_parameters(module: Any) -> tuple[int, int]:
    """(total, trainable) parameter counts of a module (0 for a component that is not one)."""
    import torch

    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return total, trainable


def check_builds(resolved) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Build what ``minfm check`` builds (``protocols.CHECK_BUILDS``: the model slots on the meta
    device with ``load_weights=False``, the cheap kinds as the engine builds them): the
    parameter counts of the model slots, and the problems, each naming its recipe path.

    A factory's ``MinfmError`` (a value its config cannot check alone, a missing file) is the
    user's to fix: a check problem, as the run would stop on it. Anything else it raises is a
    bug of its plugin: also a problem, naming the component and the plugin (the run stops on
    it too, with its traceback, except where only the meta build fails: that one is the
    contract's, not the run's). A slot whose factory does not import or bind is skipped
    here: ``job_checks`` reports that already.
    """
    import torch

    counts: dict[str, tuple[int, int]] = {}
    problems: list[str] = []
    encoders: dict[str, Any] = {}
    for path, slot in resolved.slots.items():
        comp = slot.component
        how = CHECK_BUILDS.get(comp.kind)
        if how is None or comp.factory_problem() is not None:
            continue
        try:
            if how == "meta":
                with torch.device("meta"):
                    built = slot.build(load_weights=False)
                counts[path] = count_parameters(built)
                if comp.kind == "text_encoder":
                    encoders[path] = built
            else:
                slot.build()
        except MinfmError as exc:
            lines = exc.problems if isinstance(exc, RecipeError) else [str(exc)]
            # a line naming its own place under the slot (flow.time_sampler.a: ...) keeps it
            problems.extend(at_path(path, line) for line in lines)
        except Exception as exc:
            # The run builds model slots on their device: there, only the contract says that
            # a meta build must work (the parameter counts, a sharded start are built so)
            why = ("its kind must build on the meta device with load_weights=False, docs/plugins.md"
                   if how == "meta" else "minfm run stops on it too, with its traceback")
            built = " on the meta device" if how == "meta" else ""
            problems.append(f"{path}: the factory of {comp.describe()} raised {type(exc).__name__}: "
                            f"{first_line(exc, 200)} when built{built} (a bug in plugin {comp.plugin!r}; {why})")
    return counts, problems + _prompt_problems(resolved, encoders)


def _prompt_problems(resolved, encoders: dict[str, Any]) -> list[str]:
    """The job's prompts counted by the text encoders just built (``TextEncoder.count_tokens``
    works on a meta build): one an encoder refuses (a class table's unknown class) fails the
    check as it fails the run before its first step.

    Nothing is downloaded for it (``minfm check`` comes before ``minfm cache models``): the
    Hub is offline meanwhile, and an encoder that cannot count even an empty prompt (its
    tokenizer not fetched yet) is not asked. A prompt file that does not read is reported by
    the job's own checks; the recipe's other prompts are still counted."""
    import attrs

    from .engine.pipeline import counted_tokens
    from .engine.prompts import job_prompts

    if not encoders:
        return []
    recipe = resolved.recipe
    try:
        asked = job_prompts(recipe, recipe.job)
    except MinfmError:
        asked = job_prompts(attrs.evolve(recipe, sample=attrs.evolve(recipe.sample, prompt_file=None)), recipe.job)
    problems = []
    probe = next((p for _, prompts in asked for p in prompts if p), None)  # a prompt the job encodes
    with _hub_offline():
        for path, enc in encoders.items():
            try:
                enc.count_tokens([""])
            except Exception as exc:
                # it counts the job's own prompt, but refuses the one the engine must also send
                if probe is not None and _counts(enc, probe):
                    problems.append(f"{resolved.who(path)}: count_tokens(['']): refuses the empty prompt, which the "
                                    f"engine encodes (a dropped caption, the unconditional branch of guidance): "
                                    f"{first_line(exc, 200)}")
                continue  # else what it needs to count is not here yet: the run asks it at its start
            for what, prompts in asked:
                try:
                    counted_tokens(enc, resolved.who(path), prompts, what)
                except MinfmError as exc:
                    problems.append(str(exc))
    return problems


def _counts(enc: Any, prompt: str) -> bool:
    try:
        enc.count_tokens([prompt])
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _hub_offline():
    """``HF_HUB_OFFLINE=1`` inside (minfm_core.pretrained reads it when it resolves a file)."""
    import os

    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


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
