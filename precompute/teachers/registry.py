"""The registry of teacher builders: one builder per kind, registered with its facts.

`@register_teacher(name, ...facts)` records a `TeacherSpec` (in `precompute.teachers.specs`,
where `TeacherConfig` checks kinds) and the function that turns a `TeacherConfig` into a
`BuiltTeacher` (the module, a description of its architecture, and where its weights came from);
`@register_teacher_prefix` does the same for an open-ended family such as `timm:<model>`.
`precompute.teachers.loaded.load_teacher` is the one caller of `get_builder`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from precompute.teachers.config import TeacherConfig
from precompute.teachers.specs import (
    KindCheck,
    SpecResolver,
    TeacherSpec,
    add_prefix,
    add_spec,
    split_kind,
    unknown_kind,
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


Builder = Callable[[TeacherConfig], BuiltTeacher]

_BUILDERS: dict[str, Builder] = {}
_PREFIX_BUILDERS: dict[str, Builder] = {}


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

    def decorate(builder: Builder) -> Builder:
        add_spec(spec)  # refuses a name registered twice
        _BUILDERS[name] = builder
        return builder

    return decorate


def register_teacher_prefix(
    prefix: str, spec_resolver: SpecResolver, check: KindCheck | None = None
) -> Callable[[Builder], Builder]:
    """Decorator: handle every kind `<prefix>:<rest>` with `builder` and `spec_resolver`.

    `check(rest)`, when given, is a cheap validity test run by `TeacherConfig` (it raises).
    """

    def decorate(builder: Builder) -> Builder:
        add_prefix(prefix, spec_resolver, check)  # refuses a prefix registered twice
        _PREFIX_BUILDERS[prefix] = builder
        return builder

    return decorate


def get_builder(kind: str) -> Builder:
    """The function that builds `kind` from a `TeacherConfig`."""
    prefix, _ = split_kind(kind)
    if prefix:
        return _PREFIX_BUILDERS[prefix]
    if kind not in _BUILDERS:
        raise unknown_kind(kind)
    return _BUILDERS[kind]
