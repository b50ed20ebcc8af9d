"""Reading a recipe file into one plain dict.

Precedence: ``--set`` > the file > what it ``extends`` > schema defaults.
``extends`` paths are relative to the folder the naming file sits in (its place, not where
a symlink to it leads: in the Hugging Face cache that would be a content-addressed blob);
cycles are errors. ``minfm:NAME.toml`` names a recipe shipped with minFM (installed with the
package), wherever the naming file is, and is accepted wherever a recipe path is.

Merging: tables merge key by key, every other value (arrays included) is replaced whole;
a component table whose ``name`` changes starts afresh. A key ending in ``+`` appends
instead: ``[[logging."loggers+"]]`` adds a logger to the loggers the extended recipe lists
(there must be such a list to append to). ``--set`` follows the same rule
(:func:`deep_merge`): ``--set 'train={max_steps=3}'`` sets one key of ``[train]`` and keeps
the others; ``--set KEY=[...]`` replaces an array, ``--set KEY+=[...]`` appends. Only on a
recipe from outside does ``--set KEY={...}`` replace the table (see :func:`apply_overrides`). ``${VAR}`` and ``${VAR:-default}`` expand environment variables in
string values; a ``${`` that opens no such reference is an error.

A recipe from outside (a Hub repo, a checkpoint: ``untrusted_root`` given) is data: no
environment expansion at all (its text stays literal), and ``extends`` must stay inside
``untrusted_root`` (:func:`minfm_core.safepath.contained`). The user's own ``--set``
overrides still apply (literally). File references inside the recipe are contained when
the recipe is resolved (``resolve.py``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import MinfmError, RecipeError
from ..suggest import did_you_mean
from ..textfiles import read_bounded
from .toml import tomllib


#: Suffix of a key whose array is appended to the extended recipe's array of the same name.
APPEND = "+"
#: A recipe file's place in the installed package, as ``extends`` and the CLI write it.
SHIPPED = "minfm:"


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """Tables merge key by key; any other value in ``over`` (arrays too) replaces the base's.

    A component table whose ``name`` changes is replaced whole. ``key+ = [...]`` appends
    to ``base[key]`` (an error if ``base`` has no such array, or ``over`` sets both forms).
    """
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        where = f"{path}.{key}" if path else key
        if key.endswith(APPEND) and len(key) > len(APPEND):
            out[key[: -len(APPEND)]] = _appended(out, over, key[: -len(APPEND)], value, where)
        elif isinstance(value, Mapping):
            # A table new here (or a renamed component) merges into nothing: its `key+` entries
            # still resolve, to an error as nothing is extended.
            keep = isinstance(out.get(key), Mapping) and not _renamed(out[key], value)
            out[key] = deep_merge(out[key] if keep else {}, value, where)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _appended(out: Mapping[str, Any], over: Mapping[str, Any], key: str, value: Any, where: str) -> list[Any]:
    if key in over:
        raise RecipeError(f"{where}: set either {key!r} (replace) or {key + APPEND!r} (append), not both")
    if not isinstance(value, list):
        raise RecipeError(f"{where}: expected an array to append, got {type(value).__name__}")
    if not isinstance(out.get(key), list):
        what = "no array" if key not in out else f"{type(out[key]).__name__} {out[key]!r:.40}, not an array"
        # (from a file: what it extends holds; from --set: the recipe as loaded)
        raise RecipeError(f"{where}: nothing to append to: the recipe so far has {what} at {where[: -len(APPEND)]}")
    return [*out[key], *copy.deepcopy(value)]


def _renamed(base: Mapping[str, Any], over: Mapping[str, Any]) -> bool:
    """A component table that picks another component starts afresh (old options don't apply)."""
    return "name" in over and "name" in base and over["name"] != base["name"]


#: A recipe is a small text file; anything larger is a mistake (a checkpoint named .toml, ...).
MAX_RECIPE_BYTES = 16 * 1024 * 1024
#: Longest ``extends`` chain (real ones: two or three files). A longer one, a generated
#: chain of a thousand files, ran out of Python's recursion and was reported as a file's
#: tables "nested too deeply", naming neither ``extends`` nor the chain.
MAX_EXTENDS_DEPTH = 64


def _parse(path: Path) -> dict[str, Any]:
    """The TOML table of one file, with every way a file can be unreadable as a RecipeError."""
    try:  # bounded before it is read: /dev/zero or a FIFO named as a recipe must not hang the check
        raw = read_bounded(path, str(path), MAX_RECIPE_BYTES)
    except MinfmError as exc:
        raise RecipeError(str(exc)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not a UTF-8 text file (byte {exc.start}); a recipe is TOML text", str(path)) from None
    # A UTF-8 byte-order mark (Notepad and other editors write one) is no TOML content: tomllib
    # refused it as "Invalid statement (line 1, column 1)". Any other U+FEFF stays an error.
    text = text.removeprefix("\ufeff")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"invalid TOML: {exc}", str(path)) from None
    except RecursionError:
        raise RecipeError("invalid TOML: arrays or tables nested too deeply", str(path)) from None


def shipped_recipes() -> Path:
    """The folder of the recipes shipped with minFM (installed as ``minfm_recipes``).

    From a checkout (editable or never installed) it is the checkout's ``recipes/``:
    that folder is the source of truth, packaged as it is.
    """
    import importlib.resources

    try:
        return Path(str(importlib.resources.files("minfm_recipes")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "recipes"


def shipped_file(text: str, what: str = "") -> Path:
    """``minfm:NAME`` -> the file NAME (e.g. ``prompts/parti_prompts.txt``) shipped with the
    recipes, wherever minFM is installed; a name that leaves that folder is an error."""
    name = text[len(SHIPPED):]
    folder = shipped_recipes()
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise RecipeError(f"{what + ': ' if what else ''}{text}: expected minfm:NAME, a file shipped with minFM's recipes")
    found = folder / name
    if not what or found.exists():
        return found
    shipped = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.suffix != ".py")
    raise RecipeError(f"{what}: {text}: no such shipped file{did_you_mean(name, shipped)}")


def is_trusted(key: str, trusted: Iterable[str]) -> bool:
    """Whether the user's own --set gave ``key`` (or a table holding it)."""
    key = key.replace("[", ".").replace("]", "")
    return any(key == t or key.startswith(t + ".") for t in trusted)


def recipe_file(ref: str | os.PathLike) -> Path:
    """A recipe path as given, or ``minfm:NAME.toml`` -> that shipped recipe's file."""
    text = os.fspath(ref)
    if not text.startswith(SHIPPED):
        return Path(os.path.abspath(text))
    try:
        if not text.endswith(".toml"):
            raise RecipeError(text)
        found = shipped_file(text)
    except RecipeError:
        raise RecipeError(f"{text}: expected minfm:NAME.toml, a recipe shipped with minFM") from None
    folder = shipped_recipes()
    name = text[len(SHIPPED):]
    if not found.is_file():
        shipped = ", ".join(sorted(p.name for p in folder.glob("*.toml"))) or "(none)"
        raise RecipeError(f"{text}: no such shipped recipe{did_you_mean(name, [p.name for p in folder.glob('*.toml')])}; "
                          f"shipped: {shipped}")
    return found


def _extended(path: Path, parent: str, untrusted_root: Path | None) -> Path:
    """The file ``extends = parent`` in ``path`` names, relative to ``path``'s folder."""
    if parent.startswith(SHIPPED):
        try:
            return recipe_file(parent)  # shipped with minFM: trusted, like the package itself
        except RecipeError as exc:
            raise RecipeError(f"extends: {exc}", str(path)) from None
    if untrusted_root is None:
        return Path(os.path.normpath(path.parent / parent))
    from ..safepath import contained

    root = Path(os.path.abspath(untrusted_root))
    if Path(parent).is_absolute() or parent.startswith("~"):
        raise RecipeError(f"extends: refusing path {parent!r}: it leaves {root}", str(path))
    # Lexical: the repo's folders are real folders (only its files are cache symlinks), so
    # the name relative to the root is what the repo says, and contained() checks where it leads.
    name = os.path.relpath(os.path.normpath(path.parent / parent), root)
    try:
        return Path(os.path.normpath(contained(root, name.replace(os.sep, "/"), what=f"{path}: extends")))
    except MinfmError:
        raise RecipeError(f"extends: refusing path {parent!r}: it leaves {root}", str(path)) from None


class _Outside:
    """What :func:`_read` found of a recipe from outside that the user's own recipe extends:
    that recipe's folder (``root``) and the keys the user's own files set (``trusted``)."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.trusted: set[str] = set()


def _leaf_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted keys of every value a file sets. An appended array (``key+``) is not among them:
    it holds the extended recipe's items too, and trusting its key would trust those."""
    out: set[str] = set()
    for key, value in data.items():
        if key.endswith(APPEND):
            continue
        where = f"{prefix}.{key}" if prefix else key
        # a table is its keys (an empty `[run]` of the user's must not vouch for the repo's run.*)
        out |= _leaf_keys(value, where) if isinstance(value, dict) else {where}
    return out


def _read(path: Path, chain: tuple[Path, ...], untrusted_root: Path | None = None,
          outside: _Outside | None = None) -> dict[str, Any]:
    # Cycles by real file: two names (a symlink, a relative detour) for one file are one file.
    reals = [os.path.realpath(p) for p in chain]
    if os.path.realpath(path) in reals:
        cycle = " -> ".join(p.name for p in (*chain[reals.index(os.path.realpath(path)) :], path))
        raise RecipeError(f"circular extends: {cycle}", str(chain[0]))
    if len(chain) >= MAX_EXTENDS_DEPTH:
        raise RecipeError(f"extends: a chain of more than {MAX_EXTENDS_DEPTH} recipes ({chain[0].name} -> "
                          f"{chain[1].name} -> ... -> {path.name}); at most {MAX_EXTENDS_DEPTH}", str(chain[0]))
    if not path.is_file():
        where = f" (extended from {chain[-1]})" if chain else ""
        what = ("is not a file" if path.exists() else "is a link to nothing (or a loop of links)"
                if os.path.islink(path) else "not found")
        raise RecipeError(f"recipe file {what}: {path}{where}")
    data = _parse(path)
    parent = data.pop("extends", None)
    if parent is None:
        return _merged({}, data, path)  # a `key+` with nothing extended is an error, as anywhere
    if not isinstance(parent, str) or not parent:
        raise RecipeError(f"extends: expected a file name, got {parent!r}", str(path))
    if "\0" in parent:  # no file name holds one (os.path refused it with a ValueError)
        raise RecipeError(f"extends: a NUL character in {parent!r}", str(path))
    parent_path = _extended(path, parent, untrusted_root)
    # A shipped recipe is minFM's own: its own extends resolve beside it, whoever named it.
    trusted = parent.startswith(SHIPPED)
    root = None if trusted else untrusted_root
    if root is None and not trusted and outside is not None:
        from ..safepath import recipe_root

        # The user's recipe extends one that came with a downloaded model: that one is read
        # as from outside (no ${VAR}, references kept inside its folder), and only what the
        # user's own files set is trusted. Read as the user's, a pulled recipe's
        # `neg_prompt = "${SECRET}"` was expanded into the run's recipe.toml, which a push publishes.
        root = outside.root = recipe_root(parent_path) or outside.root
    base = _read(parent_path, (*chain, path), root, outside)
    if untrusted_root is None and outside is not None and outside.root is not None:
        outside.trusted |= _leaf_keys(data)
        try:
            data = expand_env(data)  # the user's own file, expanded as always
        except RecipeError as exc:
            raise RecipeError(exc.problems, str(path)) from None
    return _merged(base, data, path)


def _merged(base: dict[str, Any], data: dict[str, Any], path: Path) -> dict[str, Any]:
    """:func:`deep_merge`, its errors naming the file whose keys they are about."""
    try:
        return deep_merge(base, data)
    except RecipeError as exc:
        if exc.source is not None:
            raise
        raise RecipeError(exc.problems, str(path)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=VALUE`` -> (["a", "b"], value); VALUE is a TOML literal, else a bare string."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*\+?", key):
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.max_steps=100")
    try:
        doc = tomllib.loads(f"v = {raw.strip()}")
    except tomllib.TOMLDecodeError:
        doc = {"v": raw.strip()}  # bare words (paths, names) need no quotes on the command line
    except RecursionError:  # as a recipe file's: tomllib recurses once per level
        raise RecipeError(f"--set {key}: VALUE has arrays or tables nested too deeply") from None
    # a newline in VALUE would start a second TOML line, whose keys were silently dropped
    if set(doc) != {"v"} or (not raw.strip().startswith(('"', "'", "[", "{")) and "\n" in raw.strip()):
        raise RecipeError(f"--set {text[:200]!r}: VALUE is one TOML value (a line break inside belongs in a "
                          "quoted string)")
    return key.split("."), doc["v"]


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], *, merge_tables: bool = True,
                    expand: bool = False) -> dict[str, Any]:
    """``data`` with the ``--set`` overrides applied, in order (``expand``: each override's
    value ``${VAR}``-expanded before it is merged, the recipe's own values left as they are).

    ``merge_tables=False`` (a recipe from outside): ``--set T={...}`` replaces the table whole.
    The user's ``--set`` is trusted by its key (``T`` and all under it, ``is_trusted``), so
    no value of the download may stay under it: merged, the repo's ``run.exp_dir`` would pass
    as the user's after ``--set run={seed=1}``.
    """
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        if expand:
            value = expand_env(value, ".".join(keys).removesuffix(APPEND))
        node = data
        for i, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(keys[: i + 1])} is not a table")
            node = child
        # --set logging.loggers+=[...] appends, and --set train={max_steps=3} merges into the
        # recipe's [train] (a component table whose name changes starts afresh): as in a file
        # that extends the recipe, by the one rule, deep_merge's.
        if keys[-1].endswith(APPEND) or (merge_tables and isinstance(value, Mapping)):
            try:
                merged = deep_merge(node, {keys[-1]: value}, ".".join(keys[:-1]))
            except RecipeError as exc:
                raise RecipeError(f"--set {text[:200]!r}: " + "; ".join(exc.problems)) from None
            node.clear()
            node.update(merged)
            continue
        if keys[-1] == "name" and node.get("name", value) != value:
            node.clear()  # another component: the previous one's options do not apply
        node[keys[-1]] = value
    return data


