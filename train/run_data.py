"""What a run reads from its cache before step 0: the pre-flight, data, sampler and targets.

`open_run_data` opens the cache read-only, runs the pre-flight once (`train.preflight`: every
way the cache does not fit the run, reported together) and then builds the training and
held-out datasets, the epoch sampler, the teachers' exact statistics and the targets factory.
A cached run imports only `cache_format` and the view-replay code of stage one; online targets
import the teachers when they are built (`train.targets`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cache_format.completeness import require_complete
from cache_format.manifest import Manifest
from cache_format.reader import CacheReader, open_cache
from cache_format.stats import ChannelStats
from train.batch import Batch, collate_cached
from train.config import TrainConfig
from train.data import CacheTrainData
from train.distributed import DistInfo
from train.model import DistillModel, TeacherHead
from train.preflight import preflight
from train.sampling import ViewEpochSampler
from train.shard_sampling import ShardWindowOrder
from train.step import DistillStep
from train.student import build_student
from train.targets import CachedTargets, OnlineTargets, Targets


@dataclass
class RunContext:
    """What the run read from the cache: data, sampler, teachers, statistics, targets."""

    reader: CacheReader
    manifest: Manifest
    heads: dict[str, TeacherHead]
    datasets: tuple[str, ...]
    domains: dict[str, str]
    generic_domain: str
    stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    train_data: CacheTrainData
    heldout_data: CacheTrainData | None
    sampler: ViewEpochSampler
    collate: Callable[[list[Any]], Batch]
    make_targets: Callable[[torch.device], Callable[[Batch], Targets]]
    student_mean: tuple[float, float, float]
    student_std: tuple[float, float, float]

    def distill_step(self, model: DistillModel, device: torch.device, *, amp: bool
                     ) -> DistillStep:
        """The run's one `DistillStep` over this data (training and `dune-train eval` alike):
        its targets on `device`, the teachers in batch order, the student's pixel
        normalization, bf16 autocast on CUDA when `amp`."""
        return DistillStep(
            model, self.make_targets(device), list(self.heads), self.student_mean,
            self.student_std, device,
            autocast_dtype=torch.bfloat16 if device.type == "cuda" and amp else None,
        )


def _warn_heldout_capped(count: int, manifest: Manifest, datasets: Sequence[str]) -> None:
    """Say so when `data.heldout_images` exceeds what a dataset allows (half its images), rather
    than hold out fewer images in silence (`train.data.heldout_image_indices` caps it)."""
    for name in datasets:
        images = manifest.datasets[name].num_images
        if count > images // 2:
            logging.getLogger("dune.train").warning(
                "warning: data.heldout_images = %d but dataset %s has %d images, so only %d "
                "(half) are held out; set data.heldout_images <= %d to keep this quiet",
                count, name, images, images // 2, images // 2)


def say_unchecked(check: bool, location: str, datasets: Sequence[str],
                  checked: Sequence[str]) -> None:
    """One info line when some source images are not checked against the cache's content
    fingerprints: the check is off, or the cache recorded none for those datasets (built before
    fingerprints, or upgraded from version 1). Never an error: such caches train as before."""
    unchecked = [d for d in datasets if d not in checked]
    if not unchecked:
        return
    if not check:
        why = "data.check_source_fingerprints = false"
    else:
        why = ("the cache records no source fingerprints for them (built before fingerprints, "
               "or upgraded from format 1; rebuild to get them)")
    # Printed, like the run's sizes: an info line, which no logging handler would show.
    print(f"info: the source images of {', '.join(unchecked)} in {location} are not checked "
          f"against their content at build time: {why}", flush=True)


def open_run_data(cfg: TrainConfig, dist_info: DistInfo) -> RunContext:
    """Open the cache, check it against the run, and build the data, sampler and targets."""
    reader = open_cache(cfg.data.cache, shard_cache_dir=cfg.data.shard_cache_dir or None,
                        shard_cache_bytes=cfg.data.shard_cache_bytes)
    manifest = reader.manifest
    # The student's patch: built on the meta device, so that checking costs no memory.
    with torch.device("meta"):
        student = build_student(cfg.student)
    checked = preflight(cfg, manifest, reader.location, student_patch=student.patch_size)
    teachers, datasets = list(checked.teachers), list(checked.datasets)
    # Everything planned for these datasets is there (a teacher whose add_teacher died, a
    # summary that disagrees): refused in one line, before anything reads tokens.
    require_complete(reader, datasets)
    heads = {
        t: TeacherHead(dim=manifest.teachers[t].dim, has_cls=manifest.teachers[t].has_cls)
        for t in teachers
    }
    # Exact statistics of each teacher over the selected datasets it has features for.
    stats = {
        t: {
            tok: _stats_tensors(
                reader.stats(t, tok, [d for d in datasets if d in reader.datasets_for(t)])
            )
            for tok in heads[t].token_types
        }
        for t in teachers
    }
    # Online runs compute targets live: the loader then reads no tokens at all.
    data_args = dict(
        roots=cfg.data.roots, heldout_images=cfg.data.heldout_images,
        img_size=cfg.student.img_size, student_patch=student.patch_size,
        read_tokens=not cfg.online, check_source_fingerprints=cfg.data.check_source_fingerprints,
    )
    if dist_info.rank == 0:
        _warn_heldout_capped(cfg.data.heldout_images, manifest, datasets)
    train_data = CacheTrainData(reader, teachers, datasets, split="train", **data_args)
    if dist_info.rank == 0:
        say_unchecked(cfg.data.check_source_fingerprints, reader.location, datasets,
                      train_data.fingerprint_datasets)
    heldout_data = None
    if cfg.data.heldout_images > 0:
        heldout_data = CacheTrainData(reader, teachers, datasets, split="heldout", **data_args)
    order = None
    if cfg.data.shard_window:
        order = ShardWindowOrder(train_data.items, manifest.images_per_shard,
                                 cfg.data.shard_window)
    sampler = ViewEpochSampler(
        train_data, cfg.seed, cfg.data.sampling, cfg.epoch_samples(),
        rank=dist_info.rank, world_size=dist_info.world_size,
        batch_size=cfg.global_batch(dist_info.world_size) // dist_info.world_size,
        order=order,
    )

    def make_targets(device: torch.device) -> Callable[[Batch], Targets]:
        if cfg.online:
            return OnlineTargets(manifest, teachers, device)
        return CachedTargets(reader, teachers, device)

    student_mean, student_std = student.pixel_mean_std
    return RunContext(
        reader=reader,
        manifest=manifest,
        heads=heads,
        datasets=checked.datasets,
        domains=checked.teacher_domains,
        generic_domain=checked.generic_domain,
        stats=stats,
        train_data=train_data,
        heldout_data=heldout_data,
        sampler=sampler,
        collate=collate_cached,
        make_targets=make_targets,
        student_mean=student_mean,
        student_std=student_std,
    )


def _stats_tensors(stats: ChannelStats) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(stats.mean, dtype=torch.float32)
    std = torch.as_tensor(stats.std, dtype=torch.float32)
    return mean, std
