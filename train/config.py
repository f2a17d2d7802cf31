"""`TrainConfig`: everything one `dune-train fit` run depends on, as one frozen dataclass.

A run is described by a TOML file whose tables mirror the nested parts below (`[student]`,
`[projector]`, `[norm]`, `[dropping]`, `[data]`, `[optim]`, top-level keys for the loop). The
command line overrides a few fields (`--cache`, `--out`, `--online`, `--max-steps`) through
`cache_format.configfile.with_overrides`, the mechanism `dune-cache build` uses too; every field
is type-checked from its annotation (`cache_format.serde.from_dict`), with the dotted field
named. The run folder stores `to_dict()` of the resolved config (absolute paths), and
a rerun of the same command compares its own resolved config with the stored one before it
resumes: only fields that cannot change the trajectory
(`train.run_folder.RESUME_FREE_FIELDS`) may differ.

Relative paths in the TOML file are taken from the file's folder (as in `dune-cache build`
configs), so a config works from any directory; paths given on the command line are relative
to the current directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cache_format.configfile import annotation_at, apply_overrides, load_config
from cache_format.errors import ConfigError
from cache_format.manifest import check_node_name
from cache_format.serde import PathStr, check_choice, check_types, convert, from_dict, to_dict
from train.projectors import PROJECTOR_KINDS
from train.sampling import SAMPLING_MODES
from train.sinks import LoggingConfig
from train.student import StudentConfig
from train.teacher_dropping import check_dropping
from train.teacher_norm import NORM_MODES

#: Named epoch sizes: the reference calls 1,281,167 images (ImageNet-1k's train split) an epoch.
EPOCH_SIZES: dict[str, int] = {"imagenet-1k": 1_281_167}
#: Global batch when the config names none (kept from the days of one `batch_size` key).
DEFAULT_GLOBAL_BATCH = 128
#: Fields a stage may not override: the student's shape carries over from stage to stage, and
#: the run's folder, stages and initial weights belong to the whole run.
STAGE_FIXED_FIELDS = (
    "student.arch", "student.embed_dim", "student.depth", "student.num_heads",
    "projector", "out_dir", "stages", "init_from",
)


@dataclass(frozen=True)
class ProjectorConfig:
    """One projector per teacher: `tp` (Transformer Projector), `mlp` or `linear`."""

    kind: str = "tp"
    n_blocks: int = 1

    def __post_init__(self) -> None:
        check_types(self, "projector")
        check_choice(self.kind, PROJECTOR_KINDS, "projector.kind")
        if self.n_blocks < 0:
            raise ConfigError(f"projector.n_blocks: expected >= 0, found {self.n_blocks}")


@dataclass(frozen=True)
class NormConfig:
    """Teacher normalization: the cache's `exact` statistics or the reference's `batch` ones."""

    mode: str = "exact"

    def __post_init__(self) -> None:
        check_types(self, "norm")
        check_choice(self.mode, NORM_MODES, "norm.mode")


@dataclass(frozen=True)
class DroppingConfig:
    """Teacher dropping (UNIC): which teacher losses count for each image."""

    strategy: str = "lowest_loss"
    p: float = 0.5

    def __post_init__(self) -> None:
        check_types(self, "dropping")
        check_dropping(self.strategy, self.p)


@dataclass(frozen=True)
class DataConfig:
    """Which cache, which of its teachers and datasets, and how batches are drawn.

    `teachers` / `datasets` empty = all of the cache's. `roots` maps a dataset name to the folder
    its source images live in now, when they moved since the cache was built.
    `expect_checkpoint_sha256` maps a teacher to the checkpoint hash the run requires: a cache
    built from other weights is refused before step 0. `heldout_images` images per dataset are
    kept out of training and used for the held-out loss and cosine. `shard_window` = W >= 1
    orders each epoch by the cache's shards, images shuffled within windows of W shards
    (`train.shard_sampling`: a loader reading a remote cache then fetches whole shards); 0
    keeps the order of images.

    A remote cache (a URL) is read through a local shard cache when `shard_cache_dir` is set: a
    folder on the node's disk holding at most `shard_cache_bytes` of whole token shard files
    (least recently used evicted first), shared by the node's DataLoader workers.
    `prefetch_shards` > 0 fetches that many upcoming shards of the epoch's order into it in the
    background (docs/remote.md). All three are ignored for a local cache.
    `check_source_fingerprints`: each source image read to replay a view is checksummed and
    refused when its content is not the one the cache was built from (the cache's index records
    a fingerprint per image); false trains on whatever the files hold now.
    """

    cache: PathStr = ""
    teachers: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    roots: dict[str, PathStr] = field(default_factory=dict)
    sampling: str = "teacher_balanced"
    heldout_images: int = 8
    shard_window: int = 0
    num_workers: int = 2
    expect_checkpoint_sha256: dict[str, str] = field(default_factory=dict)
    shard_cache_dir: PathStr = ""
    shard_cache_bytes: int = 0
    prefetch_shards: int = 0
    check_source_fingerprints: bool = True

    def __post_init__(self) -> None:
        check_types(self, "data")
        check_choice(self.sampling, SAMPLING_MODES, "data.sampling")
        if self.heldout_images < 0:
            raise ConfigError(f"data.heldout_images: expected >= 0, found {self.heldout_images}")
        if self.shard_window < 0:
            raise ConfigError(
                f"data.shard_window: expected 0 (order by images) or a number of shards >= 1, "
                f"found {self.shard_window}"
            )
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: expected >= 0, found {self.num_workers}")
        if self.shard_cache_bytes < 0 or (self.shard_cache_dir and self.shard_cache_bytes < 1):
            raise ConfigError(
                f"data.shard_cache_bytes: expected >= 1 with data.shard_cache_dir set "
                f"({self.shard_cache_dir!r}), found {self.shard_cache_bytes}",
                hint="the local shard cache's size in bytes, e.g. 200_000_000_000 for 200 GB")
        if self.prefetch_shards < 0 or (self.prefetch_shards and not self.shard_cache_dir):
            raise ConfigError(
                f"data.prefetch_shards: expected 0, or >= 1 with data.shard_cache_dir set, "
                f"found {self.prefetch_shards} (shard_cache_dir={self.shard_cache_dir!r})",
                hint="prefetched shards are kept in the local shard cache: set "
                     "data.shard_cache_dir and data.shard_cache_bytes too")
        for name in ("teachers", "datasets"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ConfigError(f"data.{name}: names repeat in {list(values)}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay; `lr` is for a global batch of 256."""

    lr: float = 3e-4
    scale_lr_with_batch: bool = True
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.03
    warmup_fraction: float = 0.2
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        check_types(self, "optim")
        if not 0 < self.lr < math.inf:  # written so that NaN fails here, not at min_lr
            raise ConfigError(f"optim.lr: expected a finite number > 0, found {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr: expected in [0, optim.lr], found {self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), found {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps: expected > 0, found {self.eps}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay: expected >= 0, found {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(
                f"optim.warmup_fraction: expected in [0, 1), found {self.warmup_fraction}"
            )
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad: expected >= 0 (0 = off), found {self.clip_grad}")


