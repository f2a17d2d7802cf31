"""Plain-data round trips for the frozen config dataclasses of every stage.

Configs are stored as JSON in the cache manifest and in run folders, never pickled. `to_dict`
turns nested dataclasses, tuples and enums into JSON types; `from_dict` rebuilds a dataclass
from such a dict, recursing into fields whose type is itself a dataclass, and refuses unknown
keys by name so that a typo in a config file is an error, not a silently ignored line.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any, TypeVar

from cache_format.errors import ConfigError

T = TypeVar("T")


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


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _convert(value, non_none[0], where)
        return value
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return from_dict(annotation, value, where=where)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in annotation)
            raise ConfigError(f"{where}: {value!r} is not one of {valid}") from None
    if origin is tuple and isinstance(value, list | tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) == len(value):
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
        return tuple(value)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {k: _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys raise ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown field(s) {', '.join(unknown)}; "
            f"valid fields are {', '.join(sorted(fields))}"
        )
    kwargs = {
        name: _convert(value, hints[name], f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
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
