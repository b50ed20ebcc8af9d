"""Phase two: structure each component table with its registered config class."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs

from ..components import Resolved
from ..config import structure_all, unstructure
from ..errors import MinfmError, RecipeError
from ..registry import Registry, get_registry
from ..safepath import contained, recipe_root
from .load import SHIPPED, is_trusted, load_recipe_parts, parse_override, recipe_file, shipped_file
from .schema import SLOTS, Recipe, Spec


@attrs.frozen
class ResolvedRecipe:
    recipe: Recipe
    slots: dict[str, Resolved]
    source: str | None = None
    #: The folder a recipe from outside arrived in (None: the user's own), and the keys the
    #: user's own --set gave (trusted even then): the start-up checks of a job read them.
    outside: str | None = None
    trusted: frozenset[str] = frozenset()
    #: (key, what set it: ``--set KEY`` or a command's own flag, e.g. ``--size``) for each
    #: value the command line gave: a problem found later (a job's start-up checks) names it.
    set_by: tuple[tuple[str, str], ...] = ()

    def blame(self, problem: str) -> str:
        """``problem`` with the command-line setting that caused it named, if one did."""
        return _blame(problem, self.set_by)

    def __getitem__(self, path: str) -> Resolved:
        return self.slots[path]

    def get(self, path: str) -> Resolved | None:
        """The slot at ``path`` (its ``component``: ``.name``, ``.plugin``; its ``config``), or
        None when the recipe leaves the slot out."""
        return self.slots.get(path)

    def who(self, path: str) -> str:
        """``flow.time_sampler: time_sampler 'beta' of plugin 'x'``: the slot and the component
        in it, as an error at run time names them (the recipe key to change, and whose code
        to blame)."""
        slot = self.slots.get(path)
        return f"{path}: {slot.component.describe()}" if slot is not None else path

    def config(self, path: str) -> Any:
        """The config of the slot at ``path``; None both when the slot is absent and when its
        component takes no config (:meth:`get` tells them apart)."""
        slot = self.slots.get(path)
        return None if slot is None else slot.config

    def build(self, path: str, **kwargs: Any) -> Any:
        return self.slots[path].build(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (defaults filled in), ready to write as TOML."""
        data = unstructure(self.recipe)
        for path, slot in self.slots.items():
            table = {"name": slot.component.name, **(unstructure(slot.config) if slot.config is not None else {})}
            _set(data, path, table)
        return _drop_none(data)


def _set(data: dict, path: str, value: Any) -> None:
    keys = path.replace("]", "").replace("[", ".").split(".")
    node: Any = data
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _drop_none(value: Any) -> Any:
    # TOML has no null: an absent key means "default" (None) when read back.
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value


def _get(recipe: Recipe, path: str) -> Any:
    node: Any = recipe
    for key in path.split("."):
        node = getattr(node, key)
    return node


def iter_slots(recipe: Recipe) -> Iterator[tuple[str, str, Spec]]:
    """(path, kind, spec) for every component table present in the recipe."""
    for path, kind in SLOTS.items():
        spec = _get(recipe, path)
        if spec is not None:
            yield path, kind, spec
    for i, spec in enumerate(recipe.logging.loggers):
        yield f"logging.loggers[{i}]", "logger", spec


def resolve_recipe(
    raw: dict[str, Any], source: str | None = None, registry: Registry | None = None, world_size: int | None = None
) -> ResolvedRecipe:
    """Validate a raw recipe dict completely; raise one RecipeError listing every problem."""
    # The sections' problems and the components' together: one try shows them all.
    recipe, problems, aside = structure_all(raw, Recipe)
    if recipe is None:
        raise RecipeError(problems, source)
    registry = registry or get_registry()
    slots: dict[str, Resolved] = {}
    for path, kind, spec in iter_slots(recipe):
        if any(path == a or path.startswith(a + ".") or path.startswith(a + "[") for a in aside):
            continue  # a default standing in for what the recipe wrote: nothing to say of it
        try:
            slots[path] = slot = registry.configure(kind, spec.name, spec.options, path)
        except MinfmError as exc:
            problems.extend(_problems(exc))
            continue
        problems.extend(_nested_problems(registry, slot.config, path))
    if problems:
        raise RecipeError(problems, source)
    resolved = ResolvedRecipe(recipe, slots, source)
    from .checks import cross_checks

    problems = cross_checks(resolved, world_size=world_size)
    if problems:
        raise RecipeError(problems, source)
    return resolved


