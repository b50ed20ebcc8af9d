"""TOML recipes: loading (extends, --set, ${VAR}), schema, and component resolution."""

from .load import load_recipe_dict
from .resolve import ResolvedRecipe, load_recipe, resolve_recipe
from .schema import Recipe, Spec

__all__ = ["Recipe", "ResolvedRecipe", "Spec", "load_recipe", "load_recipe_dict", "resolve_recipe"]
