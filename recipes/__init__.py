"""The recipes shipped with minFM, installed as the package ``minfm_recipes``.

Recipes name them ``minfm:NAME.toml`` (``extends = "minfm:quickstart.toml"``,
``minfm run minfm:quickstart.toml``); see ``minfm_core.recipe.load.shipped_recipes``.
This folder holds data only.
"""
