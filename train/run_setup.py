"""Everything a run sets up before step 0: processes, the cache and its checks, the run folder.

The cache is opened read-only and compared with the run before anything is built: the student's
grid at its image size must be the cache's grid, the chosen teachers and datasets must exist,
and a teacher whose checkpoint hash differs from the one the run expects is refused. A rerun in
an existing run folder is compared with what the folder recorded (config and the cache's
fingerprints): a different run never silently continues another one's checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from cache_format.errors import CacheMismatchError, CheckpointError, ConfigError
from cache_format.reader import open_cache
from cache_format.serde import to_dict
from precompute.config import CacheBuildConfig
from train.checkpoint import load_checkpoint
from train.config import TrainConfig, resume_differences
from train.data import CacheTrainData, collate_cached
from train.export import CONFIG_FILE, TEACHERS_FILE
from train.model import DistillModel, TeacherHead
from train.sampling import ViewEpochSampler
from train.student import build_student
from train.targets import CachedTargets, OnlineTargets


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def device_ids(self) -> list[int] | None:
        """What DistributedDataParallel wants: the CUDA device index, None on CPU."""
        return [self.device.index] if self.device.type == "cuda" else None


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA), pick the device and set
    deterministic algorithms when asked."""
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls; must be set before CUDA init.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        # On CPU the loader workers need cores too: more compute threads than free cores make
        # every parallel region wait for a descheduled thread (measured: 8x slower on 2 cores).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        free = (os.cpu_count() or 1) // max(1, local_world) - cfg.data.num_workers
        torch.set_num_threads(max(1, min(torch.get_num_threads(), free)))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


@dataclass
class RunContext:
    """What the run read from the cache: data, sampler, teachers, statistics, targets."""

    reader: Any
    manifest: Any
    heads: dict[str, TeacherHead]
    domains: dict[str, str]
    generic_domain: str | None
    stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]
    train_data: Any
    heldout_data: Any | None
    sampler: ViewEpochSampler
    collate: Callable[[list[Any]], Any]
    make_targets: Callable[[torch.device], Callable[[Any], dict[str, dict[str, torch.Tensor]]]]
    student_mean: tuple[float, float, float]
    student_std: tuple[float, float, float]
    fingerprint: dict[str, Any]


def open_run_data(cfg: TrainConfig, dist_info: DistInfo) -> RunContext:
    """Open the cache, check it against the run, and build the data, sampler and targets."""
    reader = open_cache(cfg.data.cache)
    manifest = reader.manifest
    teachers = list(cfg.data.teachers) or list(manifest.teachers)
    datasets = list(cfg.data.datasets) or list(manifest.datasets)
    _check_names("teachers", teachers, list(manifest.teachers), cfg.data.cache)
    _check_names("datasets", datasets, list(manifest.datasets), cfg.data.cache)
    # The student's grid: built on the meta device, so that checking costs no memory.
    with torch.device("meta"):
        student = build_student(cfg.student)
    if tuple(student.grid) != tuple(manifest.grid) or student.patch_size != manifest.student_patch:
        cached_size = manifest.grid[0] * manifest.student_patch
        raise CacheMismatchError(
            f"{cfg.data.cache}: the cache was built for grid {tuple(manifest.grid)} "
            f"(student patch {manifest.student_patch}, {cached_size} px), but the student "
            f"{cfg.student.arch} at img_size {cfg.student.img_size} has grid {student.grid} "
            f"(patch {student.patch_size})",
            hint=f"set student.img_size = {cached_size} with a /{manifest.student_patch} "
            "student, or build a cache for this grid",
        )
    for teacher, sha in cfg.data.expect_checkpoint_sha256.items():
        if teacher not in manifest.teachers:
            raise CacheMismatchError(
                f"data.expect_checkpoint_sha256: teacher {teacher!r} is not in the cache "
                f"{cfg.data.cache} (it has {sorted(manifest.teachers)})"
            )
        found = manifest.teachers[teacher].checkpoint_sha256
        if found != sha:
            raise CacheMismatchError(
                f"{cfg.data.cache}: teacher {teacher!r} was cached from a checkpoint with "
                f"sha256 {found}, but the run expects {sha}",
                hint="rebuild the cache with the expected weights, or fix "
                "data.expect_checkpoint_sha256",
            )
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
            for tok in (("cls", "patch") if heads[t].has_cls else ("patch",))
        }
        for t in teachers
    }
    # Online runs compute targets live: the loader then reads no tokens at all.
    data_args = dict(
        roots=cfg.data.roots, heldout_images=cfg.data.heldout_images,
        img_size=cfg.student.img_size, student_patch=student.patch_size,
        read_tokens=not cfg.online,
    )
    train_data = CacheTrainData(reader, teachers, datasets, split="train", **data_args)
    heldout_data = None
    if cfg.data.heldout_images > 0:
        heldout_data = CacheTrainData(reader, teachers, datasets, split="heldout", **data_args)
    sampler = ViewEpochSampler(
        train_data, cfg.seed, cfg.data.sampling, cfg.epoch_size,
        rank=dist_info.rank, world_size=dist_info.world_size,
        batch_size=cfg.batch_size // dist_info.world_size,
    )
    build = CacheBuildConfig.from_dict(manifest.build_config)
    domains = {t: build.teacher(t).effective_domain() for t in teachers}

    def make_targets(device: torch.device) -> Callable[[Any], dict[str, dict[str, torch.Tensor]]]:
        if cfg.online:
            return OnlineTargets(manifest, teachers, device)
        return CachedTargets(reader, teachers, device)

    pretrained = getattr(student.vit, "pretrained_cfg", None) or {}
    return RunContext(
        reader=reader,
        manifest=manifest,
        heads=heads,
        domains=domains,
        generic_domain=build.generic_domains()[0],
        stats=stats,
        train_data=train_data,
        heldout_data=heldout_data,
        sampler=sampler,
        collate=collate_cached,
        make_targets=make_targets,
        student_mean=tuple(pretrained.get("mean", IMAGENET_DEFAULT_MEAN)),
        student_std=tuple(pretrained.get("std", IMAGENET_DEFAULT_STD)),
        fingerprint=cache_fingerprint(manifest, teachers, datasets),
    )


