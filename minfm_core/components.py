"""Components and registries as plain data: what a plugin registers, and how it is called.

A component is a name, a factory and an attrs config class. Factories may be given
as ``"module:attribute"`` strings so that registering stays cheap: heavy modules
(torch, transformers) are imported only when a component is built.

This module knows nothing of plugin loading (``minfm_core.plugins`` fills registries,
``minfm_core.registry`` is the process-wide one), so the import graph has one direction.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from collections.abc import Callable
from typing import Any

import attrs

from . import protocols
from .config import config_problems
from .errors import MinfmError, PluginError, UnknownComponentError
from .suggest import did_you_mean

#: Component kind -> the hook that registers it (contract: documented in docs/plugins.md).
KINDS: dict[str, str] = {
    "denoiser": "register_denoisers",
    "vae": "register_vaes",
    "text_encoder": "register_text_encoders",
    "patchifier": "register_patchifiers",
    "path": "register_paths",
    "time_sampler": "register_time_samplers",
    "time_warper": "register_time_warpers",
    "time_weighter": "register_time_weighters",
    "sampler": "register_samplers",
    "guidance": "register_guidances",
    "attention": "register_attention_backends",
    "balancer": "register_balancers",
    "parallelizer": "register_parallelizers",
    "dataset": "register_datasets",
    "logger": "register_loggers",
    "source": "register_sources",
    "metric": "register_metrics",
}

#: What a component may be named (it is written in recipes and on command lines).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")

#: Kind -> every keyword the engine may pass its factory (name -> default), declared with the
#: protocols. The one table: ``Component.build`` refuses any other keyword, and ``minfm check``
#: binds each factory a recipe uses against it, so check and run cannot drift apart.
FACTORY_KWARGS = protocols.FACTORY_KWARGS


def _load_declared(ref: str) -> Any:
    """A lazily declared factory, ``"package.module:attr"``, loaded the way an entry point is
    (the one mechanism by which the core reaches plugin code: what a plugin declared)."""
    return importlib.metadata.EntryPoint(name="factory", value=ref, group="minfm").load()


@attrs.frozen
class Component:
    kind: str
    name: str
    factory: Callable[..., Any] | str
    config: type | None
    plugin: str
    doc: str = ""

    def describe(self) -> str:
        return f"{self.kind} {self.name!r} of plugin {self.plugin!r}"

    def load_factory(self) -> Callable[..., Any]:
        """The factory, imported if lazy; a factory that does not import is the plugin's error."""
        if not isinstance(self.factory, str):
            return self.factory
        try:
            return _load_declared(self.factory)
        except Exception as exc:  # ImportError, AttributeError, or whatever the module raises
            raise PluginError(
                f"{self.describe()}: factory {self.factory!r} does not import: {type(exc).__name__}: {exc}"
            ) from None

    def factory_problem(self) -> str | None:
        """Why the factory cannot be called the way the engine calls it, or None.

        Imports a lazy factory and checks its signature against the config and every
        keyword of :data:`FACTORY_KWARGS` for the kind (all of them: the engine may pass each).
        """
        try:
            factory = self.load_factory()
        except PluginError as exc:
            return str(exc)
        problems = protocols.factory_problems(self.kind, factory, self.config is not None)
        if not problems:
            return None
        try:
            signature = str(inspect.signature(factory))
        except (TypeError, ValueError):
            signature = "(...)"
        return f"{self.describe()}: factory {_name(factory)}{signature} {'; '.join(problems)}"

    def build(self, cfg: Any = None, **kwargs: Any) -> Any:
        """Call the factory with a config instance (the default config if None)."""
        unknown = sorted(set(kwargs) - set(FACTORY_KWARGS[self.kind]))
        if unknown:  # the engine passed a keyword the contract does not declare: a core bug
            raise TypeError(f"{self.kind} factories take no keyword {', '.join(unknown)}; see FACTORY_KWARGS")
        if self.config is not None and cfg is None:
            cfg = self.config()
        factory = self.load_factory()
        try:
            built = factory(cfg, **kwargs) if self.config is not None else factory(**kwargs)
        except TypeError:
            # A factory that cannot take what the engine passes is the plugin's error, said in
            # one line as `minfm check` says it; any other TypeError stays a bug with its traceback.
            problem = self.factory_problem()
            if problem is None:
                raise
            raise PluginError(problem) from None
        except MinfmError:
            raise
        except Exception as exc:  # a bug: its traceback stays, and now says whose factory it was
            exc.add_note(f"(raised by the factory of {self.describe()})")
            raise
        # The engine calls every member, optional ones too: one missing is the plugin's error,
        # said here by name, not as an AttributeError deep in a training step.
        lacks = protocols.lacking(self.kind, built)
        if lacks:
            raise PluginError(f"{self.describe()}: built {type(built).__name__} {lacks}")
        return built


