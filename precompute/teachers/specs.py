"""What each teacher kind is, before anything is built: its `TeacherSpec`, looked up by kind.

A teacher kind is either a registered name (`dino2reg_vitlarge_14`, `mast3r_vitlarge_16`, ...)
or a prefixed kind whose second half names a model elsewhere (`timm:<model>`,
`factory:<module>:<function>`). Registered names carry a `TeacherSpec` written by hand; prefixed
kinds compute theirs on demand. `TeacherConfig` checks its kind here and the builders are kept
in `precompute.teachers.registry`, which fills these tables: this module imports neither, so
the config and the registry do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cache_format.errors import ConfigError, RegistryError
from cache_format.manifest import TOKEN_TYPES
from cache_format.serde import check_types

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
PREFIX_FORMS = {"timm": "timm:<timm model name>", "factory": "factory:<module>:<function>"}


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
        check_types(self, where)
        if not self.name:
            raise ConfigError("TeacherSpec.name: expected a non-empty name, found ''")
        for field in ("patch_size", "dim"):
            if getattr(self, field) <= 0:
                raise ConfigError(
                    f"{where}.{field}: expected a positive int, found {getattr(self, field)!r}"
                )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{where}.std: expected positive values, found {self.std!r}")
        if "patch" not in self.token_types or not set(self.token_types) <= set(TOKEN_TYPES):
            raise ConfigError(
                f"{where}.token_types: expected {TOKEN_TYPES} or ('patch',), "
                f"found {self.token_types!r}"
            )


SpecResolver = Callable[[str], TeacherSpec]
KindCheck = Callable[[str], None]

_SPECS: dict[str, TeacherSpec] = {}
_PREFIX_SPECS: dict[str, SpecResolver] = {}
_PREFIX_CHECKS: dict[str, KindCheck] = {}


def add_spec(spec: TeacherSpec) -> None:
    """Record the facts of registered kind `spec.name` (called by `register_teacher`)."""
    if ":" in spec.name:
        raise ConfigError(
            f"register_teacher: name {spec.name!r} may not contain ':' (kind prefixes)"
        )
    if spec.name in _SPECS:
        raise RegistryError(f"teacher kind {spec.name!r} is registered twice; pick another name")
    _SPECS[spec.name] = spec


def add_prefix(prefix: str, resolver: SpecResolver, check: KindCheck | None = None) -> None:
    """Record how kinds `<prefix>:<rest>` get their facts (called by `register_teacher_prefix`).

    `check(rest)`, when given, is a cheap validity test run by `TeacherConfig` (it raises).
    """
    if prefix in _PREFIX_SPECS:
        raise RegistryError(f"teacher kind prefix {prefix!r} is registered twice")
    _PREFIX_SPECS[prefix] = resolver
    if check is not None:
        _PREFIX_CHECKS[prefix] = check


def list_teachers() -> list[str]:
    """The registered teacher names, sorted (prefixed kinds are open-ended and not listed)."""
    return sorted(_SPECS)


def unknown_kind(kind: str) -> RegistryError:
    """The error for a kind nobody registered, listing the valid names and forms."""
    forms = ", ".join(PREFIX_FORMS[p] for p in sorted(_PREFIX_SPECS) if p in PREFIX_FORMS)
    return RegistryError(
        f"unknown teacher kind {kind!r}; valid kinds are: {', '.join(list_teachers())}"
        + (f", or {forms}" if forms else ""),
        hint="fix `kind` in the teacher's config",
    )


def split_kind(kind: str) -> tuple[str, str]:
    """`'timm:vit_small'` -> `('timm', 'vit_small')`; a registered name -> `('', name)`."""
    prefix, sep, rest = kind.partition(":")
    if sep and prefix in _PREFIX_SPECS:
        return prefix, rest
    return "", kind


def check_kind(kind: str) -> None:
    """Raise `RegistryError` (listing the valid names) unless `kind` can be built.

    Prefixed kinds get their prefix's cheap check (a timm name must exist); a factory's module
    is imported only when the teacher is loaded.
    """
    prefix, rest = split_kind(kind)
    if not prefix:
        if kind not in _SPECS:
            raise unknown_kind(kind)
    elif prefix in _PREFIX_CHECKS:
        _PREFIX_CHECKS[prefix](rest)


def get_teacher_spec(kind: str) -> TeacherSpec:
    """The facts of `kind`; prefixed kinds are resolved (timm builds on the meta device)."""
    prefix, rest = split_kind(kind)
    if prefix:
        return _PREFIX_SPECS[prefix](rest)
    if kind not in _SPECS:
        raise unknown_kind(kind)
    return _SPECS[kind]
