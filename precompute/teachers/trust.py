"""Which teacher definitions read from a cache may be rebuilt: a cache never makes us run its code.

A cache's manifest records how each teacher was loaded (`build_config.teachers`). Two commands
rebuild teachers from that record: `dune-cache verify --recompute` and `dune-train fit --online`.
Caches are shared between people and pulled from buckets, so the record is untrusted input: a
`factory:<module>:<function>` kind in it would import and call any module the editor names.

The rule: kinds that run user code (`USER_CODE_PREFIXES`) are rebuilt from a cache's record only
when the user says so, either
- by giving their own definition of that teacher (`dune-cache verify --recompute N --config
  BUILD.toml`: the user's config names a teacher of the same name and kind), or
- by an explicit trust flag: `--trust-cache-code` on `dune-cache verify` and on `dune-train
  fit/eval --online`, or the environment
  variable `DUNE_TRUST_CACHE_CODE=1` (read by `dune-train fit --online` and by verify alike).

Registered kinds and `timm:<model>` build only code that ships with the project or its
dependencies, so they need no trust; their weights are still checked against the manifest's
fingerprints.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from cache_format.errors import ConfigError
from precompute.teachers.config import TeacherConfig
from precompute.teachers.specs import split_kind

USER_CODE_PREFIXES: tuple[str, ...] = ("factory",)
TRUST_ENV = "DUNE_TRUST_CACHE_CODE"


class UntrustedCodeError(ConfigError):
    """A cache names user code (a `factory:` teacher) that nobody said to trust."""


def runs_user_code(kind: str) -> bool:
    """True when building `kind` imports and calls code named in the kind itself."""
    prefix, _ = split_kind(kind)
    return prefix in USER_CODE_PREFIXES


def trust_from_env() -> bool:
    """The explicit trust flag set in the environment (`DUNE_TRUST_CACHE_CODE=1`)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def check_cache_teachers(
    teachers: Iterable[TeacherConfig],
    where: str,
    *,
    trust: bool = False,
    own: Mapping[str, TeacherConfig] | None = None,
) -> None:
    """Refuse to rebuild any teacher read from a cache whose kind runs user code, unless `trust`
    or the user's own config (`own`, by teacher name) defines the same teacher with that kind.

    Called before anything is imported, so a refused cache has run nothing.
    """
    if trust or trust_from_env():
        return
    own = own or {}
    for cfg in teachers:
        if not runs_user_code(cfg.kind):
            continue
        mine = own.get(cfg.name)
        if mine is not None and mine.kind == cfg.kind:
            continue
        raise UntrustedCodeError(
            f"{where}: teacher {cfg.name!r} has kind {cfg.kind!r}, which would import and run "
            f"code named inside the cache; a cache's teacher definitions are not trusted",
            hint=f"if you trust whoever wrote this cache, set {TRUST_ENV}=1 (or pass "
            "--trust-cache-code to dune-cache verify, dune-train fit --online or dune-train "
            "eval --online); or give the teacher in your own build "
            "config (dune-cache verify --config BUILD.toml)",
        )
