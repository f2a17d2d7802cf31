"""Replaying a cached view for the student: the one place stage two uses stage one's view code.

Everything comes from the manifest's replay section (`cache_format.replay.ReplaySpec`): the view
settings become stage one's `ViewConfig`, each dataset's source description its `DatasetConfig`,
opened with the build's decoding settings so that every pixel decodes as the teachers saw it.
Only the view-replay modules of `precompute` are imported (`views`, `view_params`, `render`,
`sources` with `url_files`, `decode`): never its config, builder or teachers.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from cache_format.errors import BadImageError, CacheMismatchError, CacheVersionError
from cache_format.manifest import DatasetFingerprint
from cache_format.replay import ReplaySpec
from cache_format.serde import from_dict, to_dict
from cache_format.source_fingerprint import KNOWN_ALGORITHMS, hex_of
from precompute.dataset_keys import DatasetConfig
from precompute.render import render_view
from precompute.sources import HDF5Source, ImageSource, open_source
from precompute.view_params import check_replay
from precompute.views import ViewConfig, sample_view
from train.source_checks import file_identity, remember_checked, was_checked


def view_config(spec: ReplaySpec) -> ViewConfig:
    """The build's view settings as stage one's `ViewConfig` (its checks run again)."""
    return from_dict(ViewConfig, to_dict(spec.views), where="manifest.replay.views")


def open_replay_source(
    spec: ReplaySpec, fingerprint: DatasetFingerprint, location: str, root: str | None = None
) -> ImageSource:
    """Open where a dataset's images are now (`root` overrides the build's) and check that they
    are the ones the cache was built from (same count, same ordered key hash). A local HDF5
    file that passed this check before, unchanged since, is not listed again
    (`train.source_checks`); an HDF5 source comes back without its key list either way."""
    name = fingerprint.name
    stored = spec.datasets[name]
    cfg = DatasetConfig(
        name=name, kind=stored.kind, root=str(root) if root is not None else stored.root,
        domain=stored.domain, list_file=stored.list_file, hdf5_key=stored.hdf5_key,
        max_images=stored.max_images,
    )
    decoding = {"max_pixels": stored.max_pixels, "unusual_modes": stored.unusual_modes}
    if was_checked(cfg, fingerprint):  # this very file passed before (train.source_checks)
        unlisted = HDF5Source.unlisted(cfg, fingerprint.keys_sha256, **decoding)
        if len(unlisted) == fingerprint.num_images:
            return unlisted
    identity = file_identity(cfg)
    source = open_source(cfg, **decoding)
    # The source hashed its keys while listing them: no second list of every key is made here.
    if len(source) != fingerprint.num_images or source.keys_sha256 != fingerprint.keys_sha256:
        raise CacheMismatchError(
            f"dataset {name}: the images under {cfg.root!r} are not the ones the cache "
            f"{location} was built from (found {len(source)} images with key hash "
            f"{source.keys_sha256[:12]}..., the cache has {fingerprint.num_images} with "
            f"{fingerprint.keys_sha256[:12]}...)",
            hint=f"point roots.{name} at the original images, or rebuild the cache",
        )
    remember_checked(cfg, fingerprint, identity)
    if isinstance(source, HDF5Source):  # replay finds rows by index: no key list held
        return HDF5Source.unlisted(cfg, source.keys_sha256, **decoding)
    return source


#: The config field that turns the source fingerprint check off (named in messages).
CHECK_FIELD = "data.check_source_fingerprints"


def fingerprint_algorithm(fingerprint: DatasetFingerprint, location: str) -> str:
    """The algorithm of the source fingerprints the cache recorded for a dataset ("" for none:
    caches built before fingerprints, upgraded version-1 caches). One this code cannot compute
    was written by a newer dune-distill: refused (CacheVersionError), never taken for changed
    images."""
    algorithm = fingerprint.source_fingerprint
    if algorithm and algorithm not in KNOWN_ALGORITHMS:
        raise CacheVersionError(
            f"dataset {fingerprint.name}, cache {location}: source fingerprints recorded with "
            f"{algorithm!r}; this dune-distill checks {', '.join(KNOWN_ALGORITHMS)}",
            hint=f"upgrade dune-distill, or set {CHECK_FIELD} = false to skip the check")
    return algorithm


def replay_view(
    source: ImageSource,
    spec: ReplaySpec,
    views: ViewConfig,
    sample: int,
    stored: np.ndarray,
    out_hw: tuple[int, int],
    where: str,
    fingerprint: int | None = None,
) -> Tensor:
    """The student's view of `sample` of `source`'s dataset, sampled again with the build's seed
    and settings, checked against its stored row, rendered at `out_hw` (float32 in [0, 1]).

    `fingerprint`: the image's content fingerprint as the cache's index recorded it (None: not
    checked); the file's bytes are checksummed as they are read, and other content is refused
    (a same-size replacement would otherwise replay the same view against stale tokens)."""
    image_index, view_index = divmod(int(sample), spec.views_per_image)
    name = source.cfg.name
    try:
        if fingerprint is None:
            image = source.load(image_index)
        else:
            image, found = source.load_fingerprinted(image_index)
    except BadImageError as exc:
        raise CacheMismatchError(
            f"dataset {name}, sample {sample}: the source image was usable when the cache was "
            f"built but now fails ({exc})",
            hint="restore the original image file",
        ) from exc
    if fingerprint is not None and found != fingerprint:
        raise CacheMismatchError(
            f"dataset {name}, cache {where}: source image {source.location(image_index)} is not "
            f"the one the cache was built from (content fingerprint {hex_of(found)}, the cache "
            f"recorded {hex_of(fingerprint)}): its cached teacher tokens describe another picture",
            hint=f"restore the original images, or rebuild dataset {name} into a new cache "
            f"(`dune-cache build`), or set {CHECK_FIELD} = false to train on the stale tokens",
        )
    params = sample_view(
        spec.seed, name, image_index, view_index, (int(image.shape[1]), int(image.shape[2])), views
    )
    check_replay(stored, params,
                 where=f"{where}: dataset {name}, sample {sample} (image {image_index}, "
                 f"view {view_index})")
    return render_view(image, params, out_hw)