def _refuse_nul(data: Any, source: str, path: str = "") -> None:
    """No key or string holds a NUL: no path, name or prompt can, and os calls raise on one."""
    if isinstance(data, dict):
        for k, v in data.items():
            here = f"{path}.{k}" if path else k
            if "\0" in k:
                raise RecipeError(f"{here!r}: a key with a NUL character", source)
            _refuse_nul(v, source, here)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _refuse_nul(v, source, f"{path}[{i}]")
    elif isinstance(data, str) and "\0" in data:
        raise RecipeError(f"{path}: a NUL character in {data[:60]!r}", source)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_OPEN = "${"


def expand_env(data: Any, path: str = "") -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string, naming the path on failure."""
    if isinstance(data, dict):
        return {k: expand_env(v, f"{path}.{k}" if path else k) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, f"{path}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise RecipeError(f"{path}: environment variable {name} is not set (or write ${{{name}:-default}})")

        starts = {m.start() for m in _VAR.finditer(data)}
        at = data.find(_OPEN)
        while at != -1:
            if at not in starts:  # `${VAR` never closed, or `${1}`: a typo, not text to keep
                raise RecipeError(
                    f"{path}: malformed environment reference at {data[at:at + 24]!r}; "
                    "write ${VAR} or ${VAR:-default}"
                )
            at = data.find(_OPEN, at + 2)
        return _VAR.sub(sub, data)
    return data


def load_recipe_dict(
    path: str | os.PathLike, overrides: Iterable[str] = (), *, untrusted_root: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The merged, overridden and expanded recipe as a plain dict (not yet validated).

    ``untrusted_root``: the folder a recipe from outside arrived in (a Hub snapshot, a
    checkpoint); see the module doc. Nothing is expanded then, and ``extends`` stays inside it.
    """
    return load_recipe_parts(path, overrides, untrusted_root=untrusted_root).data


