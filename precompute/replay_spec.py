"""The manifest's replay section, derived from a build config (stage one's side of the contract).

The builder stores `replay_spec_from_build_config(config.to_dict())` in every manifest it writes;
`dune-cache upgrade` calls the same function on the `build_config` an older cache stored, so an
old cache gets exactly the section a new build of the same config would have. The stored config
is parsed as the builder's own `CacheBuildConfig`, so that the effective domains and the generic
domains follow the builder's rules (one copy of each); it therefore needs the teacher kinds the
cache was built with to still be registered, which holds when a cache is upgraded by the release
that introduced the section. Training never calls this: it reads the section.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cache_format.errors import ConfigError
from cache_format.replay import REPLAY_VERSION, ReplayDataset, ReplaySpec, ReplayViews
from cache_format.serde import from_dict, to_dict
from precompute.config import CacheBuildConfig


def replay_spec_from_build_config(build_config: Mapping[str, Any],
                                  where: str = "build_config") -> ReplaySpec:
    """The replay section of a cache built with `build_config` (a `CacheBuildConfig.to_dict()`,
    as the manifest stores it). An unreadable config is a ConfigError naming the field."""
    if not isinstance(build_config, Mapping) or not build_config:
        raise ConfigError(f"{where}: expected the stored build config, found {build_config!r}",
                          hint="rebuild the cache with `dune-cache build`")
    try:
        config = CacheBuildConfig.from_dict(build_config)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}", hint=exc.hint) from None
    decoding = config.build
    return ReplaySpec(
        version=REPLAY_VERSION,
        seed=config.seed,
        views_per_image=config.views_per_image,
        views=from_dict(ReplayViews, to_dict(config.views), where=f"{where}.views"),
        datasets={
            d.name: ReplayDataset(
                kind=d.kind, root=d.root, domain=d.domain, list_file=d.list_file,
                hdf5_key=d.hdf5_key, max_images=d.max_images,
                max_pixels=decoding.max_pixels, unusual_modes=decoding.unusual_modes,
            )
            for d in config.datasets
        },
        teacher_domains={t.name: t.effective_domain() for t in config.teachers},
        generic_domains=config.generic_domains(),
    )