def _problems(exc: MinfmError) -> list[str]:
    return list(exc.problems) if isinstance(exc, RecipeError) else [str(exc)]


def nested_tables(cfg: Any, prefix: str) -> Iterator[tuple[str, str, Any]]:
    """``(path, kind, table)`` of every nested component table in config ``cfg`` (fields
    declared ``field(..., component=kind)``, also inside nested configs and tuples of them, as
    a mix's sources), the config being at ``prefix`` in the recipe."""
    if cfg is None or not attrs.has(type(cfg)):
        return
    for a in attrs.fields(type(cfg)):
        value, key = getattr(cfg, a.name), f"{prefix}.{a.name}"
        if a.metadata.get("component") and value is not None:
            yield key, a.metadata["component"], value
        elif attrs.has(type(value)):
            yield from nested_tables(value, key)
        elif isinstance(value, tuple):
            for i, v in enumerate(value):
                yield from nested_tables(v, f"{key}[{i}]")


def _nested_problems(registry: Registry, cfg: Any, prefix: str) -> list[str]:
    """Each nested component table resolved as a slot is (its name, its options against that
    component's config, strictly), and the tables nested in it: in ``minfm check`` and before
    every run, each problem by its full path. Only ``name`` was checked (while mapping file
    references), so an unknown key or a wrong type crashed the run inside the plugin."""
    problems = []
    for key, kind, table in nested_tables(cfg, prefix):
        try:
            inner = registry.resolve_table(kind, table, key)
        except MinfmError as exc:
            problems.extend(_problems(exc))
            continue
        problems.extend(_nested_problems(registry, inner.config, key))
    return problems


#: Overrides for a command that runs a recipe's model in one process (sampling, the demo,
#: caching, an export): no sharding and no balancing there, and the training's
#: ``parallel.shard_size`` or ``balancer.bags`` (made for its world size) must not refuse it.
#: The results are the same (tests/test_distributed_train.py compares them).
ONE_PROCESS = ("parallel.name=none", "balancer.name=none")


def load_recipe(
    path: str | os.PathLike,
    overrides: Iterable[str] = (),
    world_size: int | None = None,
    *,
    untrusted_root: str | os.PathLike | None = None,
    flags: dict[str, str] | None = None,
    recorded: bool = False,
) -> ResolvedRecipe:
    """Load, merge, override, expand, structure and check a recipe file.

    ``flags``: override key -> the command's flag that gave it (``{"sample.size": "--size"}``),
    named instead of ``--set KEY`` in a problem it caused; an empty name blames nothing (an
    override the command adds itself, e.g. ``job=sample``).

    ``untrusted_root``: the recipe came from outside (a Hub repo, a checkpoint folder) and
    this is the folder it arrived in. It is then read as data: no ``${VAR}`` expansion, its
    ``extends`` and every file reference (fields declared with ``field(..., file=...)``)
    must stay inside that folder and are rewritten to the contained path, relative to the
    recipe's place in it. The user's own ``overrides`` still apply and are trusted.

    A recipe of the user's that ``extends`` one from outside is read as from outside, with
    what the user's own files set trusted (as their ``--set`` is).

    Without ``untrusted_root``, a recipe lying in a downloaded folder (``hf://`` snapshots,
    ``minfm hub pull --local-dir``) is read that way too, whoever loads it: ``minfm run`` of a
    pulled recipe expanded ``${VAR}`` into the run's recipe.toml, which a push then published.

    ``recorded``: a recipe minFM wrote (a run's or a checkpoint's, already resolved): only the
    ``overrides`` are expanded (:func:`~minfm_core.recipe.load.load_recipe_parts`).
    """
    if untrusted_root is None:
        untrusted_root = recipe_root(recipe_file(path))
    overrides = list(overrides)
    keys = [".".join(parse_override(o)[0]) for o in overrides]
    set_by = tuple((k, (flags or {}).get(k, f"--set {k}")) for k in keys)
    try:
        parts = load_recipe_parts(path, overrides, untrusted_root=untrusted_root, recorded=recorded)
    except RecipeError as exc:  # a value an override gave (${VAR} unset, a NUL) names that --set too
        if not overrides:
            raise
        raise RecipeError([_blame(p, set_by) for p in exc.problems], exc.source) from None
    try:
        resolved = resolve_recipe(parts.data, source=str(path), world_size=world_size)
    except RecursionError:
        raise RecipeError("values nested too deeply", str(path)) from None
    except RecipeError as exc:
        if not overrides:
            raise
        raise RecipeError([_blame(p, set_by) for p in exc.problems], exc.source) from None
    resolved = attrs.evolve(resolved, set_by=set_by)
    if parts.untrusted_root is not None:
        trusted = frozenset(keys) | parts.trusted_keys
        resolved = contain_file_references(resolved, Path(path), parts.untrusted_root, trusted)
        resolved = attrs.evolve(resolved, outside=str(parts.untrusted_root), trusted=trusted)
    return shipped_file_references(resolved)


