"""Config files of both stages: read a TOML file, apply dotted overrides, resolve paths.

`dune-cache build` (`CacheBuildConfig`) and `dune-train fit` (`TrainConfig`) read their config
the same way, here:

1. the TOML file is parsed (a missing file or bad TOML is a ConfigError naming the file);
2. overrides such as `{"cache": "...", "runtime.device": "cpu", "data.roots.inet": "/x"}` are
   checked against the dataclass (an unknown dotted name or a value of the wrong type is
   refused by name) and set in the parsed dict; a relative path given as an override is taken
   from the current directory, since it comes from a command line;
3. `serde.from_dict` builds the dataclass, type-checking every field; relative paths left
   (those written in the file) are taken from the file's folder, so a config works from any
   working directory.

`with_overrides` applies the same overrides to a config already built.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from cache_format.errors import ConfigError
from cache_format.serde import convert, field_types, from_dict, to_dict

T = TypeVar("T")


def read_toml(path: str | os.PathLike[str], *, hint: str = "") -> dict[str, Any]:
    """The parsed TOML file at `path`; a missing file or invalid TOML is a ConfigError."""
    file = Path(path)
    try:
        with file.open("rb") as f:
            return tomllib.load(f)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{file}: no such config file", hint=hint) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML ({exc})") from None


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass inside `annotation` (itself, or the non-None arm of `X | None`)."""
    if dataclasses.is_dataclass(annotation):
        return annotation  # type: ignore[return-value]
    arms = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(arms) == 1 and dataclasses.is_dataclass(arms[0]):
        return arms[0]
    return None


def annotation_at(cls: type, dotted: str) -> Any:
    """The annotation of the field a dotted name addresses in dataclass `cls`.

    A name goes through nested dataclasses by field and through `dict[str, X]` fields by key
    (`data.roots.inet`). An unknown name is a ConfigError listing the valid fields.
    """
    annotation: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        inner = _dataclass_of(annotation)
        if inner is not None:
            hints = field_types(inner)
            if part not in hints:
                where = ".".join(parts[:i]) or "the config"
                raise ConfigError(
                    f"override {dotted!r}: {part!r} is not a field of {where} "
                    f"({inner.__name__}); valid fields are {', '.join(sorted(hints))}"
                )
            annotation = hints[part]
        elif typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            raise ConfigError(
                f"override {dotted!r}: {'.'.join(parts[:i])} is a single value, not a table"
            )
    return annotation


def apply_overrides(
    cls: type, data: dict[str, Any], overrides: Mapping[str, Any] | None
) -> dict[str, Any]:
    """`data` (a dict of dataclass `cls`) with each `dotted = value` override set, in place.

    None values are skipped, so a CLI can pass every option and only the given ones apply.
    Each value is type-checked against its field now (the error names the override), and a
    relative path is made absolute against the current directory.
    """
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        annotation = annotation_at(cls, dotted)
        checked = to_dict(convert(to_dict(value), annotation, dotted, os.getcwd()))
        parts = dotted.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {'.'.join(parts[: i + 1])} is not a table")
            node = child
        node[parts[-1]] = checked
    return data


def with_overrides(cfg: T, overrides: Mapping[str, Any]) -> T:
    """Copy of config dataclass `cfg` with dotted fields replaced, e.g. {"optim.lr": 1e-3}.

    The result is rebuilt through `from_dict`, so every check of a config read from a file
    applies to the overridden one too.
    """
    cls = type(cfg)
    return from_dict(cls, apply_overrides(cls, to_dict(cfg), overrides))


def load_config(
    cls: type[T],
    path: str | os.PathLike[str],
    overrides: Mapping[str, Any] | None = None,
    *,
    missing_hint: str = "",
) -> T:
    """Read dataclass `cls` from the TOML file at `path`, with `overrides` applied.

    Relative paths in the file are taken from the file's folder, relative override paths from
    the current directory. Every error is a ConfigError starting with the file's path.
    """
    file = Path(path)
    data = read_toml(file, hint=missing_hint)
    try:
        apply_overrides(cls, data, overrides)
        return from_dict(cls, data, base=file.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}", hint=exc.hint) from None
