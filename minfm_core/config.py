"""Typed component configs and the one strict converter that structures recipes.

A component's config is an attrs class made with :func:`config`; each field is made
with :func:`field`, which requires a one-line ``doc`` (shown by ``minfm plugins``).

The converter is strict where cattrs is lenient: ``"64"`` is not an int, ``1.5`` is
not an int, ``1`` is not a bool, a string or a table is not an array (cattrs would split
``"abc"`` into three elements and a table into its keys), and unknown keys are errors. Errors come back as
``path: message`` lines (see :func:`structure`).
"""

from __future__ import annotations

import collections
import collections.abc as abc
import enum
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError, IterableValidationError, IterableValidationNote
from cattrs.v import transform_error

from .errors import MinfmError, RecipeError
from .validators import RangeError, range_text
from .suggest import did_you_mean

#: Dtype names recipes use (``minfm_core.weights.DTYPES`` maps them to torch dtypes).
Dtype = Literal["fp32", "bf16", "fp16"]

T = TypeVar("T")

class FieldTypeError(TypeError):
    """A config built in Python with a value not of its field's type (a recipe's values are
    checked while structuring, before the class sees them)."""

    def __init__(self, cls: type, field: str, detail: str):
        self.field, self.detail = field, detail
        super().__init__(f"{cls.__name__}.{field}: {detail}")