_UNKNOWN_KEY = re.compile(r"(?P<path>[^:]+): unknown key '(?P<name>[^']+)'")


def _blame(problem: str, set_by: Iterable[tuple[str, str]]) -> str:
    """``problem`` with the ``--set`` (or flag) that caused it named: the message's source is
    the recipe file, which may not hold the value at all (`tiny.toml: <root>: unknown key
    'nosuch'`). The setting the problem is about counts first; else one the problem names
    (`train.total_batch_size: ... multiple of train.batch_size ...` after `--set train.batch_size`)."""
    set_by = [(key, label) for key, label in reversed(list(set_by)) if label]  # the last one set it
    m = _UNKNOWN_KEY.match(problem)
    where = (m["name"] if m["path"] == "<root>" else f"{m['path']}.{m['name']}") if m else problem.split(":", 1)[0]
    for key, label in set_by:
        # (an unknown key blames the --set that reached into it: `model.denoisr.d_model`)
        if where == key or where.startswith((key + ".", key + "[")) or (m and key.startswith(where + ".")):
            return f"{problem} (from {label})"
    # A problem filed under a table (a config's cross-field check) or under one field of it
    # (`max_len: must differ from base_len`) blames a setting of that table only if the
    # message names it: the last one set there may be unrelated.
    message = problem.split(":", 1)[-1]
    for table in (where, where.rpartition(".")[0]):
        for key, label in set_by:
            if table and key.startswith(table + ".") and \
                    re.search(rf"(?<![\w.]){re.escape(key[len(table) + 1:])}(?![\w\[])", message):
                return f"{problem} (from {label})"
    for key, label in set_by:
        if "." in key and re.search(rf"(?<![\w.]){re.escape(key)}(?![\w\[])", problem):
            return f"{problem} (from {label})"
    return problem


def _contain(value: str, kind: str, base: Path, root: Path, what: str) -> str:
    """``value`` (a file reference from an untrusted recipe) as a path inside ``root``, or an error."""
    if kind == "ref" and value.startswith("hf://"):
        return value  # names a Hub repo, not a local file: fetched into its own snapshot
    if kind == "ref" and "://" in value:
        # Another scheme's resolver (a plugin's) is not held to the hf source's rules (no
        # pickle, bounded sizes, its own cache folder): only the user may point one at a URI.
        raise MinfmError(f"{what}: refusing source {value[:200]!r}: a recipe from outside may name hf:// "
                         "sources only (give another with --set)")
    if value.startswith(SHIPPED):
        return value  # a file shipped with minFM (shipped_file_references checks the name)
    if os.path.isabs(value) or value.startswith("~"):
        raise MinfmError(f"{what}: refusing path {value!r}: it leaves {root}")
    name = os.path.relpath(os.path.normpath(base / value), root).replace(os.sep, "/")
    path = contained(root, name, what=what)
    if kind == "ref" and not os.path.lexists(path):
        # Not a file of the repo: a Hub reference (org/name[/path]) -- unless it names a
        # local file from where minfm runs, which a recipe from outside may not reach.
        if os.path.lexists(value):
            raise MinfmError(f"{what}: refusing path {value!r}: not inside {root}")
        return value
    return str(path)


