"""minFM core: component registries, plugin hooks, recipes and engines.

The core never imports a plugin; it composes components only through registries.
"""

__version__ = "0.1.0"

from .config import config, field  # noqa: E402
from .errors import MinfmError, RecipeError  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402
from .registry import Component, get_registry  # noqa: E402

__all__ = ["Component", "MinfmError", "RecipeError", "__version__", "config", "field", "get_registry", "hookimpl"]
