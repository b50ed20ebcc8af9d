"""Reading a recipe file into one plain dict.

Precedence: ``--set`` > the file > what it ``extends`` > schema defaults.
``extends`` paths are relative to the file that names them; cycles are errors.
``${VAR}`` and ``${VAR:-default}`` expand environment variables in string values.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from .toml import tomllib


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; any other value in ``over`` replaces the base's.

    A component table whose ``name`` changes is replaced whole.
    """
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and not _renamed(out[key], value):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _renamed(base: Mapping[str, Any], over: Mapping[str, Any]) -> bool:
    """A component table that picks another component starts afresh (old options don't apply)."""
    return "name" in over and "name" in base and over["name"] != base["name"]


def _read(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(path) :], path))
        raise RecipeError(f"circular extends: {cycle}", str(chain[0]))
    if not path.is_file():
        where = f" (extended from {chain[-1]})" if chain else ""
        raise RecipeError(f"recipe file not found: {path}{where}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"invalid TOML: {exc}", str(path)) from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"extends: expected a file name, got {parent!r}", str(path))
    base = _read((path.parent / parent).resolve(), (*chain, path))
    return deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=VALUE`` -> (["a", "b"], value); VALUE is a TOML literal, else a bare string."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.max_steps=100")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words (paths, names) need no quotes on the command line
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(keys[: i + 1])} is not a table")
            node = child
        if keys[-1] == "name" and node.get("name", value) != value:
            node.clear()  # another component: the previous one's options do not apply
        node[keys[-1]] = value
    return data


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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

        return _VAR.sub(sub, data)
    return data


def load_recipe_dict(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The merged, overridden and expanded recipe as a plain dict (not yet validated)."""
    data = _read(Path(path).resolve(), ())
    return expand_env(apply_overrides(data, overrides))
