"""Loading plugins: entry points in group ``minfm``, with a checkout fallback.

Built-in plugins are listed in ``pyproject.toml`` under ``[project.entry-points.minfm]``
exactly like a third party's. When minFM runs from a checkout that was never
installed, that same table is read and the folders are mapped to their import names,
so there is one list of built-ins, not two.

A broken plugin never takes the others (or ``minfm --version``) down. Whatever goes
wrong with one plugin -- its import raises, pluggy rejects a hook implementation (a wrong
argument name), a hook name is unknown, one of its hooks raises, it registers a name one of
minFM's own plugins holds, or its entry point is named like a plugin already loaded -- that
plugin is unregistered, named in one warning on stderr, and listed in
:attr:`PluginState.failures` (``minfm plugins`` shows the reason). Two third-party plugins
claiming one component name both stay, but neither gets that name (see ``_fill``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .cli.groups import command_paths, drop_command, guard_commands
from .components import KINDS, Component, Registry, component
from .errors import PluginError, terminal_safe
from .suggest import did_you_mean

if sys.version_info >= (3, 11):  # not minfm_core.recipe.toml: that package imports the registry
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GROUP = "minfm"
DISABLE_ENV = "MINFM_DISABLE_PLUGINS"
#: Set (to 1, true, yes or on) to load only minFM's own plugins from entry points, as
#: PYTEST_DISABLE_PLUGIN_AUTOLOAD does for pytest: a plugin's own test suite then registers
#: the copy under test itself, and the installed copy of it cannot collide.
AUTOLOAD_ENV = "MINFM_DISABLE_PLUGIN_AUTOLOAD"
_ROOT = Path(__file__).resolve().parent.parent
#: Import name -> folder, for running from a checkout (mirrors pyproject's package-dir).
_CHECKOUT_PACKAGES = {"minfm_plugins": "plugins", "minfm_hub": "hub", "minfm_apps": "apps", "minfm_recipes": "recipes"}


@attrs.define
class PluginState:
    pm: pluggy.PluginManager
    failures: dict[str, str] = attrs.field(factory=dict)  # plugin name -> why it was skipped
    origins: dict[str, str] = attrs.field(factory=dict)  # plugin name -> module or distribution
    registry: Registry = attrs.field(factory=Registry)
    #: plugin name -> the ``minfm`` subcommands its ``register_commands`` added (once called).
    commands: dict[str, list[str]] = attrs.field(factory=dict)
    commands_added: bool = False
    #: minFM's own plugins (from its own distribution): a name one of them holds is never contested.
    builtin: set[str] = attrs.field(factory=set)
    #: plugin name -> the distribution its entry point came from (the qualified name's part).
    dists: dict[str, str] = attrs.field(factory=dict)


_STATE: PluginState | None = None


def disabled_plugins() -> set[str]:
    """The plugins MINFM_DISABLE_PLUGINS names: ``name`` blocks every entry point of that name,
    ``distribution:name`` (e.g. ``minfm-foo:loggers``, ``minfm:loggers`` for minFM's own) only
    that distribution's: two distributions may declare one entry point name."""
    return {_qualified(*n.strip().rpartition(":")[::2]) if ":" in n else n.strip()
            for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def _qualified(dist: str, name: str) -> str:
    """``distribution:name``, the distribution's name normalized as pip does (``minfm_foo`` and
    ``Minfm.Foo`` are ``minfm-foo``)."""
    return f"{re.sub(r'[-_.]+', '-', dist.strip()).lower()}:{name.strip()}"


def autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


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
    table = tomllib.loads(pyproject.read_text())["project"].get("entry-points", {}).get(GROUP, {})
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFinder())  # last: an installed copy always wins
    return list(table.items())


def _entry_points() -> list[tuple[str, str, Any, str, bool]]:
    """``(name, module, load, distribution, minFM's own)`` of every plugin: minFM's own first,
    then the others by name (none with autoload disabled).

    The order decides which of two entry points of one name loads (the second is skipped), and
    that minFM's own hold their component names first: a third party cannot knock out a
    built-in (MINFM_DISABLE_PLUGINS replaces one). Names two others claim: see ``_fill``.
    """
    eps = importlib.metadata.entry_points(group=GROUP)
    found = []
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else "?"
        found.append((dist == "minfm", ep.name, ep.value, ep.load, dist))
    seen = {name for own, name, *_ in found if own}
    for name, module in _checkout_entry_points():
        if name not in seen:  # the same entry point an install declares, loaded the same way
            ep = importlib.metadata.EntryPoint(name=name, value=module, group=GROUP)
            found.append((True, name, module, ep.load, "minfm"))
    if autoload_disabled():
        found = [f for f in found if f[0]]
    return [(name, value, load, dist, own)
            for own, name, value, load, dist in sorted(found, key=lambda t: (not t[0], t[1], t[4]))]


def _warn(msg: str) -> None:
    print(terminal_safe(f"minfm: warning: {msg}"), file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    # pluggy's validation errors span lines; a warning and a `failed:` entry are one line each.
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _fail(state: PluginState, name: str, reason: str, *, obj: Any = None) -> None:
    """Skip plugin ``name``: unregister it, remember why, say so once."""
    plugin_obj = state.pm.get_plugin(name) if obj is None else obj
    if plugin_obj is not None and state.pm.is_registered(plugin_obj):
        state.pm.unregister(plugin_obj)
    elif state.pm.has_plugin(name):
        state.pm.unregister(name=name)  # half-registered: pluggy stopped at a bad hook
    state.origins.pop(name, None)
    state.commands.pop(name, None)
    state.registry.drop_plugin(name)  # skipped whole: its components go too
    state.failures[name] = reason
    _warn(f"plugin {name!r} skipped: {reason}")


def _unknown_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    known = {n for n in dir(hookspecs) if n.startswith(("register_", "check_"))}
    bad = []
    for hook in pm.get_hookcallers(plugin) or []:
        if hook.name not in known:
            bad.append(f"unknown hook {hook.name!r}{did_you_mean(hook.name, known)}")
    return bad


def _register(state: PluginState, name: str, obj: Any, origin: str, dist: str | None = None) -> bool:
    pm = state.pm
    if pm.has_plugin(name) or name in state.origins:
        if not dist:  # an object registered in-process (plugin(), only()): its caller's mistake
            _warn(f"plugin {name!r} ({origin}) skipped: another plugin is already named {name!r}")
            return False
        # An entry point: listed (minfm plugins, --json failed) under its distribution-qualified
        # name, the one MINFM_DISABLE_PLUGINS takes to block just this entry point (or the other).
        key = _qualified(dist, name)
        other = "one of minFM's own plugins" if name in state.builtin else "another plugin"
        theirs = _qualified(state.dists.get(name, "<its distribution>"), name)
        reason = (f"{other} is already named {name!r}; this entry point needs another name (to load this one "
                  f"instead, block the other: MINFM_DISABLE_PLUGINS={theirs})")
        state.failures[key] = reason
        _warn(f"plugin {key!r} ({origin}) skipped: {reason}")
        return False
    try:
        pm.register(obj, name=name)
    except Exception as exc:  # pluggy.PluginValidationError: a hook's arguments do not match its spec
        _fail(state, name, _one_line(exc), obj=obj)
        return False
    bad = _unknown_hooks(pm, obj)
    if bad:
        _fail(state, name, "; ".join(bad), obj=obj)
        return False
    # Hooks other than the registries' are called through pluggy by their users (the CLI calls
    # register_commands, the recipe checks check_recipe): each implementation is guarded.
    for hook in pm.get_hookcallers(obj) or []:
        if hook.name in KINDS.values():
            continue  # _fill calls these one plugin at a time
        for impl in hook.get_hookimpls():
            if impl.plugin_name == name:
                # HookImpl has no public way to wrap its function; pluggy calls this attribute.
                impl.function = _guarded(state, name, hook.name, impl.function)  # type: ignore[misc]
    state.origins[name] = origin
    if dist:
        state.dists[name] = dist
    return True


def _guarded(state: PluginState, name: str, hook_name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (a hook of plugin ``name``), skipping the plugin if it raises."""

    def call(*args: Any) -> Any:
        if hook_name == "check_recipe":
            return _checked_problems(state, name, function, args)
        subparsers = args[0] if hook_name == "register_commands" else None
        before = command_paths(subparsers) if subparsers is not None else set()
        try:
            result = function(*args)
        except Exception as exc:
            if subparsers is not None:  # what it added before it raised goes with it
                for added in command_paths(subparsers) - before:
                    drop_command(subparsers, added)
            _fail(state, name, f"hook {hook_name} raised {_one_line(exc)}")
            return None  # pluggy collects no result from this plugin
        if subparsers is not None:
            added = command_paths(subparsers) - before
            guard_commands(subparsers, added, name)  # what its commands return or raise names it
            state.commands[name] = sorted(" ".join(p) for p in added)
            state.commands_added = True
        return result

    return call


def _checked_problems(state: PluginState, name: str, function: Callable[..., Any], args: tuple) -> list[str] | None:
    """A ``check_recipe`` hook's problems: a list (or tuple) of strings, None meaning none (a
    hook that ends without ``return``). One that raises, or returns anything else, skips its
    plugin (and its components: a recipe that uses them then fails its check, see
    ``recipe.checks``); other plugins' checks go on."""
    try:
        result = function(*args)
    except Exception as exc:
        _fail(state, name, f"hook check_recipe raised {_one_line(exc)}")
        return None
    if result is None:
        return []
    if not isinstance(result, (list, tuple)):
        _fail(state, name, f"hook check_recipe returned {type(result).__name__}, not a list of strings")
        return None
    odd = [p for p in result if not isinstance(p, str)]
    if odd:
        _fail(state, name, f"hook check_recipe returned a {type(result).__name__} holding "
                           f"{type(odd[0]).__name__} {_short(odd[0])}, not only strings")
        return None
    return list(result)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _components_of(state: PluginState, name: str, found: list[Component]) -> None:
    """What plugin ``name``'s ``register_*`` hooks register, appended to ``found`` (not yet the
    registry); a hook that raises is a PluginError naming that hook."""
    for kind, hook_name in KINDS.items():
        for impl in getattr(state.pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name != name:
                continue

            def register(cname, factory, config=None, doc=None, *, _kind=kind):
                found.append(component(_kind, cname, factory, config, name, doc))

            try:
                impl.function(register=register)
            except Exception as exc:
                raise PluginError(f"hook {hook_name} raised {_one_line(exc)}") from None


def _fill(state: PluginState) -> None:
    """The registry from every registered plugin; a plugin that cannot join it is skipped whole.

    A name one of minFM's own plugins holds skips the later plugin whole (a third party cannot
    knock out a built-in). A name two other plugins claim goes to neither: given to the one
    that loaded first (by entry-point name) it let any plugin squat another's names, and the
    other was skipped whole. Both keep their other components; a recipe naming the contested
    one is refused naming both, and MINFM_DISABLE_PLUGINS picks one.
    """
    reg = Registry()
    for name in list(state.origins):
        comps: list = []
        contested = []
        try:
            _components_of(state, name, comps)
            own = Registry()
            for c in comps:
                own.add(c)  # one plugin naming a component twice, a config that is not attrs
                if _contested(state, reg, c):
                    contested.append(c)
                else:
                    reg.check_new(c)  # a name one of minFM's own plugins holds
        except Exception as exc:  # a hook that raises is that plugin's failure, not everyone's
            _fail(state, name, str(exc) if isinstance(exc, PluginError) else f"registering raised {_one_line(exc)}")
            for c in comps:  # a recipe naming one is told whose they were, not "unknown"
                reg.note_skipped(c)
            continue
        for c in comps:
            if c in contested:
                reg.contest(c)
                _warn(f"{c.kind} {c.name!r} is registered by both plugin "
                      f"{' and plugin '.join(repr(p) for p in reg.contested()[(c.kind, c.name)])}: neither gets it "
                      "(MINFM_DISABLE_PLUGINS picks one)")
            else:
                reg.add(c)
    reg.failed = state.failures  # the same dict: a plugin skipped later is named too
    state.registry = reg


def _contested(state: PluginState, reg: Registry, c: Component) -> bool:
    """Whether ``c``'s name is already held, or contested, by plugins that are not minFM's own."""
    if (c.kind, c.name) in reg.contested():
        return True
    held = reg.holder(c.kind, c.name)
    return held is not None and held.plugin not in state.builtin and c.plugin not in state.builtin


def load_plugins() -> PluginState:
    """Load every plugin once per process; failures are reported and skipped."""
    global _STATE
    if _STATE is not None:
        return _STATE
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    state = PluginState(pm=pm)
    blocked, kept_out = disabled_plugins(), []
    for name, value, load, dist, own in _entry_points():
        if name in blocked:
            pm.set_blocked(name)
            kept_out.append(name)
            continue
        if _qualified(dist, name) in blocked:  # this distribution's only: another may use the name
            kept_out.append(_qualified(dist, name))
            continue
        try:
            obj = load()
        except Exception as exc:  # a broken plugin must not take the others down
            # qualified when a loaded plugin has its name: that one's components are not skipped
            key = _qualified(dist, name) if name in state.origins else name
            state.failures[key] = _one_line(exc)
            _warn(f"plugin {key!r} ({value}) failed to import and was skipped: {_one_line(exc)}")
            continue
        if _register(state, name, obj, value, dist) and own:
            state.builtin.add(name)
    _fill(state)
    state.registry.blocked = sorted(set(kept_out))
    _STATE = state
    return state


@contextlib.contextmanager
def only(*plugins: tuple[str, Any]) -> Iterator[PluginState]:
    """Inside the block the process's plugins are exactly ``plugins`` (``(name, obj)`` pairs;
    no entry point is loaded); the previous state comes back on exit, even on failure.

    A plugin that fails to register raises :class:`PluginError` (a test wants to know).
    """
    global _STATE
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    state = PluginState(pm=pm)
    for name, obj in plugins:
        _register(state, name, obj, f"<object {name}>")
    if not state.failures:
        _fill(state)
    if state.failures:
        raise PluginError("plugins failed to register: " + "; ".join(f"{n}: {r}" for n, r in state.failures.items()))
    if state.registry.contested():  # a test of several plugins wants to know, not to meet it in a recipe
        raise PluginError("plugins register the same names: " + "; ".join(
            f"{kind} {cname!r} by {', '.join(who)}" for (kind, cname), who in state.registry.contested().items()))
    saved, _STATE = _STATE, state
    try:
        yield state
    finally:
        _STATE = saved


def whose_code(exc: BaseException, *, plugin_first: bool = False) -> str | None:
    """Who wrote the code that raised ``exc``: ``"plugin 'acme' (distribution acme-minfm)"``
    or ``"minFM"``, from the innermost frame that lies in minFM's own packages or in a loaded
    third-party plugin's package (frames of torch, the standard library and other libraries
    are passed over: what called them is what went wrong); None when no frame is either. A
    bug report then goes to the plugin's authors rather than to minFM's.

    An exception a DataLoader worker raised reaches this process re-raised by torch, its
    traceback then only torch's and the loader's: the worker's own traceback, in its message
    (``Original Traceback ...``), is read instead.

    ``plugin_first``: the innermost third-party plugin's frame wins over minFM's own below it
    (a user's error a plugin raised through one of minFM's helpers, ``read_json_file``, is
    still that plugin's to explain); None when no plugin's frame is there."""
    own = [os.path.dirname(os.path.abspath(__file__))]
    theirs: list[tuple[str, str]] = []
    if _STATE is not None:
        for name, obj in _STATE.pm.list_name_plugin():
            if obj is None:  # blocked
                continue
            dist = _STATE.dists.get(name)
            who = f"plugin {name!r}" + (f" (distribution {dist})" if dist else "")
            places = _places_of(obj) + _factory_places(name)
            if name in _STATE.builtin:
                own += places
            else:
                theirs += [(place, who) for place in places]
    for filename in reversed(_files_raising(exc)):
        filename = os.path.abspath(filename)
        if not plugin_first and any(_within(filename, place) for place in own):
            return "minFM"
        for place, who in theirs:
            if _within(filename, place):
                return who
    return None  # (plugin_first: no plugin's frame; else neither minFM's nor a plugin's)


_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"
_FRAME_LINE = re.compile(r'^  File "(.+)", line \d+, in ', re.M)


def _files_raising(exc: BaseException) -> list[str]:
    """The source file of each frame of ``exc``'s traceback, outermost first."""
    text = str(exc)
    if _WORKER_TRACEBACK in text:
        return _FRAME_LINE.findall(text.split(_WORKER_TRACEBACK, 1)[1])
    return [frame.f_code.co_filename for frame, _ in traceback.walk_tb(exc.__traceback__)]


def _places_of(obj: Any) -> list[str]:
    """Where a plugin object's code lies: its package's folders (a module inside a package,
    or a package), or its own file (a top-level module); for an object, its class's module."""
    if isinstance(obj, types.ModuleType):
        module = obj
    else:
        module = sys.modules.get((obj if isinstance(obj, type) else type(obj)).__module__)
    if module is None:
        return []
    package = sys.modules.get(module.__package__ or "") or module
    folders = getattr(package, "__path__", None)
    if folders is not None:
        return [os.path.abspath(f) for f in folders]
    return [os.path.abspath(module.__file__)] if getattr(module, "__file__", None) else []


def _factory_places(plugin: str) -> list[str]:
    """Where the factories ``plugin`` registered lie: a ``"module:attribute"`` factory may name a
    module outside the entry point's package (a sibling top-level module), and its code, the
    components it builds included, is the plugin's all the same. Modules not imported are
    skipped: nothing of theirs has run; the standard library's are nobody's."""
    modules = set()
    for comp in _STATE.registry.all_components() if _STATE is not None else ():
        if comp.plugin != plugin:
            continue
        name = comp.factory.split(":", 1)[0] if isinstance(comp.factory, str) else getattr(comp.factory, "__module__", None)
        if name and name.split(".")[0] not in sys.stdlib_module_names and name in sys.modules:
            modules.add(name)
    return [place for name in sorted(modules) for place in _places_of(sys.modules[name])]


def _within(filename: str, place: str) -> bool:
    return filename == place or filename.startswith(place.rstrip(os.sep) + os.sep)


def reset() -> None:
    """Forget the loaded plugins; the next :func:`load_plugins` loads them afresh."""
    global _STATE
    _STATE = None


@contextlib.contextmanager
def plugin(obj: Any, name: str) -> Iterator[PluginState]:
    """Register a plugin object for the duration of a ``with`` block (tests, notebooks)."""
    state = load_plugins()
    _register(state, name, obj, f"<object {name}>")
    try:
        _fill(state)
        yield state
    finally:
        if state.pm.is_registered(obj):
            state.pm.unregister(obj)
        state.origins.pop(name, None)
        state.failures.pop(name, None)
        state.commands.pop(name, None)
        _fill(state)
