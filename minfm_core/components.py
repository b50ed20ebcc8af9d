"""Components and registries as plain data: what a plugin registers, and how it is called.

A component is a name, a factory and an attrs config class. Factories may be given
as ``"module:attribute"`` strings so that registering stays cheap: heavy modules
(torch, transformers) are imported only when a component is built.

This module knows nothing of plugin loading (``minfm_core.plugins`` fills registries,
``minfm_core.registry`` is the process-wide one), so the import graph has one direction.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs

from . import protocols
from .config import config_problems, short_repr, structure
from .errors import MinfmError, PluginError, RecipeError, UnknownComponentError
from .suggest import did_you_mean
from .validators import _walk, range_of

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
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")

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
            # one line, whole: a multi-line message (a failed class layout) was cut at its first line
            raise PluginError(f"{self.describe()}: factory {self.factory!r} does not import: "
                              f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None

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
            with frozen_build_rng() if self.kind in protocols.FROZEN_KINDS else contextlib.nullcontext():
                built = factory(cfg, **kwargs) if self.config is not None else factory(**kwargs)
        except TypeError as exc:
            # A factory that cannot take what the engine passes is the plugin's error, said in
            # one line as `minfm check` says it; any other TypeError (one raised inside the
            # factory's body) stays a bug with its traceback, noted like any other below.
            problem = self.factory_problem()
            if problem is not None:
                raise PluginError(problem) from None
            exc.add_note(self.raised_note())
            raise
        except MinfmError:
            raise
        except Exception as exc:  # a bug: its traceback stays, and now says whose factory it was
            exc.add_note(self.raised_note())
            raise
        # The engine calls every member, optional ones too, with the keywords its protocol
        # declares: a member missing (an AttributeError deep in a training step), bases that
        # hide forward (a "got NoneType" at the first step) or a keyword not taken (a
        # TypeError mid-run) is the plugin's error, said here by name.
        problem = protocols.built_problem(self.kind, built)
        if problem:
            raise PluginError(f"{self.describe()}: {problem}")
        return built

    def raised_note(self) -> str:
        """The note added under the traceback of a bug raised by this component's factory."""
        return f"(raised by the factory of {self.describe()})"

    @contextlib.contextmanager
    def calling(self, member: str) -> Iterator[None]:
        """Around the engine's call of ``member`` on what this component built: a bug raised
        there keeps its traceback and says whose it is (a MinfmError is the user's: as it is)."""
        try:
            yield
        except MinfmError:
            raise
        except Exception as exc:
            exc.add_note(f"(raised by {member} of {self.describe()})")
            raise


@attrs.frozen
class Resolved:
    """A component table after resolution: the registered component, its config (structured
    from the table's options) and the table's place in the recipe (what errors name).

    A recipe's slots are these (``recipe.get("flow.time_sampler")``), and so is a nested
    component table a plugin resolves with :meth:`Registry.resolve_table`."""

    path: str
    component: Component
    config: Any

    def build(self, **kwargs: Any) -> Any:
        try:
            return self.component.build(self.config, **kwargs)
        except (PluginError, RecipeError):  # they name the component, or the recipe's paths, already
            raise
        except MinfmError as exc:
            # What a factory refuses is a value in this table: name its place, as `minfm check` does.
            exc.args = (at_path(self.path, str(exc)), *exc.args[1:])
            raise


@contextlib.contextmanager
def frozen_build_rng() -> Iterator[None]:
    """Torch's global CPU generator seeded with 0 inside, restored after: the factories of
    ``protocols.FROZEN_KINDS`` run in it, so their random weights are a function of the config."""
    import torch  # only when a component is built: the CLI's start stays light

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)
        yield


def at_path(path: str, line: str) -> str:
    """``line`` under recipe ``path`` (``flow.time_sampler: ...``), unless it names its own
    place there already (``flow.time_sampler.a: ...``)."""
    return line if line.startswith((f"{path}.", f"{path}:", f"{path}[")) else f"{path}: {line}"


def _name(factory: Any) -> str:
    return getattr(factory, "__qualname__", None) or type(factory).__name__


