"""The manifest's replay section: what stage two needs to replay a stored view and find its image.

A cache outlives the code that built it. Stage two must re-render every cached view for the
student from its source image, so it needs the view settings, the seed, the number of views per
image, where each dataset's images are and how they were decoded, and the domains that teacher
dropping and domain-balanced sampling use. Those facts are this section: a typed, versioned part
of the cache format, parsed here without the builder's config, the teacher registry or dask.
The manifest's free-form `build_config` stays beside it as a record of the build only.

Versioning: `REPLAY_VERSION` grows whenever a reader of the previous version could misread the
section; a newer section is refused (CacheVersionError). Fields added later get defaults that
mean what older caches did. A cache written before this section existed has none: it must be
upgraded in place (`dune-cache upgrade CACHE`), which rewrites only its manifest.

The field names of `ReplayViews` are those of stage one's `precompute.views.ViewConfig`, so that
replaying is `from_dict(ViewConfig, to_dict(spec.views))`; a test pins the two field lists together.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cache_format.errors import CacheVersionError, ConfigError
from cache_format.serde import from_dict, to_dict

REPLAY_VERSION = 1
#: What a user runs to give an older cache this section (the hint of every "no replay" error).
UPGRADE_COMMAND = "dune-cache upgrade"


@dataclass(frozen=True, kw_only=True)
class ReplayViews:
    """How views were drawn and rendered (`precompute.views.ViewConfig`'s fields, all required)."""

    mode: str
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_p: float
    jitter: tuple[float, float, float, float]
    jitter_p: float
    grayscale_p: float
    blur_p: float
    blur_sigma: tuple[float, float]
    blur_kernel_size: int
    solarize_p: float
    solarize_threshold: float


@dataclass(frozen=True, kw_only=True)
class ReplayDataset:
    """Where one dataset's images are, how they were listed and decoded, and its domain.

    `kind` "folder" | "list" | "hdf5"; `root` the folder or HDF5 file; `list_file` (kind list),
    `hdf5_key` (kind hdf5); `max_images` the build kept only the first N images; `max_pixels`
    and `unusual_modes` the decoding settings every pixel must be decoded with again.
    """

    kind: str
    root: str
    domain: str
    max_pixels: int
    unusual_modes: str
    list_file: str | None = None
    hdf5_key: str | None = None
    max_images: int | None = None


@dataclass(frozen=True, kw_only=True)
class ReplaySpec:
    """The replay section of a manifest (see the module docstring).

    `teacher_domains`: each teacher's effective domain (never empty: the registry's default
    already applied). `generic_domains`: the domains whose images every teacher trains on under
    `own+generic` sharing, as the build resolved them (at least one).
    """

    version: int = REPLAY_VERSION
    seed: int
    views_per_image: int
    views: ReplayViews
    datasets: dict[str, ReplayDataset]
    teacher_domains: dict[str, str]
    generic_domains: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.seed < 0 or self.views_per_image < 1:
            raise ConfigError(
                f"replay: expected seed >= 0 and views_per_image >= 1, found seed={self.seed}, "
                f"views_per_image={self.views_per_image}"
            )
        if not self.generic_domains:
            raise ConfigError("replay.generic_domains: expected at least one domain, found none")
        empty = sorted(t for t, d in self.teacher_domains.items() if not d)
        if empty:
            raise ConfigError(f"replay.teacher_domains: teachers {empty} have an empty domain "
                              "(store the effective domain)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored as the manifest's `replay`)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "manifest.replay") -> ReplaySpec:
        """Parse a stored section; a newer or unreadable one raises CacheVersionError."""
        version = data.get("version") if isinstance(data, Mapping) else None
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CacheVersionError(f"{where}: no valid version (found {version!r})",
                                    hint=f"rewrite it with `{UPGRADE_COMMAND} CACHE`")
        if version > REPLAY_VERSION:
            raise CacheVersionError(
                f"{where}: version {version}, but this dune-distill reads replay sections up to "
                f"version {REPLAY_VERSION}",
                hint="upgrade dune-distill (pip install -U dune-distill) to train from this cache",
            )
        try:
            return from_dict(cls, dict(data), where=where)
        except ConfigError as exc:
            raise CacheVersionError(
                f"{where}: cannot be read by this version ({exc})",
                hint=f"rewrite it with `{UPGRADE_COMMAND} CACHE`, or rebuild the cache",
            ) from None


def missing_replay_error(where: str) -> CacheVersionError:
    """The error for a cache without a replay section (written before it existed)."""
    return CacheVersionError(
        f"{where}: the manifest has no replay section (the view settings, dataset sources and "
        "domains training needs); the cache was written by an older dune-distill",
        hint=f"run `{UPGRADE_COMMAND} {where}` once: it rewrites only the manifest",
    )
