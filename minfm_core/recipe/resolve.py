"""Phase two: structure each component table with its registered config class."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from ..config import structure, unstructure
from ..errors import MinfmError, RecipeError
from ..registry import Component, Registry, get_registry
from .load import load_recipe_dict
from .schema import SLOTS, Recipe, Spec


@attrs.frozen
class Resolved:
    """A component slot after resolution: the registered component and its config."""

    path: str
    component: Component
    config: Any

    def build(self, **kwargs: Any) -> Any:
        return self.component.build(self.config, **kwargs)


@attrs.frozen
class ResolvedRecipe:
    recipe: Recipe
    slots: dict[str, Resolved]
    source: str | None = None

    def __getitem__(self, path: str) -> Resolved:
        return self.slots[path]

    def get(self, path: str) -> Resolved | None:
        return self.slots.get(path)

    def config(self, path: str) -> Any:
        slot = self.slots.get(path)
        return None if slot is None else slot.config

    def build(self, path: str, **kwargs: Any) -> Any:
        return self.slots[path].build(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (defaults filled in), ready to write as TOML."""
        data = unstructure(self.recipe)
        for path, slot in self.slots.items():
            table = {"name": slot.component.name, **(unstructure(slot.config) if slot.config is not None else {})}
            _set(data, path, table)
        return _drop_none(data)


def _set(data: dict, path: str, value: Any) -> None:
    keys = path.replace("]", "").replace("[", ".").split(".")
    node: Any = data
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _drop_none(value: Any) -> Any:
    # TOML has no null: an absent key means "default" (None) when read back.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def _get(recipe: Recipe, path: str) -> Any:
    node: Any = recipe
    for key in path.split("."):
        node = getattr(node, key)
    return node


def iter_slots(recipe: Recipe) -> Iterator[tuple[str, str, Spec]]:
    """(path, kind, spec) for every component table present in the recipe."""
    for path, kind in SLOTS.items():
        spec = _get(recipe, path)
        if spec is not None:
            yield path, kind, spec
    for i, spec in enumerate(recipe.logging.loggers):
        yield f"logging.loggers[{i}]", "logger", spec


def resolve_recipe(
    raw: dict[str, Any], source: str | None = None, registry: Registry | None = None, world_size: int | None = None
) -> ResolvedRecipe:
    """Validate a raw recipe dict completely; raise one RecipeError listing every problem."""
    recipe = structure(raw, Recipe, source=source)
    registry = registry or get_registry()
    problems: list[str] = []
    slots: dict[str, Resolved] = {}
    for path, kind, spec in iter_slots(recipe):
        try:
            comp = registry.get(kind, spec.name, path=f"{path}.name")
            cfg = structure(spec.options, comp.config, path=path) if comp.config is not None else None
            if comp.config is None and spec.options:
                raise RecipeError(f"{path}: {kind} {spec.name!r} takes no options, got {', '.join(spec.options)}")
        except RecipeError as exc:
            problems.extend(exc.problems)
            continue
        except MinfmError as exc:
            problems.append(str(exc))
            continue
        slots[path] = Resolved(path, comp, cfg)
    if problems:
        raise RecipeError(problems, source)
    resolved = ResolvedRecipe(recipe, slots, source)
    from .checks import cross_checks

    problems = cross_checks(resolved, world_size=world_size)
    if problems:
        raise RecipeError(problems, source)
    return resolved


def load_recipe(
    path: str | os.PathLike, overrides: Iterable[str] = (), world_size: int | None = None
) -> ResolvedRecipe:
    """Load, merge, override, expand, structure and check a recipe file."""
    return resolve_recipe(load_recipe_dict(path, overrides), source=str(path), world_size=world_size)