def _check_field_type(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Every config field's first validator: ``RectifiedConfig(compute_dtype="fp64")`` written
    in Python is refused where it is made, not met as a KeyError when the component builds."""
    cls = type(instance)
    try:
        attrs.resolve_types(cls)  # once per class (attrs remembers); the registry checks it resolves
    except Exception:
        return
    tp = attrs.fields_dict(cls)[attribute.name].type
    if not fits_type(tp, value):
        raise FieldTypeError(cls, attribute.name, f"expected {type_text(tp)}, got {_what(value)}")


def _tuples(value: Any) -> Any:
    """Lists as tuples, at any depth of lists (not inside tables): a config written in Python
    passes ``sizes=[[16, 16]]`` where a recipe's loader makes the tuples. No config field is a
    list (config_problems), so this only ever gives a tuple field its type."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _typed_fields(cls: type, fields: list[attrs.Attribute]) -> list[attrs.Attribute]:
    return [f.evolve(validator=_check_field_type if f.validator is None
                     else attrs.validators.and_(_check_field_type, f.validator),
                     converter=_tuples if f.converter is None else f.converter) for f in fields]


#: Decorator for component configs: frozen, keyword-only attrs classes whose fields check
#: their type when made (and then their own validators: a range is never asked about a string).
config = functools.partial(attrs.frozen, kw_only=True, field_transformer=_typed_fields)


#: Kinds of file reference a field may declare with ``field(..., file=...)``:
#: ``"file"``: a local file or folder; ``"ref"``: a local path or a Hub reference ``org/name[/path]``.
FILE_KINDS = ("file", "ref")


def field(default: Any = attrs.NOTHING, *, doc: str, validator=None, factory=None, converter=None,
          file: str | None = None, component: str | None = None):
    """An attrs field that carries its one-line documentation in ``metadata['doc']``.

    A :mod:`minfm_core.validators` range among its validators is recorded as
    ``metadata['range']`` (``minfm plugins`` shows it). ``file`` marks a field naming a file
    (:data:`FILE_KINDS`): in a recipe from outside (a Hub repo, a checkpoint) such a value
    must stay inside that recipe's folder. ``component`` (a kind, e.g. ``"dataset"``) marks a
    table that is a whole component table of that kind, ``{name = ..., options...}`` (a
    ``mix`` dataset's sources): its own file fields are then treated like any other.
    """
    from .validators import range_of

    if file is not None and file not in FILE_KINDS:
        raise ValueError(f"field(file=...): expected one of {FILE_KINDS}, got {file!r}")
    metadata: dict[str, Any] = {"doc": doc}
    validators = validator if isinstance(validator, (list, tuple)) else [validator]
    for v in validators:
        rng = range_of(v)
        if rng is not None:
            metadata["range"] = rng.range_text
            break
    if file is not None:
        from .validators import path_name

        metadata["file"] = file
        validator = [v for v in validators if v is not None] + [path_name]
    if component is not None:
        from .protocols import PROTOCOLS  # one protocol per kind

        if component not in PROTOCOLS:
            raise ValueError(f"field(component=...): expected a component kind, got {component!r}")
        metadata["component"] = component
    if factory is not None:
        return attrs.field(factory=factory, validator=validator, converter=converter, metadata=metadata)
    return attrs.field(default=default, validator=validator, converter=converter, metadata=metadata)


_SCALARS = (int, float, str, bool)


def config_problems(cls: type) -> list[str]:
    """Why ``cls`` is not a config recipes can fill as docs/plugins.md says ("How registration
    works"): frozen, each field made with :func:`field` and of an allowed type, each default
    of its field's type. Checked when a plugin registers: a mutable config, or a ``list``
    field the recipe loader cannot give, otherwise met the user only as odd behaviour."""
    if not attrs.has(cls):
        return ["must be an attrs class (minfm_core.config)"]
    try:
        attrs.resolve_types(cls)
    except Exception as exc:  # a forward reference that names nothing
        return [f"its field types do not resolve ({type(exc).__name__}: {exc})"]
    fields = attrs.fields(cls)
    problems = []
    if fields:
        blank = object.__new__(cls)  # no __init__: defaults and checks are not run
        try:
            setattr(blank, fields[0].name, None)
            problems.append("must be frozen (make it with minfm_core.config)")
        except attrs.exceptions.FrozenInstanceError:
            pass
    for f in fields:
        if "doc" not in f.metadata:
            problems.append(f"field {f.name!r}: declare it with minfm_core.field(default, doc=...)")
        why = _type_problem(f.type)
        if why:
            problems.append(f"field {f.name!r}: {why}")
        elif f.default is not attrs.NOTHING and not isinstance(f.default, attrs.Factory) \
                and not fits_type(f.type, f.default):
            problems.append(f"field {f.name!r}: default {short_repr(f.default)} is not of type {type_text(f.type)}")
    return problems


def fits_type(tp: Any, value: Any) -> bool:
    """Whether ``value`` is of type ``tp`` as a recipe would give it (a tuple field holds a
    tuple: a list would be unhashable in a frozen config; a float field takes an int)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in _SCALARS:
        return isinstance(value, tp)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (Union, types.UnionType):
        return any(a is type(None) and value is None or a is not type(None) and fits_type(a, value) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(fits_type(args[0], v) for v in value)
        return len(args) == len(value) and all(fits_type(a, v) for a, v in zip(args, value))
    if isinstance(tp, type) and attrs.has(tp):
        return isinstance(value, tp)
    return True  # dict: a table its validator checks


def _type_problem(tp: Any) -> str | None:
    """None when recipes can give a value of type ``tp``, else why not."""
    allowed = "int, float, str, bool, Literal[...], tuple[...], dict, X | None or a nested config"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS or (attrs.has(tp) and isinstance(tp, type)):
        return None
    if tp is dict:  # a TOML table: a component table, or overrides its validator checks
        return None
    if origin is Literal:
        return None if all(isinstance(a, (str, int, bool)) for a in args) else f"{_type_name(tp)}: Literal of str, int or bool"
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return _type_problem(inner[0])
        return f"{_type_name(tp)}: only X | None unions ({allowed})"
    if origin is tuple:
        parts = [a for a in args if a is not Ellipsis]
        return next((why for why in (_type_problem(a) for a in parts) if why), None) if parts else \
            f"{_type_name(tp)}: say what the tuple holds"
    return f"type {_type_name(tp)} is not one a recipe can give ({allowed})"


class ExpectedType(ValueError):
    """A value of the wrong type; the message is already user-facing."""


def _type_name(tp: Any) -> str:
    if attrs.has(tp):  # a section or config class: in TOML, a table
        return f"a table ({tp.__name__})"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def type_text(tp: Any) -> str:
    """How ``minfm plugins`` shows a field's type: Literal choices, optional and tuple members.

    ``Literal["a", "b"]`` -> ``'a' | 'b'``; ``int | None`` (or ``Optional[int]``) -> ``int | None``;
    ``tuple[int, int]`` -> ``tuple[int, int]``; plain classes by name.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_text(a) for a in args)
    if origin is not None and args:
        inner = ", ".join("..." if a is Ellipsis else type_text(a) for a in args)
        return f"{getattr(origin, '__name__', _type_name(origin))}[{inner}]"
    return _type_name(tp)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line must stay a line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _strict(tp: type, accept: Callable[[Any], bool]):
    def hook(value: Any, _: Any) -> Any:
        if not accept(value):
            raise ExpectedType(f"expected {_type_name(tp)}, got {short_repr(value)}")
        return tp(value)

    return hook


