"""TOML recipes: loading (extends, --set, ${VAR}), schema, and component resolution.

``load_recipe(path, overrides, untrusted_root=FOLDER)`` reads a recipe that came from
outside (a Hub repo, a checkpoint) as data: no ${VAR} expansion, and its ``extends`` and
file references stay inside FOLDER.
"""

from .load import load_recipe_dict
from .resolve import ONE_PROCESS, ResolvedRecipe, load_recipe, resolve_recipe
from .schema import Recipe, Spec

__all__ = ["ONE_PROCESS", "Recipe", "ResolvedRecipe", "Spec", "load_recipe", "load_recipe_dict", "resolve_recipe"]