def _check_names(what: str, wanted: list[str], available: list[str], cache: str) -> None:
    missing = [name for name in wanted if name not in available]
    if missing:
        raise CacheMismatchError(
            f"data.{what}: {missing} not in the cache {cache} (it has {available})",
            hint=f"pick {what} the cache holds, or add them to the cache with `dune-cache build`",
        )


def _stats_tensors(stats: Any) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(stats.mean, dtype=torch.float32)
    std = torch.as_tensor(stats.std, dtype=torch.float32)
    return mean, std


def cache_fingerprint(manifest: Any, teachers: list[str], datasets: list[str]) -> dict[str, Any]:
    """The part of a cache's manifest a run depends on (recorded in the run folder)."""
    return {
        "grid": list(manifest.grid),
        "student_patch": manifest.student_patch,
        "views_per_image": manifest.views_per_image,
        "encoding": to_dict(manifest.encoding),
        "teachers": {t: to_dict(manifest.teachers[t]) for t in teachers},
        "datasets": {d: to_dict(manifest.datasets[d]) for d in datasets},
    }


def write_run_files(run_dir: Path, cfg: TrainConfig, ctx: RunContext) -> None:
    """config.json (the resolved config) and teachers.json (heads + cache fingerprint)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    teachers = {
        "heads": {n: {"dim": h.dim, "has_cls": h.has_cls} for n, h in ctx.heads.items()},
        "domains": ctx.domains,
        "cache": cfg.data.cache,
        "cache_fingerprint": ctx.fingerprint,
    }
    (run_dir / TEACHERS_FILE).write_text(json.dumps(teachers, indent=2) + "\n")


def check_resume(run_dir: Path, cfg: TrainConfig, ctx: RunContext) -> None:
    """Refuse to resume a run folder written by a different config or cache."""
    config_file, teachers_file = run_dir / CONFIG_FILE, run_dir / TEACHERS_FILE
    if not config_file.is_file() or not teachers_file.is_file():
        raise CheckpointError(
            f"{run_dir}: has a checkpoint but no {CONFIG_FILE} / {TEACHERS_FILE}",
            hint="this folder was not written by dune-train fit; pick another --out",
        )
    diffs = resume_differences(json.loads(config_file.read_text()), cfg.to_dict())
    if diffs:
        raise ConfigError(
            f"{run_dir}: the run there used another config; differing fields: "
            + "; ".join(diffs[:8]),
            hint="rerun with the same config (only max_steps, intervals, paths may change), "
            "or pass a new --out to start a new run",
        )
    stored = json.loads(teachers_file.read_text()).get("cache_fingerprint")
    if stored != json.loads(json.dumps(ctx.fingerprint)):
        raise CacheMismatchError(
            f"{run_dir}: the run there trained on a cache with other contents than "
            f"{cfg.data.cache} (grid, encoding, teacher or dataset fingerprints differ)",
            hint="resume with the cache the run started with, or pass a new --out",
        )


def init_model_from(model: DistillModel, path: str) -> None:
    """Initialise from a run checkpoint (.pt), an exported full model or a student (.safetensors).

    The student's position embeddings are interpolated to its grid (the 336 -> 448 stage);
    projectors are taken for the teachers whose names and widths match, the others stay new.
    """
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        state = load_checkpoint(path)["model"]
    student_state = {
        k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")
    }
    if not student_state and not any(k.startswith(("blocks.", "vit.blocks.")) for k in state):
        raise CheckpointError(
            f"{path}: holds no student weights (no 'student.*' or timm ViT keys)",
            hint="init_from takes a run's checkpoints/*.pt, or an exported *.safetensors",
        )
    model.student.load_encoder_state(student_state or state)
    for name, projector in model.projectors.items():
        prefix = f"projectors.{name}."
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        own = projector.state_dict()
        if part and part.keys() == own.keys() and all(part[k].shape == own[k].shape for k in own):
            projector.load_state_dict(part)