def default_problems(cls: type, prefix: str = "") -> list[str]:
    """Fields of config class ``cls`` (and of the config classes it nests) whose default lies
    outside the field's own declared range: every recipe that leaves the field unset would be
    refused, for a value the user never wrote. Plain defaults only: a ``factory=`` default may
    need the registry (a mix's sources), which is being filled when this runs."""
    problems = []
    for a in attrs.fields(cls):
        if isinstance(a.type, type) and attrs.has(a.type):
            problems += default_problems(a.type, f"{prefix}{a.name}.")
        default = a.default
        if default is attrs.NOTHING or isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            continue
        # the field's Range, and attrs' own gt/ge/lt/le: checks of the value alone
        checks = [range_of(a.validator)] + [v for v in _walk(a.validator) if getattr(v, "compare_op", None)]
        for check in filter(None, checks):
            try:
                check(None, a, default)
            except Exception as exc:  # a RangeError; a TypeError from gt(0) on a str default too
                problems.append(f"field {prefix + a.name!r}: default {short_repr(default)} is outside its own "
                                f"range ({exc})")
                break
    return problems


class Registry:
    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        self._dropped: dict[tuple[str, str], str] = {}  # (kind, name) -> the skipped plugin that had it
        #: (kind, name) -> the plugins (none of them minFM's own) that all claim it: no one gets it.
        self._contested: dict[tuple[str, str], list[str]] = {}
        #: installed plugins MINFM_DISABLE_PLUGINS kept from loading: what they register is unknown,
        #: so an unknown name says they may hold it (the user may have blocked the one they need).
        self.blocked: list[str] = []
        #: plugins skipped for a failure (an import that raised, a hook that raised part-way),
        #: plugin -> why: an unknown name says they may hold it, as for blocked plugins.
        self.failed: Mapping[str, str] = {}

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
        if isinstance(factory, str) and ":" not in factory:
            raise PluginError(f"{kind} {name!r}: factory {short_repr(factory)} has no ':'; a lazy factory is "
                              "'module:attribute'")
        if not (callable(factory) or isinstance(factory, str)):
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
        config = component.config
        if config is not None and not isinstance(config, (type, str)):
            raise PluginError(f"{kind} {name!r}: config must be a class, got an instance of {type(config).__name__} "
                              "(pass the class itself)")
        if isinstance(config, str):  # register(name, factory, "its doc"): the third argument is the config
            raise PluginError(f"{kind} {name!r}: config {short_repr(config)} is a string, not a config class; "
                              "pass a doc by keyword: register(name, factory, doc=...)")
        if config is not None and kind in protocols.CONFIGLESS_KINDS:
            raise PluginError(f"{kind} {name!r}: a {kind} is registered without a config (the engine never "
                              f"configures one), got config {short_repr(config)}; pass only name, factory and doc=")
        # (Its default config is not built here: many are complete only in a recipe, e.g.
        # flux's fields that a flavor fills, or a mix naming datasets of other plugins. Each
        # plain default is held to its own field's range, though.)
        if config is not None:
            problems = config_problems(config) or default_problems(config)
            if problems:
                raise PluginError(f"config of {kind} {name!r}: {'; '.join(problems)}")
        lacks = protocols.config_lacks(kind, config)
        if lacks:
            proto = protocols.CONFIG_PROTOCOLS[kind].__name__
            raise PluginError(f"{kind} {name!r}: its config must have {' and '.join(lacks)}, as a field or a property "
                              f"(protocols.{proto}): the engine reads {'it' if len(lacks) == 1 else 'them'}"
                              + ("" if config is not None else "; it has no config"))

    def drop_plugin(self, plugin: str) -> None:
        """Forget every component of ``plugin`` (a plugin skipped after it joined the registry)."""
        for table in self._by_kind.values():
            for name in [n for n, c in table.items() if c.plugin == plugin]:
                self.note_skipped(table.pop(name))

    def contest(self, component: Component) -> None:
        """``component``'s name is held by another plugin that is not one of minFM's own: the
        name is withdrawn from both (from every claimant), so a recipe naming it is refused with
        all their names rather than silently given whichever plugin loaded first."""
        key = (component.kind, component.name)
        holder = self._by_kind[component.kind].pop(component.name, None)
        claimants = self._contested.setdefault(key, [holder.plugin] if holder is not None else [])
        claimants.append(component.plugin)

    def contested(self) -> dict[tuple[str, str], list[str]]:
        """(kind, name) -> the plugins that claim it (no one gets it): see :meth:`contest`."""
        return dict(self._contested)

    def note_skipped(self, component: Component) -> None:
        """``component``'s plugin was skipped: :meth:`get` says so rather than "unknown"."""
        if self._by_kind.get(component.kind, {}).get(component.name) is None:
            self._dropped[(component.kind, component.name)] = component.plugin

    def registrar(self, kind: str, plugin: str) -> Callable[..., None]:
        """The ``register`` callback handed to one plugin's hook for one kind (the same
        ``register(name, factory, config=None, doc=None)`` for every kind)."""

        def register(name: str, factory: Callable[..., Any] | str, config: type | None = None, doc: str | None = None):
            self.add(component(kind, name, factory, config, plugin, doc))

        return register

    def holder(self, kind: str, name: str) -> Component | None:
        """The component registered as ``name`` of ``kind``, or None (unlike :meth:`get`, no error)."""
        return self._by_kind[kind].get(name)

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
        claimants = self._contested.get((kind, name))
        if claimants is not None:  # not a typo either: two plugins want it, the user picks one
            named = " and ".join(f"plugin {p!r}" for p in claimants)
            raise PluginError(f"{where}{kind} {name!r} is registered by both {named}, so by neither; keep one "
                              f"with MINFM_DISABLE_PLUGINS={','.join(claimants[1:])} (or {claimants[0]})")
        skipped = self._dropped.get((kind, name))
        if skipped is not None:  # not a typo: its plugin failed (the reason is in `minfm plugins`)
            raise UnknownComponentError(f"{where}{kind} {name!r} belongs to plugin {skipped!r}, which was skipped "
                                        "(minfm plugins says why)")
        installed = ", ".join(self.names(kind)) or "(none)"
        blocked = ""
        if self.blocked:
            them = (f"plugin {self.blocked[0]}, which" if len(self.blocked) == 1
                    else f"plugins {', '.join(self.blocked)}; one of them")
            blocked = f" (MINFM_DISABLE_PLUGINS blocks {them} may have it)"
        if self.failed:
            them = (f"plugin {next(iter(self.failed))!r}, which failed to load, may have it" if len(self.failed) == 1
                    else f"plugins {', '.join(map(repr, self.failed))} failed to load; one of them may have it")
            blocked += f" ({them}: minfm plugins says why)"
        raise UnknownComponentError(
            f"{where}unknown {kind} {name!r}{did_you_mean(name, table)}; installed: {installed}{blocked}"
        )


    def configure(self, kind: str, name: str, options: Mapping[str, Any], path: str) -> Resolved:
        """Component ``name`` of ``kind`` with ``options`` structured into its config, as the
        recipe's ``path`` holds it: strictly (unknown keys, wrong types, values outside a
        range are errors), every problem naming its full path. How every recipe slot and
        every nested component table is resolved."""
        comp = self.get(kind, name, path=f"{path}.name")
        if comp.config is None:
            if options:
                raise RecipeError(f"{path}: {kind} {name!r} takes no options, got {', '.join(options)}")
            return Resolved(path, comp, None)
        return Resolved(path, comp, structure(dict(options), comp.config, path=path))

    def resolve_table(self, kind: str, table: Any, path: str | None = None) -> Resolved:
        """A whole component table, ``{name = "...", options...}`` (the value of a config field
        declared ``field(..., component=kind)``), resolved as a recipe slot is: the public way
        for a plugin to build the component such a table names
        (``get_registry().resolve_table("denoiser", cfg.inner).build(load_weights=...)``).
        ``path``: where the recipe holds the table, for errors (default: the kind)."""
        path = path or kind
        if not isinstance(table, Mapping):
            raise RecipeError(f"{path}: expected a {kind} table (name = '<{kind}>' and its options), "
                              f"got {short_repr(table)}")
        name = table.get("name")
        if not isinstance(name, str):
            raise RecipeError(f"{path}.name: a {kind} table needs name = '<{kind}>', got "
                              f"{'nothing' if name is None else short_repr(name)}")
        return self.configure(kind, name, {k: v for k, v in table.items() if k != "name"}, path)


def component(kind: str, name: str, factory: Any, config: type | None, plugin: str, doc: str | None) -> Component:
    """A Component from ``register(...)``'s arguments (doc: the config's first docstring line)."""
    if doc is None:
        doc = (config.__doc__ or "").strip().splitlines()[0] if config is not None and config.__doc__ else ""
    return Component(kind, name, factory, config, plugin, doc or "")
