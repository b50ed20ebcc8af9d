"""The process-wide registry: one per component kind, filled by plugins through the hooks.

The data types (:class:`Component`, :class:`Registry`, :class:`Resolved`, :data:`KINDS`,
:data:`FACTORY_KWARGS`) live in :mod:`minfm_core.components` and are re-exported here;
this module only adds the shared instance. It imports :mod:`minfm_core.plugins`, never the
other way round, and keeps no state of its own: the loaded plugins are the state.
"""

from __future__ import annotations

from . import plugins
from .components import FACTORY_KWARGS, KINDS, Component, Registry, Resolved

__all__ = ["FACTORY_KWARGS", "KINDS", "Component", "Registry", "Resolved", "get_registry", "reset_registry"]


def get_registry() -> Registry:
    """The process-wide registry, filled from all plugins on first use."""
    return plugins.load_plugins().registry


def reset_registry() -> None:
    """Forget the loaded plugins (tests use this after installing a plugin)."""
    plugins.reset()
