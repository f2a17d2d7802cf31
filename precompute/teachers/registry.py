"""The registry of teacher kinds: one facts dataclass and one builder per name.

A teacher kind is either a registered name (`dino2reg_vitlarge_14`, `mast3r_vitlarge_16`, ...)
or a prefixed kind whose second half names a model elsewhere (`timm:<model>`,
`factory:<module>:<function>`). Registered names carry a `TeacherSpec` written by hand; prefixed
kinds compute theirs on demand. The builder behind each kind turns a `TeacherConfig` into a
`BuiltTeacher` (the module, a description of its architecture, and where its weights came from);
`precompute.teachers.loaded.load_teacher` is the one caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from cache_format.errors import ConfigError, RegistryError
from cache_format.manifest import TOKEN_TYPES

if TYPE_CHECKING:
    from precompute.teachers.config import TeacherConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TeacherSpec:
    """What the builder and the docs need to know about a teacher kind before loading it.

    `dim` and `patch_size` are those of the full-size architecture; a `TeacherConfig` with
    overrides builds a smaller module whose real dim is on the `LoadedTeacher`.
    `checkpoint_file` is the official file name, for docs and error hints only.
    """

    name: str
    patch_size: int
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    token_types: tuple[str, ...]
    domain: str
    description: str
    checkpoint_file: str = ""

    def __post_init__(self) -> None:
        where = f"TeacherSpec({self.name!r})"
        if not self.name:
            raise ConfigError("TeacherSpec.name: expected a non-empty name, found ''")
        for field in ("patch_size", "dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{where}.{field}: expected a positive int, found {value!r}")
        for field in ("mean", "std"):
            value = getattr(self, field)
            if len(value) != 3 or not all(isinstance(v, int | float) for v in value):
                raise ConfigError(f"{where}.{field}: expected 3 floats (RGB), found {value!r}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{where}.std: expected positive values, found {self.std!r}")
        if "patch" not in self.token_types or not set(self.token_types) <= set(TOKEN_TYPES):
            raise ConfigError(
                f"{where}.token_types: expected {TOKEN_TYPES} or ('patch',), "
                f"found {self.token_types!r}"
            )


@dataclass(frozen=True)
class BuiltTeacher:
    """A builder's answer: the module (any weights in place), its architecture, its weights' origin.

    `module` answers `forward_tokens(x) -> {"cls"?: [B, D], "patch": [B, T, D]}` and carries the
    attributes `patch_size` and `embed_dim`. `checkpoint_sha256` is the hex digest of the weights
    file, `random-init:seed=N`, or `hub:<name>`.
    """

    module: nn.Module
    arch: str
    checkpoint_sha256: str
    spec: TeacherSpec | None = None  # set by prefixed kinds, whose spec depends on the module


Builder = Callable[["TeacherConfig"], BuiltTeacher]
SpecResolver = Callable[[str], TeacherSpec]
KindCheck = Callable[[str], None]

_ENTRIES: dict[str, tuple[TeacherSpec, Builder]] = {}
_PREFIXES: dict[str, tuple[SpecResolver, Builder]] = {}
_PREFIX_CHECKS: dict[str, KindCheck] = {}
PREFIX_FORMS = {"timm": "timm:<timm model name>", "factory": "factory:<module>:<function>"}


def register_teacher(
    name: str,
    *,
    patch_size: int,
    dim: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    token_types: tuple[str, ...],
    domain: str,
    description: str,
    checkpoint_file: str = "",
) -> Callable[[Builder], Builder]:
    """Decorator: register `builder` under `name` with the facts of a `TeacherSpec`."""
    spec = TeacherSpec(
        name=name,
        patch_size=patch_size,
        dim=dim,
        mean=tuple(mean),
        std=tuple(std),
        token_types=tuple(token_types),
        domain=domain,
        description=description,
        checkpoint_file=checkpoint_file,
    )
    if ":" in name:
        raise ConfigError(f"register_teacher: name {name!r} may not contain ':' (kind prefixes)")

    def decorate(builder: Builder) -> Builder:
        if name in _ENTRIES:
            raise RegistryError(f"teacher kind {name!r} is registered twice; pick another name")
        _ENTRIES[name] = (spec, builder)
        return builder

    return decorate


def register_teacher_prefix(
    prefix: str, spec_resolver: SpecResolver, check: KindCheck | None = None
) -> Callable[[Builder], Builder]:
    """Decorator: handle every kind `<prefix>:<rest>` with `builder` and `spec_resolver`.

    `check(rest)`, when given, is a cheap validity test run by `TeacherConfig` (it raises).
    """

    def decorate(builder: Builder) -> Builder:
        if prefix in _PREFIXES:
            raise RegistryError(f"teacher kind prefix {prefix!r} is registered twice")
        _PREFIXES[prefix] = (spec_resolver, builder)
        if check is not None:
            _PREFIX_CHECKS[prefix] = check
        return builder

    return decorate


def list_teachers() -> list[str]:
    """The registered teacher names, sorted (prefixed kinds are open-ended and not listed)."""
    return sorted(_ENTRIES)


def _unknown(kind: str) -> RegistryError:
    forms = ", ".join(PREFIX_FORMS[p] for p in sorted(_PREFIXES) if p in PREFIX_FORMS)
    return RegistryError(
        f"unknown teacher kind {kind!r}; valid kinds are: {', '.join(list_teachers())}"
        + (f", or {forms}" if forms else ""),
        hint="fix `kind` in the teacher's config",
    )


def split_kind(kind: str) -> tuple[str, str]:
    """`'timm:vit_small'` -> `('timm', 'vit_small')`; a registered name -> `('', name)`."""
    prefix, sep, rest = kind.partition(":")
    if sep and prefix in _PREFIXES:
        return prefix, rest
    return "", kind


def check_kind(kind: str) -> None:
    """Raise `RegistryError` (listing the valid names) unless `kind` can be built.

    Prefixed kinds get their prefix's cheap check (a timm name must exist); a factory's module
    is imported only when the teacher is loaded.
    """
    prefix, rest = split_kind(kind)
    if not prefix:
        if kind not in _ENTRIES:
            raise _unknown(kind)
    elif prefix in _PREFIX_CHECKS:
        _PREFIX_CHECKS[prefix](rest)


def get_teacher_spec(kind: str) -> TeacherSpec:
    """The facts of `kind`; prefixed kinds are resolved (timm builds on the meta device)."""
    prefix, rest = split_kind(kind)
    if prefix:
        return _PREFIXES[prefix][0](rest)
    if kind not in _ENTRIES:
        raise _unknown(kind)
    return _ENTRIES[kind][0]


def get_builder(kind: str) -> Builder:
    """The function that builds `kind` from a `TeacherConfig`."""
    prefix, _ = split_kind(kind)
    if prefix:
        return _PREFIXES[prefix][1]
    if kind not in _ENTRIES:
        raise _unknown(kind)
    return _ENTRIES[kind][1]
