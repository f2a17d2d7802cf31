"""Plain-data round trips for the frozen config dataclasses of every stage, type-checked.

Configs are stored as JSON in the cache manifest and in run folders, never pickled. `to_dict`
turns nested dataclasses, tuples and enums into JSON types; `from_dict` rebuilds a dataclass
from such a dict (or a parsed TOML file). It is the one place where both stages check a
config's shape, from each field's annotation:

- unknown keys and missing required keys are refused by their dotted name;
- every value must have its field's type: `bool` is not an int, an int is accepted (and
  converted) for a float, floats must be finite (JSON and the manifest hold no NaN), lists
  become tuples, `X | None`, unions, `Literal`, enums and nested dataclasses are handled;
- a field annotated `PathStr` is a file-system path: given `base`, a relative one is made
  absolute against it (how a config file's paths are taken relative to the file).

Errors are ConfigError naming the dotted field, what was expected and what was found. A config
dataclass calls `check_types(self)` first in its `__post_init__` (the same rule for configs
built in Python); checks of a value's range or of several fields follow it there.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import types
import typing
from typing import Annotated, Any, Literal, TypeVar

from cache_format.errors import ConfigError
from cache_format.locations import absolute_path

T = TypeVar("T")


class _PathMarker:
    """Annotation marker: this string field is a path (see `PathStr`)."""

    def __repr__(self) -> str:
        return "PATH"


_PATH = _PathMarker()
#: A string field holding a local path or URL; `from_dict(..., base=...)` makes it absolute.
PathStr = Annotated[str, _PATH]


def to_dict(obj: Any) -> Any:
    """Recursively convert dataclasses / tuples / enums / paths into JSON-compatible values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return obj


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: annotation} of dataclass `cls`, annotations evaluated (markers kept)."""
    return typing.get_type_hints(cls, include_extras=True)


def check_choice(value: Any, choices: typing.Sequence[str], field: str, *, hint: str = "") -> None:
    """ConfigError naming `field` unless `value` is one of `choices`: the one check of a field
    that takes one of a fixed set of names (a mode, a kind, a strategy), in every config."""
    if value not in choices:
        raise ConfigError(f"{field}: expected one of {', '.join(choices)}, found {value!r}",
                          hint=hint)


def check_types(obj: Any, where: str = "") -> None:
    """Raise ConfigError naming the first field of dataclass `obj` whose value does not have
    its annotated type.

    Config dataclasses call it first thing in `__post_init__`, so that a config built in
    Python (`TrainConfig(batch_size="128")`) meets the same rule as one read by `from_dict`
    (which has checked, and converted, its values already); range checks follow it.
    """
    prefix = f"{where}." if where else ""
    for name, annotation in field_types(type(obj)).items():
        convert(getattr(obj, name), annotation, prefix + name)


def is_path_type(annotation: Any) -> bool:
    """Whether `annotation` is `PathStr` (possibly inside `X | None`)."""
    if typing.get_origin(annotation) is Annotated:
        return _PATH in typing.get_args(annotation)[1:]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(is_path_type(arm) for arm in typing.get_args(annotation))
    return False


def describe(annotation: Any) -> str:
    """How an error message says what a field expects ("an integer", "a list of 2 numbers")."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return "a path" if _PATH in args[1:] else describe(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple or origin is list:
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            inner = sorted({_plural(a) for a in args})
            return f"a list of {len(args)} {' / '.join(inner)}"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict:
        return f"a table of {_plural(args[1])}" if args else "a table"
    if dataclasses.is_dataclass(annotation):
        return f"a table ({annotation.__name__})"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              type(None): "nothing"}
    if annotation in simple:
        return simple[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _plural(annotation: Any) -> str:
    words = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if annotation in words:
        return words[annotation]
    return f"values ({describe(annotation)})"


def _found(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list", dict: "a table", type(None): "nothing"}
    return f"{kind.get(type(value), type(value).__name__)} {value!r:.80}"


def _wrong(where: str, annotation: Any, value: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {describe(annotation)}, found {_found(value)}")


def convert(value: Any, annotation: Any, where: str, base: str | None = None) -> Any:
    """`value` checked against `annotation` and converted (list -> tuple, int -> float, ...);
    a ConfigError names `where`. `base`: the folder relative `PathStr` values are taken from."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Annotated:
        value = convert(value, args[0], where, base)
        if _PATH in args[1:] and base is not None and isinstance(value, str):
            value = absolute_path(value, base)
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return convert(value, arm, where, base)
            except ConfigError:
                continue
        raise _wrong(where, annotation, value)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _wrong(where, annotation, value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return from_dict(annotation, value, where=where, base=base)
        raise _wrong(where, annotation, value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            raise _wrong(where, annotation, value) from None
    if origin in (tuple, list) or annotation in (tuple, list):
        return _convert_sequence(value, annotation, where, base)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _wrong(where, annotation, value)
        key_type, value_type = args or (Any, Any)
        converted = {}
        for key, item in value.items():
            key = convert(key, key_type, f"{where} (key {key!r})", base)
            converted[key] = convert(item, value_type, f"{where}.{key}", base)
        return converted
    return _convert_scalar(value, annotation, where)


def _convert_sequence(value: Any, annotation: Any, where: str, base: str | None) -> Any:
    origin, args = typing.get_origin(annotation) or annotation, typing.get_args(annotation)
    if not isinstance(value, list | tuple):
        raise _wrong(where, annotation, value)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            count = f"{len(value)} value{'s' if len(value) != 1 else ''}"
            raise ConfigError(f"{where}: expected {describe(annotation)}, found {count} "
                              f"{list(value)!r:.80}")
        items = [convert(v, a, f"{where}[{i}]", base)
                 for i, (v, a) in enumerate(zip(value, args, strict=True))]
    else:
        item_type = args[0] if args else Any
        items = [convert(v, item_type, f"{where}[{i}]", base) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_scalar(value: Any, annotation: Any, where: str) -> Any:
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong(where, annotation, value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, found {value!r}")
        return float(value)
    if annotation is int and isinstance(value, bool):  # bool is an int subclass; not here
        raise _wrong(where, annotation, value)
    if annotation is type(None):
        if value is not None:
            raise _wrong(where, annotation, value)
        return None
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise _wrong(where, annotation, value)
    return value


def from_dict(
    cls: type[T],
    data: dict[str, Any],
    *,
    where: str = "",
    base: str | os.PathLike[str] | None = None,
) -> T:
    """Build dataclass `cls` from `data`, type-checking every field from its annotation.

    `where` is the dotted name of `data` inside the whole config (error messages start with
    it); `base`, when given, is the folder that relative `PathStr` fields are taken from.
    Unknown keys, missing required keys and values of the wrong type are a ConfigError naming
    the field.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table, found {_found(data)}")
    prefix = f"{where}." if where else ""
    hints = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown field(s) {', '.join(map(str, unknown))}; "
            f"valid fields are {', '.join(sorted(fields))}"
        )
    missing = [
        name for name, f in fields.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{', '.join(prefix + name for name in missing)}: required, but missing",
            hint=f"add {' and '.join(repr(prefix + n) for n in missing)} to the config",
        )
    base_dir = os.fspath(base) if base is not None else None
    kwargs = {name: convert(value, hints[name], prefix + name, base_dir)
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from None


def json_problem(value: Any, where: str) -> str | None:
    """Where `value` stops being plain JSON (what zarr stores as attributes): a message naming
    the entry below `where`, or None if it is plain JSON."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}: key {key!r} has type {type(key).__name__}, expected str"
            problem = json_problem(item, f"{where}.{key}")
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple):
        problems = (json_problem(item, f"{where}[{i}]") for i, item in enumerate(value))
        return next((p for p in problems if p), None)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where}: {value!r} is not a finite number (JSON has no NaN or Infinity)"
    if value is None or isinstance(value, str | int | float):  # bool is an int
        return None
    return (f"{where}: expected a JSON value (dict, list, str, number, bool, None), found "
            f"{type(value).__name__} {value!r:.60}")
