"""Small synthetic caches for tests (ours and other modules'): build one in milliseconds.

`build_tiny_cache` writes a complete cache (index, token shards, finalized statistics) from
synthetic activations shaped like a transformer's (a few outlier channels 50-200x the median),
and returns the float32 tokens it wrote so a test can compare what it reads back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cache_format.encodings import EncodingSpec, fit_calibration
from cache_format.manifest import (
    STATUS_OK,
    TOKEN_TYPES,
    DatasetFingerprint,
    Manifest,
    TeacherFingerprint,
    keys_sha256,
    status_code,
)
from cache_format.writer import CacheWriter

VIEW_PARAM_NAMES = ("x0", "y0", "x1", "y1", "flip")


def tiny_manifest(encoding: EncodingSpec | None = None, *, grid: tuple[int, int] = (4, 4),
                  views_per_image: int = 2, samples_per_shard: int = 4, seed: int = 0
                  ) -> Manifest:
    """A manifest without teachers or datasets (what CacheWriter.create takes)."""
    return Manifest(grid=grid, student_patch=14, views_per_image=views_per_image,
                    view_mode="random_resized_crop", seed=seed,
                    samples_per_shard=samples_per_shard,
                    encoding=encoding or EncodingSpec("int8"),
                    view_param_names=VIEW_PARAM_NAMES, build_config={"note": "test"})


def tiny_teacher(name: str = "t1", dim: int = 32,
                 token_types: tuple[str, ...] = TOKEN_TYPES) -> TeacherFingerprint:
    """A teacher fingerprint with made-up facts."""
    return TeacherFingerprint(name=name, arch="tiny_vit", checkpoint_sha256="0" * 64,
                              input_size=(56, 56), patch_size=14, mean=(0.5, 0.5, 0.5),
                              std=(0.5, 0.5, 0.5), token_types=token_types, dim=dim)


def tiny_dataset(name: str = "ds", num_images: int = 5) -> tuple[DatasetFingerprint, list[str]]:
    """A dataset fingerprint and its keys."""
    keys = [f"{name}/img_{i:04d}.jpg" for i in range(num_images)]
    return DatasetFingerprint(name=name, source_kind="folder", root=f"/data/{name}",
                              num_images=num_images, keys_sha256=keys_sha256(keys),
                              domain="2d"), keys


def synthetic_activations(rng: np.random.Generator, shape: tuple[int, ...],
                          n_outliers: int = 4) -> np.ndarray:
    """float32 activations [..., D]: unit channels with offsets, plus `n_outliers` channels
    50-200x larger (as pretrained transformers have), fixed by channel for a given rng seed."""
    dim = shape[-1]
    channel_rng = np.random.default_rng(1234)  # same outlier channels for every call
    scale = channel_rng.uniform(0.5, 1.5, dim).astype(np.float32)
    offset = channel_rng.normal(0, 0.5, dim).astype(np.float32)
    outliers = channel_rng.choice(dim, size=min(n_outliers, dim), replace=False)
    scale[outliers] *= channel_rng.uniform(50, 200, outliers.size).astype(np.float32)
    offset[outliers] *= 20
    return rng.standard_normal(shape, dtype=np.float32) * scale + offset


@dataclass(frozen=True)
class WrittenPair:
    """What build_tiny_cache wrote for one (dataset, teacher): tokens and the valid mask."""

    tokens: dict[str, np.ndarray]
    valid: np.ndarray


def build_tiny_cache(path: str | os.PathLike[str], encoding: EncodingSpec | None = None, *,
                     teachers: Sequence[TeacherFingerprint] | None = None,
                     datasets: Sequence[tuple[str, int]] = (("ds", 5),),
                     invalid: Sequence[int] = (3,), seed: int = 0,
                     manifest: Manifest | None = None) -> dict[tuple[str, str], WrittenPair]:
    """Write a complete cache; samples listed in `invalid` get status "truncated"."""
    manifest = manifest or tiny_manifest(encoding)
    teachers = list(teachers) if teachers is not None else [tiny_teacher()]
    rng = np.random.default_rng(seed)
    writer = CacheWriter.create(path, manifest)
    written: dict[tuple[str, str], WrittenPair] = {}
    for name, num_images in datasets:
        fingerprint, keys = tiny_dataset(name, num_images)
        writer.add_dataset(fingerprint, keys)
        n = writer.num_samples(name)
        valid = np.ones(n, dtype=bool)
        valid[[i for i in invalid if i < n]] = False
        status = np.where(valid, STATUS_OK, status_code("truncated")).astype(np.uint8)
        view_params = rng.uniform(0, 1, (n, len(manifest.view_param_names))).astype(np.float32)
        for shard in range(writer.num_shards(name)):
            start, stop = writer.shard_bounds(name, shard)
            writer.write_index_shard(name, shard, view_params[start:stop], status[start:stop])
        writer.finalize_index(name)
        for teacher in teachers:
            tokens = {"patch": synthetic_activations(rng, (n, manifest.num_tokens, teacher.dim))}
            if teacher.has_cls:
                tokens["cls"] = synthetic_activations(rng, (n, teacher.dim))
            calibration = {tok: fit_calibration(x) for tok, x in tokens.items()}
            writer.add_teacher(name, teacher, calibration)
            for shard in range(writer.num_shards(name)):
                start, stop = writer.shard_bounds(name, shard)
                writer.write_shard(name, teacher.name, shard,
                                   {tok: x[start:stop] for tok, x in tokens.items()},
                                   valid[start:stop])
            writer.finalize_stats(name, teacher.name)
            written[(name, teacher.name)] = WrittenPair(tokens, valid)
    return written