def _name(factory: Any) -> str:
    return getattr(factory, "__qualname__", None) or type(factory).__name__


class Registry:
    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        self._dropped: dict[tuple[str, str], str] = {}  # (kind, name) -> the skipped plugin that had it

    def add(self, component: Component) -> None:
        self.check_new(component)
        self._by_kind[component.kind][component.name] = component

    def check_new(self, component: Component) -> None:
        """Raise the PluginError :meth:`add` would raise for ``component``."""
        kind, name = component.kind, component.name
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise PluginError(f"{kind} name {name!r}: expected 1-64 letters, digits, '_', '-', '.' or '+', "
                              "starting with a letter or digit")
        factory = component.factory
        if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
            raise PluginError(f"{kind} {name!r}: the factory must be callable or a 'module:attribute' string, "
                              f"not {type(factory).__name__}")
        old = self._by_kind[kind].get(name)
        if old is not None:
            if old.plugin == component.plugin:
                raise PluginError(f"{kind} {name!r} is registered twice by plugin {old.plugin!r}")
            raise PluginError(
                f"{kind} {name!r} is registered by both plugin {old.plugin!r} "
                f"and plugin {component.plugin!r}; disable one with MINFM_DISABLE_PLUGINS"
            )
        # (Its defaults are not tried here: many are valid only in a recipe, e.g. flux's
        # fields that a flavor fills, or a mix naming datasets of other plugins.)
        if component.config is not None:
            problems = config_problems(component.config)
            if problems:
                raise PluginError(f"config of {kind} {name!r}: {'; '.join(problems)}")

    def drop_plugin(self, plugin: str) -> None:
        """Forget every component of ``plugin`` (a plugin skipped after it joined the registry)."""
        for table in self._by_kind.values():
            for name in [n for n, c in table.items() if c.plugin == plugin]:
                self.note_skipped(table.pop(name))

    def note_skipped(self, component: Component) -> None:
        """``component``'s plugin was skipped: :meth:`get` says so rather than "unknown"."""
        if self._by_kind.get(component.kind, {}).get(component.name) is None:
            self._dropped[(component.kind, component.name)] = component.plugin

    def registrar(self, kind: str, plugin: str) -> Callable[..., None]:
        """The ``register`` callback handed to one plugin's hook for one kind."""

        def register(name: str, factory: Callable[..., Any] | str, config: type | None = None, doc: str | None = None):
            self.add(component(kind, name, factory, config, plugin, doc))

        return register

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def components(self, kind: str) -> list[Component]:
        return [self._by_kind[kind][n] for n in self.names(kind)]

    def all_components(self) -> list[Component]:
        return [c for kind in KINDS for c in self.components(kind)]

    def get(self, kind: str, name: str, path: str | None = None) -> Component:
        table = self._by_kind[kind]
        if name in table:
            return table[name]
        where = f"{path}: " if path else ""
        skipped = self._dropped.get((kind, name))
        if skipped is not None:  # not a typo: its plugin failed (the reason is in `minfm plugins`)
            raise UnknownComponentError(f"{where}{kind} {name!r} belongs to plugin {skipped!r}, which was skipped "
                                        "(minfm plugins says why)")
        installed = ", ".join(self.names(kind)) or "(none)"
        raise UnknownComponentError(
            f"{where}unknown {kind} {name!r}{did_you_mean(name, table)}; installed: {installed}"
        )


def component(kind: str, name: str, factory: Any, config: type | None, plugin: str, doc: str | None) -> Component:
    """A Component from ``register(...)``'s arguments (doc: the config's first docstring line)."""
    if doc is None:
        doc = (config.__doc__ or "").strip().splitlines()[0] if config is not None and config.__doc__ else ""
    return Component(kind, name, factory, config, plugin, doc or "")
