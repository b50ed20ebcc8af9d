"""Loading plugins: entry points in group ``minfm``, with a checkout fallback.

Built-in plugins are listed in ``pyproject.toml`` under ``[project.entry-points.minfm]``
exactly like a third party's. When minFM runs from a checkout that was never
installed, that same table is read and the folders are mapped to their import names,
so there is one list of built-ins, not two.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import KINDS, Registry
from .suggest import did_you_mean

GROUP = "minfm"
DISABLE_ENV = "MINFM_DISABLE_PLUGINS"
_ROOT = Path(__file__).resolve().parent.parent
#: Import name -> folder, for running from a checkout (mirrors pyproject's package-dir).
_CHECKOUT_PACKAGES = {"minfm_plugins": "plugins", "minfm_hub": "hub", "minfm_apps": "apps"}


@attrs.define
class PluginState:
    pm: pluggy.PluginManager
    failures: dict[str, str] = attrs.field(factory=dict)
    origins: dict[str, str] = attrs.field(factory=dict)  # plugin name -> module or distribution
    registry: Registry = attrs.field(factory=Registry)


_STATE: PluginState | None = None


def disabled_plugins() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Maps ``minfm_plugins`` -> ``<checkout>/plugins`` (etc.) for uninstalled checkouts."""

    def find_spec(self, fullname, path=None, target=None):
        top, _, rest = fullname.partition(".")
        if top not in _CHECKOUT_PACKAGES or rest:
            return None  # submodules resolve through the package's __path__
        folder = _ROOT / _CHECKOUT_PACKAGES[top]
        init = folder / "__init__.py"
        if not init.exists():
            return None
        return importlib.util.spec_from_file_location(top, init, submodule_search_locations=[str(folder)])


def _checkout_entry_points() -> list[tuple[str, str]]:
    """``(name, module)`` pairs from the checkout's pyproject.toml, if minFM is not installed."""
    try:
        importlib.metadata.distribution("minfm")
        return []
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = _ROOT / "pyproject.toml"
    if not pyproject.exists():
        return []
    from .recipe.toml import tomllib

    table = tomllib.loads(pyproject.read_text())["project"].get("entry-points", {}).get(GROUP, {})
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFinder())  # last: an installed copy always wins
    return list(table.items())


def _entry_points() -> list[tuple[str, str, Any]]:
    eps = importlib.metadata.entry_points(group=GROUP)
    found = [(ep.name, ep.value, ep.load) for ep in eps]
    seen = {name for name, _, _ in found}
    for name, module in _checkout_entry_points():
        if name not in seen:
            found.append((name, module, lambda m=module: importlib.import_module(m)))
    return sorted(found, key=lambda t: t[0])


def _warn(msg: str) -> None:
    print(f"minfm: warning: {msg}", file=sys.stderr)


def _unknown_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    known = {n for n in dir(hookspecs) if n.startswith(("register_", "check_"))}
    bad = []
    for hook in pm.get_hookcallers(plugin) or []:
        if hook.name not in known:
            bad.append(f"unknown hook {hook.name!r}{did_you_mean(hook.name, known)}")
    return bad


def _register(state: PluginState, name: str, obj: Any, origin: str) -> None:
    pm = state.pm
    pm.register(obj, name=name)
    bad = _unknown_hooks(pm, obj)
    if bad:
        pm.unregister(obj)
        state.failures[name] = "; ".join(bad)
        _warn(f"plugin {name!r} skipped: {'; '.join(bad)}")
        return
    state.origins[name] = origin


def _fill(state: PluginState) -> None:
    reg = Registry()
    for kind, hook_name in KINDS.items():
        for impl in getattr(state.pm.hook, hook_name).get_hookimpls():
            impl.function(register=reg.registrar(kind, impl.plugin_name))
    state.registry = reg


def load_plugins() -> PluginState:
    """Load every plugin once per process; failures are reported and skipped."""
    global _STATE
    if _STATE is not None:
        return _STATE
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    state = PluginState(pm=pm)
    blocked = disabled_plugins()
    for name, value, load in _entry_points():
        if name in blocked:
            pm.set_blocked(name)
            continue
        if pm.has_plugin(name):
            raise PluginError(f"two plugins are named {name!r} in entry-point group {GROUP!r}")
        try:
            obj = load()
        except Exception as exc:  # a broken plugin must not take the others down
            state.failures[name] = f"{type(exc).__name__}: {exc}"
            _warn(f"plugin {name!r} ({value}) failed to import and was skipped: {type(exc).__name__}: {exc}")
            continue
        _register(state, name, obj, value)
    pm.check_pending()
    _fill(state)
    _STATE = state
    return state


@contextlib.contextmanager
def plugin(obj: Any, name: str) -> Iterator[PluginState]:
    """Register a plugin object for the duration of a ``with`` block (tests, notebooks)."""
    from . import registry as registry_mod

    state = load_plugins()
    _register(state, name, obj, f"<object {name}>")
    try:
        _fill(state)
        registry_mod._REGISTRY = state.registry
        yield state
    finally:
        if state.pm.is_registered(obj):
            state.pm.unregister(obj)
        state.origins.pop(name, None)
        state.failures.pop(name, None)
        _fill(state)
        registry_mod._REGISTRY = state.registry