@dataclass(frozen=True)
class RecipeParts:
    """What :func:`load_recipe_parts` read: the recipe as a plain dict; the folder it came from
    when it (or a recipe it extends) is from outside, else None; and then the dotted keys the
    user's own files set (trusted; none when the whole recipe is from outside)."""

    data: dict[str, Any]
    untrusted_root: Path | None = None
    trusted_keys: frozenset[str] = frozenset()


def load_recipe_parts(
    path: str | os.PathLike, overrides: Iterable[str] = (), *, untrusted_root: str | os.PathLike | None = None,
    recorded: bool = False,
) -> RecipeParts:
    """:func:`load_recipe_dict`, and where the recipe came from outside (:class:`RecipeParts`).

    ``recorded``: the recipe is one minFM wrote (a run's or a checkpoint's ``recipe.toml``),
    resolved when it was written: nothing in it is expanded again, only what ``overrides``
    give. A copied checkpoint carries no download marker, and its ``${HF_TOKEN}`` reached the
    samples' metadata.json and index.html."""
    # abspath, not resolve(): a recipe's place is where it sits, not where its symlink leads.
    where = recipe_file(path)
    root = None if untrusted_root is None else Path(os.path.abspath(untrusted_root))
    outside = _Outside()
    try:
        data = _read(where, (), root, outside)
        root = root or outside.root
        # a recorded recipe: only what the user's --set gives is expanded, before it is merged
        data = apply_overrides(data, overrides, merge_tables=root is None, expand=recorded and root is None)
        _refuse_nul(data, str(where))
        if root is not None:
            return RecipeParts(data, root, frozenset(outside.trusted))
        try:
            return RecipeParts(data if recorded else expand_env(data))
        except RecipeError as exc:  # about a value of this recipe: name its file, as every recipe error does
            raise RecipeError(exc.problems, str(path)) from None
    except RecursionError:
        raise RecipeError("arrays or tables nested too deeply", str(path)) from None