#: Sections of a recipe that only training reads: their file references in a recipe from
#: outside are dropped when they leave its folder, instead of refused.
TRAINING_ONLY = ("data", "train")


def map_file_references(resolved: ResolvedRecipe, fn: Callable[[str, str, str, Any], str]) -> ResolvedRecipe:
    """``resolved`` with ``fn(key, kind, value, attribute)`` applied to every set file reference
    (fields declared with ``field(..., file=kind)``) of the run/sample/train sections and slots."""

    def table(value: dict, kind: str, key: str) -> dict:
        # A nested component table (field(component=kind)), which resolve_recipe checked: its
        # component's file fields, and the component tables nested in it, as written.
        comp = get_registry().get(kind, value["name"], path=f"{key}.name")
        out = dict(value)
        for a in attrs.fields(comp.config) if comp.config is not None else ():
            if a.name in value:
                out[a.name] = value_of(a, value[a.name], f"{key}.{a.name}")
        return out

    def value_of(a: Any, value: Any, key: str) -> Any:
        if attrs.has(type(value)):
            return one(value, key)
        if isinstance(value, tuple) and any(attrs.has(type(v)) for v in value):
            return tuple(value_of(a, v, f"{key}[{i}]") for i, v in enumerate(value))
        if a.metadata.get("component") and isinstance(value, dict):
            return table(value, a.metadata["component"], key)
        kind = a.metadata.get("file")
        if kind is not None and isinstance(value, str) and value:
            return fn(key, kind, value, a)
        return value

    def one(cfg: Any, prefix: str) -> Any:
        changes = {}
        for a in attrs.fields(type(cfg)):
            value = getattr(cfg, a.name)
            new = value_of(a, value, f"{prefix}.{a.name}")
            if new is not value and new != value:
                changes[a.name] = new
        return attrs.evolve(cfg, **changes) if changes else cfg

    recipe = resolved.recipe
    recipe = attrs.evolve(recipe, **{name: one(getattr(recipe, name), name) for name in ("run", "sample", "train")})
    slots = {
        p: attrs.evolve(slot, config=one(slot.config, p))
        if slot.config is not None and attrs.has(type(slot.config)) else slot
        for p, slot in resolved.slots.items()
    }
    return attrs.evolve(resolved, recipe=recipe, slots=slots)


def contain_file_references(resolved: ResolvedRecipe, path: Path, root: Path, trusted: set[str] = frozenset()) -> ResolvedRecipe:
    """Every file reference of a recipe from outside, checked and made a path inside ``root``."""
    root = Path(os.path.abspath(root))
    base = Path(os.path.abspath(path)).parent  # the recipe's place in the repo, not a blob's
    if not base.is_relative_to(root):  # the user's recipe, extending one from outside: the repo's references are the repo's
        base = root

    def contain(key: str, kind: str, value: str, a: Any) -> str:
        if is_trusted(key, trusted):
            return value
        try:
            return _contain(value, kind, base, root, f"{path}: {key}")
        except MinfmError:
            if not key.startswith(TRAINING_ONLY):
                raise
            # What a model was trained on (``data.root = "/data/images"``) is never read by
            # sample, demo, export or push: dropped, so a published recipe stays usable.
            return a.default if a.default is not attrs.NOTHING else ""

    return map_file_references(resolved, contain)


def shipped_file_references(resolved: ResolvedRecipe) -> ResolvedRecipe:
    """``minfm:NAME`` file references -> the files shipped with minFM's recipes (e.g.
    ``prompt_file = "minfm:prompts/parti_prompts.txt"``), so that a shipped recipe works
    from any folder."""

    def shipped(key: str, kind: str, value: str, a: Any) -> str:
        return str(shipped_file(value, f"{resolved.source}: {key}")) if value.startswith(SHIPPED) else value

    return map_file_references(resolved, shipped)