#: TOML's integers are 64-bit; Python's parser (and ``--set``) take any size. Beyond this a
#: value overflows the tensors and JSON it is stored in (a step count in a checkpoint).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _int_hook(value: Any, _: Any) -> int:
    value = _strict(int, lambda v: isinstance(v, int) and not isinstance(v, bool))(value, _)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ExpectedType(f"expected a 64-bit integer (as TOML has), got {short_repr(value)}")
    return value


def _literal_hook(value: Any, tp: Any) -> Any:
    choices = typing.get_args(tp)
    if value in choices and type(value) in {type(c) for c in choices}:
        return value
    raise ExpectedType(
        f"expected one of {', '.join(repr(c) for c in choices)}, got {short_repr(value)}"
        f"{did_you_mean(str(value)[:200], map(str, choices))}"
    )


#: Collection types (bare or subscripted) a TOML array structures into, and what each becomes.
_ARRAY_TYPES: dict[Any, type] = {
    tuple: tuple, abc.Sequence: tuple, list: list, abc.MutableSequence: list, collections.deque: collections.deque,
    set: set, abc.MutableSet: set, frozenset: frozenset, abc.Set: frozenset,
}


def _is_array_type(tp: Any) -> bool:
    origin = typing.get_origin(tp) or tp
    return isinstance(origin, type) and origin in _ARRAY_TYPES


def _what(value: Any) -> str:
    kind = {str: "a string", bytes: "bytes", dict: "a table"}.get(type(value)) or (
        "a table" if isinstance(value, Mapping) else type(value).__name__)
    return f"{kind} {short_repr(value)}"


def _array_hook_factory(tp: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    """The hook of every list/tuple/set-typed field: only a TOML array (a list, or a tuple from
    Python) is one. cattrs' own hooks take any iterable: a string became its characters
    (``prompts = "a red circle"``: 12 prompts) and a table its keys. Elements are structured
    by ``conv`` (strict too) and errors keep cattrs' index paths (``sample.size[0]: ...``)."""
    origin = typing.get_origin(tp) or tp
    make, args = _ARRAY_TYPES[origin], typing.get_args(tp)
    fixed = origin is tuple and bool(args) and not (len(args) == 2 and args[1] is Ellipsis)
    elem_types = args if fixed else (args[:1] or (Any,))

    def handler(elem: Any) -> Callable[[Any, Any], Any]:
        if elem is Any:
            return lambda v, _: v
        try:
            return conv.get_structure_hook(elem)
        except RecursionError:  # a recursive type: bind late
            return conv.structure

    handlers = [handler(e) for e in elem_types]

    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ExpectedType(f"expected an array, got {_what(value)}")
        if fixed and len(value) != len(args):
            raise ExpectedType(f"expected an array of {len(args)} values ({type_text(tp)}), "
                               f"got {len(value)}: {short_repr(value)}")
        out, errors = [], []
        for i, v in enumerate(value):
            k = i if fixed else 0
            try:
                out.append(handlers[k](v, elem_types[k]))
            except Exception as exc:
                exc.__notes__ = [*getattr(exc, "__notes__", []),
                                 IterableValidationNote(f"Structuring {tp} @ index {i}", i, elem_types[k])]
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {tp!r}", errors, tp)
        return make(out)

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _int_hook)
    conv.register_structure_hook(
        float, _strict(float, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    )
    conv.register_structure_hook(str, _strict(str, lambda v: isinstance(v, str)))
    conv.register_structure_hook(bool, _strict(bool, lambda v: isinstance(v, bool)))
    conv.register_structure_hook_func(lambda t: typing.get_origin(t) is typing.Literal, _literal_hook)
    conv.register_structure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, enum.Enum),
        lambda v, t: _literal_hook(v, typing.Literal[tuple(m.value for m in t)]) and t(v),
    )
    # Arrays are arrays: a string or a table is never split into elements.
    conv.register_structure_hook_factory(_is_array_type, lambda t: _array_hook_factory(t, conv))
    # Mappings given as plain dicts (free-form options) pass through untouched.
    conv.register_structure_hook(dict, lambda v, _: _expect_mapping(v))
    conv.register_structure_hook(Any, lambda v, _: v)
    return conv