@dataclass(frozen=True)
class StageConfig:
    """One resolution stage of a run (an entry of `[[stages]]`).

    A stage runs the run's config with these fields replaced: its own `cache` (a cache holds
    one grid), `img_size` (the student's input, = grid x student patch), `epochs`, `lr`
    (`optim.lr`) and any other dotted override in `overrides` (e.g. `"optim.warmup_fraction"`).
    Unset fields keep the run's value. `name` names the stage's folder, `stages/NN-<name>`.
    """

    name: str
    cache: PathStr = ""
    img_size: int | None = None
    epochs: int | None = None
    lr: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self, "stage")  # ranges: check_stage, named by the stage's index

    def replacements(self) -> dict[str, Any]:
        """The dotted overrides this stage applies to the run's config."""
        named = {"data.cache": self.cache or None, "student.img_size": self.img_size,
                 "epochs": self.epochs, "optim.lr": self.lr}
        return {**{k: v for k, v in named.items() if v is not None}, **self.overrides}


@dataclass(frozen=True)
class TrainConfig:
    """One training run, of one stage or of several `stages` run in order.

    The batch is given once, either as `batch_size_global` (all processes together) or as
    `batch_size_per_device` (each process; the global batch is then that times the number of
    processes). The old `batch_size` key still reads as the global batch. None given: a global
    batch of 128.

    The lr schedule spans `epochs x steps_per_epoch` steps, where an epoch is `epoch_size`
    samples: a count, "imagenet-1k" (the reference's 1,281,167 images) or None (one pass over
    the mix). `max_steps` only stops the run early (counted over all stages); it never changes
    the schedule, so a run stopped there and rerun with a larger value continues exactly.
    """

    student: StudentConfig = field(default_factory=StudentConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    dropping: DroppingConfig = field(default_factory=DroppingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    batch_size_global: int | None = None
    batch_size_per_device: int | None = None
    batch_size: int | None = None
    epochs: int = 100
    epoch_size: int | Literal["imagenet-1k"] | None = None
    max_steps: int | None = None
    log_every: int = 10
    checkpoint_every: int = 500
    eval_every: int = 500
    seed: int = 0
    deterministic: bool = False
    compile: bool = False
    amp: bool = True
    online: bool = False
    init_from: PathStr | None = None
    out_dir: PathStr = ""
    stages: tuple[StageConfig, ...] = ()

    def __post_init__(self) -> None:
        check_types(self)
        positive = ("epochs", "log_every", "checkpoint_every", "eval_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"{name}: expected a positive integer, found {getattr(self, name)}"
                )
        batches = {n: getattr(self, n) for n in BATCH_FIELDS if getattr(self, n) is not None}
        if len(batches) > 1:
            raise ConfigError(
                f"{' and '.join(batches)}: both set; give the batch once",
                hint="batch_size_global = images per step over all processes, or "
                "batch_size_per_device = images per step on each process",
            )
        for name, value in batches.items():
            if value <= 0:
                raise ConfigError(f"{name}: expected a positive integer, found {value}")
        known_batch = self.batch_size_global or self.batch_size
        if known_batch and self.epoch_samples() is not None and self.epoch_samples() < known_batch:
            raise ConfigError(
                f"epoch_size: expected at least the global batch {known_batch} samples, "
                f"found {self.epoch_size}"
            )
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: names repeat in {names}")
        for k, stage in enumerate(self.stages):
            check_stage(stage, f"stages[{k}]")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"max_steps: expected >= 0, found {self.max_steps}")
        if self.seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, found {self.seed}")

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step over all `world_size` processes."""
        if self.batch_size_per_device is not None:
            return self.batch_size_per_device * world_size
        return self.batch_size_global or self.batch_size or DEFAULT_GLOBAL_BATCH

    def epoch_samples(self) -> int | None:
        """`epoch_size` as a count (a name looked up in EPOCH_SIZES), None for one pass."""
        if isinstance(self.epoch_size, str):
            return EPOCH_SIZES[self.epoch_size]
        return self.epoch_size

    def base_lr(self, world_size: int = 1) -> float:
        """Peak learning rate: `optim.lr` scaled by global batch / 256 (the reference's rule)."""
        scale = self.global_batch(world_size) / 256 if self.optim.scale_lr_with_batch else 1.0
        return self.optim.lr * scale

    def stage_configs(self) -> list[TrainConfig]:
        """The config of each stage (no stages: the run itself), each writing into its own
        folder `out_dir/stages/NN-<name>`. Stage k > 0 takes seed + k (other draws than the
        stage before on the same images) and its initial weights from the previous stage."""
        if not self.stages:
            return [self]
        configs = []
        for k, stage in enumerate(self.stages):
            where = f"stages[{k}]"
            try:
                data = apply_overrides(TrainConfig, to_dict(self), stage.replacements())
                data.update(stages=[], out_dir=str(stage_dir(Path(self.out_dir), k, stage.name)),
                            seed=self.seed + k)
                configs.append(from_dict(TrainConfig, data))
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}", hint=exc.hint) from None
        return configs

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (what the run folder stores as config.json)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are a ConfigError naming them."""
        return from_dict(cls, data)


BATCH_FIELDS = ("batch_size_global", "batch_size_per_device", "batch_size")


def check_stage(stage: StageConfig, where: str) -> None:
    """Range checks of one stage; errors name it as `where` (e.g. `stages[1].lr`)."""
    check_node_name(stage.name, f"{where}.name", names="the stage's folder")
    for name in ("img_size", "epochs"):
        value = getattr(stage, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{where}.{name}: expected a positive integer, found {value}")
    if stage.lr is not None and not stage.lr > 0:
        raise ConfigError(f"{where}.lr: expected a number > 0, found {stage.lr}")
    for dotted, value in stage.overrides.items():
        fixed = [f for f in STAGE_FIXED_FIELDS if dotted == f or dotted.startswith(f + ".")]
        if fixed:
            raise ConfigError(
                f"{where}.overrides.{dotted}: a stage may not change {fixed[0]}",
                hint="the student's shape, the run's folder and its init_from are the same "
                "for every stage",
            )
        # Type-checked now, so that a typo fails when the config is read, not at stage 2.
        try:
            annotation = annotation_at(TrainConfig, dotted)
        except ConfigError as exc:
            raise ConfigError(f"{where}.overrides: {exc}") from None
        convert(value, annotation, f"{where}.overrides.{dotted}")


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    """The folder of stage `index` (`name`) of the run in `run_dir`."""
    return run_dir / "stages" / f"{index:02d}-{name}"


def load_train_config(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Read a TrainConfig from a TOML file (missing tables and keys take their defaults).

    The file is read like a build config (`cache_format.configfile`, shared with `dune-cache`):
    every field type-checked, relative paths taken from the file's folder, relative override
    paths from the working directory.
    """
    return load_config(
        TrainConfig, path, overrides, missing_hint="pass the TOML file of the run, e.g. train.toml"
    )


def resolve_paths(cfg: TrainConfig, config_path: str | Path | None = None) -> TrainConfig:
    """Make every path absolute: relative paths are taken from the config file's folder (as
    `load_train_config` already does), or from the current directory without a file; a missing
    `out_dir` becomes runs/<config stem> under the current directory."""
    if not cfg.data.cache and not (cfg.stages and all(s.cache for s in cfg.stages)):
        raise ConfigError(
            "data.cache: no cache path given",
            hint="set [data] cache = \"path/to/cache\" in the config or pass --cache PATH",
        )
    base = Path(config_path).resolve().parent if config_path else Path.cwd()
    data = to_dict(cfg)
    if not data["out_dir"]:
        stem = Path(config_path).stem if config_path else "run"
        data["out_dir"] = str(Path.cwd() / "runs" / stem)
    return from_dict(TrainConfig, data, base=base)
