"""One registry per component kind, filled by plugins through the hooks.

A component is a name, a factory and an attrs config class. Factories may be given
as ``"module:attribute"`` strings so that registering stays cheap: heavy modules
(torch, transformers) are imported only when a component is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import attrs

from .errors import PluginError, UnknownComponentError
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
}


def import_object(ref: str) -> Any:
    """Import ``"package.module:attr.sub"``."""
    module, _, qual = ref.partition(":")
    obj = importlib.import_module(module)
    for part in qual.split(".") if qual else ():
        obj = getattr(obj, part)
    return obj


@attrs.frozen
class Component:
    kind: str
    name: str
    factory: Callable[..., Any] | str
    config: type | None
    plugin: str
    doc: str = ""

    def load_factory(self) -> Callable[..., Any]:
        return import_object(self.factory) if isinstance(self.factory, str) else self.factory

    def build(self, cfg: Any = None, **kwargs: Any) -> Any:
        """Call the factory with a config instance (the default config if None)."""
        if self.config is not None and cfg is None:
            cfg = self.config()
        factory = self.load_factory()
        return factory(cfg, **kwargs) if self.config is not None else factory(**kwargs)


class Registry:
    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, Component]] = {k: {} for k in KINDS}

    def add(self, component: Component) -> None:
        table = self._by_kind[component.kind]
        old = table.get(component.name)
        if old is not None:
            raise PluginError(
                f"{component.kind} {component.name!r} is registered by both plugin {old.plugin!r} "
                f"and plugin {component.plugin!r}; disable one with MINFM_DISABLE_PLUGINS"
            )
        if component.config is not None and not attrs.has(component.config):
            raise PluginError(
                f"plugin {component.plugin!r}: config of {component.kind} {component.name!r} must be an attrs class"
            )
        table[component.name] = component

    def registrar(self, kind: str, plugin: str) -> Callable[..., None]:
        """The ``register`` callback handed to one plugin's hook for one kind."""

        def register(name: str, factory: Callable[..., Any] | str, config: type | None = None, doc: str | None = None):
            if doc is None:
                doc = (config.__doc__ or "").strip().splitlines()[0] if config is not None and config.__doc__ else ""
            self.add(Component(kind, name, factory, config, plugin, doc or ""))

        return register

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def components(self, kind: str) -> list[Component]:
        return [self._by_kind[kind][n] for n in self.names(kind)]

    def get(self, kind: str, name: str, path: str | None = None) -> Component:
        table = self._by_kind[kind]
        if name in table:
            return table[name]
        where = f"{path}: " if path else ""
        installed = ", ".join(self.names(kind)) or "(none)"
        raise UnknownComponentError(
            f"{where}unknown {kind} {name!r}{did_you_mean(name, table)}; installed: {installed}"
        )


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, filled from all plugins on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        from .plugins import load_plugins

        _REGISTRY = load_plugins().registry
    return _REGISTRY


def reset_registry() -> None:
    """Forget the loaded plugins (tests use this after installing a plugin)."""
    global _REGISTRY
    _REGISTRY = None
    from . import plugins

    plugins._STATE = None