def _expect_mapping(value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise ExpectedType(f"expected a table, got {short_repr(value)}")
    return dict(value)


#: The one converter (contract: strict, forbids unknown keys).
converter = _make_converter()


_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*): (.+)$", re.DOTALL)


def _format(exc: BaseException, tp: Any) -> str:
    if isinstance(exc, RangeError):
        # Raised from the config's __init__, so cattrs files it under the table: the field
        # name travels ahead of a NUL and error_lines() moves it into the path.
        # \x01 (error_entries): a rule that reads other values too
        return ("" if exc.own else "\x01") + f"{exc.field}\x00{exc}"
    if isinstance(exc, ExpectedType):
        return str(exc)
    if isinstance(exc, FieldTypeError):
        return f"{exc.field}\x00{exc.detail}"
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        former = getattr(exc.cl, "former_names", None)
        former = former if isinstance(former, dict) else {}
        return "; ".join(  # a key is quoted whole up to 80 characters (100 KB of key is one line's worth)
            f"unknown key {k[:80]!r}{'...' if len(k) > 80 else ''}"
            + (f" (now {former[k]!r})" if isinstance(former.get(k), str) else did_you_mean(k, known))
            for k in sorted(exc.extra_fields)
        )
    if isinstance(exc, KeyError):
        return "missing required key"
    if isinstance(exc, (TypeError, ValueError, AttributeError)) and tp is not None:  # a list where a table goes
        return f"expected {_type_name(tp)}"
    if isinstance(exc, (TypeError, ValueError, MinfmError)):
        # attrs validators raise these from __init__, and a config's __attrs_post_init__ may
        # raise any of them (docs/plugins.md); their text is the useful part. By convention it
        # starts with the field's name ("sizes: ..."): that moves into the path (data.sizes:
        # ...), as for a RangeError.
        m = _FIELD_PREFIX.match(str(exc))
        # \x01: a check of the whole config (error_entries), which may read several fields
        return "\x01" + (f"{m[1]}\x00{m[2]}" if m else str(exc))
    return f"\x01{type(exc).__name__}: {exc}"


def error_entries(exc: BaseException, path: str) -> list[tuple[str, bool]]:
    """A cattrs structuring error as ``(path: message, own)`` pairs; ``own``: the problem is one
    value's own (its type, its range, an unknown key), not a check of several fields together."""
    entries = []
    for line in transform_error(exc, path="$" + (("." + path) if path else ""), format_exception=_format):
        msg, _, where = line.rpartition(" @ ")
        where = where.removeprefix("$").removeprefix(".")
        own = not msg.startswith("\x01")
        msg = msg.removeprefix("\x01")
        if "\x00" in msg:
            name, _, msg = msg.partition("\x00")
            where = f"{where}.{name}" if where else name
        where = where or "<root>"
        entries.append((f"{where}: {msg}", own))
    return entries


def error_lines(exc: BaseException, path: str) -> list[str]:
    """Turn a cattrs structuring error into ``path: message`` lines."""
    return [line for line, _ in error_entries(exc, path)]


def structure(data: Any, cls: type[T], path: str = "", source: str | None = None) -> T:
    """Structure ``data`` into ``cls`` or raise :class:`RecipeError` naming each bad path."""
    obj, problems, _ = structure_all(data, cls, path)
    if problems:
        raise RecipeError(problems, source)
    return obj


#: How many times :func:`structure_all` sets bad values aside and tries again (one per field
#: a class's own checks refuse, which stop at the first).
_MAX_ROUNDS = 32


def structure_all(data: Any, cls: type[T], path: str = "") -> tuple[T | None, list[str], set[str]]:
    """``data`` structured into ``cls``, every problem found (each naming its path), and the
    paths of the values set aside to find them.

    cattrs reports every field of a wrong type or name at once, but a class's validators run
    one by one and stop at the first value out of range: a recipe with three such values
    took three tries to fix. So the values named are set aside (their defaults stand in)
    and the rest is structured again, collecting what each value's own checks say, until
    it structures: then the object is returned with the problems (the caller goes on to
    check what does not depend on the values set aside), else None. A check of several
    fields together is reported only from the first try, as a value set aside could be
    what it trips on; an element of an array is never set aside (the array's default would
    stand in for the elements the user wrote).
    """
    problems: list[str] = []
    aside: set[str] = set()  # what is said of these now is about their stand-ins
    for attempt in range(_MAX_ROUNDS):
        try:
            return converter.structure(data, cls), problems, aside
        except Exception as exc:  # cattrs raises ExceptionGroups and plain errors alike
            entries = error_entries(exc, path)
            if attempt and not all(own for _, own in entries):
                break
            for line, _ in entries:
                if line.partition(": ")[0] in aside:
                    continue
                line = _mark_default(line, data, path)
                if line not in problems:
                    problems.append(line)
            data, removed = _set_aside(data, [line for line, _ in entries], path)
            if not removed:
                break
            aside |= removed
    return None, problems, aside


_UNKNOWN_KEY = re.compile(r"""unknown key ('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")(\.\.\.)?""")


def _set_aside(data: Any, lines: list[str], path: str) -> tuple[Any, set[str]]:
    """``data`` without the values ``lines`` name (for unknown keys, the keys they name; a
    key cut short in the message, every key it begins), copied along the paths changed
    only; and the paths of what was removed."""
    import ast

    removed: set[str] = set()
    for line in lines:
        where, _, msg = line.partition(": ")
        where = "" if where == "<root>" else where
        if path and not (where == path or where.startswith(path + ".")):
            continue
        rel = where[len(path):].removeprefix(".")
        if "[" in rel:
            continue
        keys = [k for k in rel.split(".") if k]
        unknown = msg.startswith("unknown key")
        table, names = (keys, [(ast.literal_eval(q), cut) for q, cut in _UNKNOWN_KEY.findall(msg)]) if unknown \
            else (keys[:-1], [(keys[-1], "")] if keys else [])
        node = data
        for key in table:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        for name, cut in names:
            for key in [k for k in node if k == name or (cut and isinstance(k, str) and k.startswith(name))]:
                data = _without(data, [*table, key])
                node = _at(data, table)
                removed.add(f"{where}.{key}".lstrip(".") if unknown else where)
    return data, removed


def _at(data: Any, keys: list[str]) -> Any:
    for key in keys:
        data = data[key]
    return data


def _without(data: dict, keys: list[str]) -> dict:
    """``data`` without ``data[k0][k1]...[kn]``: the tables along the path copied, the rest shared."""
    out = dict(data)
    if len(keys) == 1:
        del out[keys[0]]
    else:
        out[keys[0]] = _without(data[keys[0]], keys[1:])
    return out


def _mark_default(line: str, data: Any, path: str) -> str:
    """A value the recipe never set is the config class's default: say so, or the user hunts
    their recipe for a key that is not there (a plugin's default outside its own range)."""
    where, _, msg = line.partition(": ")
    rel = where[len(path) + 1:] if path and where.startswith(path + ".") else ("" if where == path else where)
    if not rel or "[" in rel or msg.startswith(("missing required key", "unknown key")):
        return line
    node = data
    for key in rel.split("."):
        if not isinstance(node, dict):
            return line
        if key not in node:
            return f"{line} (the default: the recipe does not set it)"
        node = node[key]
    return line


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)


def describe_fields(cls: type) -> list[dict[str, Any]]:
    """Name, type, default and doc of each field of a config class (for ``minfm plugins``)."""
    out = []
    hints = typing.get_type_hints(cls)
    for a in attrs.fields(cls):
        if a.default is attrs.NOTHING:
            default: Any = None
            required = True
        elif isinstance(a.default, attrs.Factory):  # type: ignore[arg-type]
            default, required = unstructure(a.default.factory()), False
        else:
            default, required = unstructure(a.default), False
        out.append(
            {
                "name": a.name,
                "type": type_text(hints.get(a.name, a.type)),
                "default": default,
                "required": required,
                "doc": a.metadata.get("doc", ""),
                "range": a.metadata.get("range") or range_text(a.validator),
            }
        )
    return out
