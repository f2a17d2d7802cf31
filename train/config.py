"""`TrainConfig`: everything one `dune-train fit` run depends on, as one frozen dataclass.

A run is described by a TOML file whose tables mirror the nested parts below (`[student]`,
`[projector]`, `[norm]`, `[dropping]`, `[data]`, `[optim]`, top-level keys for the loop). The
command line overrides a few fields (`--cache`, `--out`, `--online`, `--max-steps`) through
`cache_format.configfile.with_overrides`, the mechanism `dune-cache build` uses too; every field
is type-checked from its annotation (`cache_format.serde.from_dict`), with the dotted field
named. The run folder stores `to_dict()` of the resolved config (absolute paths), and
a rerun of the same command compares its own resolved config with the stored one before it
resumes: only fields that cannot change the trajectory (`RESUME_FREE_FIELDS`) may differ.

Relative paths in the TOML file are taken from the file's folder (as in `dune-cache build`
configs), so a config works from any directory; paths given on the command line are relative
to the current directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache_format.configfile import load_config
from cache_format.errors import ConfigError
from cache_format.serde import PathStr, check_types, from_dict, to_dict
from train.projectors import PROJECTOR_KINDS
from train.sampling import SAMPLING_MODES
from train.sinks import LoggingConfig
from train.student import StudentConfig
from train.teacher_dropping import check_dropping
from train.teacher_norm import NORM_MODES

# Fields a rerun may change without breaking exact resume: where to stop, how often to log, and
# where things live (moved runs and caches still resume; the cache's fingerprint is checked).
RESUME_FREE_FIELDS = (
    "max_steps",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "out_dir",
    "data.cache",
    "data.num_workers",
    "data.roots",
    "logging",
)


@dataclass(frozen=True)
class ProjectorConfig:
    """One projector per teacher: `tp` (Transformer Projector), `mlp` or `linear`."""

    kind: str = "tp"
    n_blocks: int = 1

    def __post_init__(self) -> None:
        check_types(self, "projector")
        if self.kind not in PROJECTOR_KINDS:
            raise ConfigError(
                f"projector.kind: expected one of {', '.join(PROJECTOR_KINDS)}, found {self.kind!r}"
            )
        if self.n_blocks < 0:
            raise ConfigError(f"projector.n_blocks: expected >= 0, found {self.n_blocks}")


@dataclass(frozen=True)
class NormConfig:
    """Teacher normalization: the cache's `exact` statistics or the reference's `batch` ones."""

    mode: str = "exact"

    def __post_init__(self) -> None:
        check_types(self, "norm")
        if self.mode not in NORM_MODES:
            raise ConfigError(
                f"norm.mode: expected one of {', '.join(NORM_MODES)}, found {self.mode!r}"
            )


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
    kept out of training and used for the held-out loss and cosine.
    """

    cache: PathStr = ""
    teachers: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    roots: dict[str, PathStr] = field(default_factory=dict)
    sampling: str = "teacher_balanced"
    heldout_images: int = 8
    num_workers: int = 2
    expect_checkpoint_sha256: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self, "data")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(
                f"data.sampling: expected one of {', '.join(SAMPLING_MODES)}, "
                f"found {self.sampling!r}"
            )
        if self.heldout_images < 0:
            raise ConfigError(f"data.heldout_images: expected >= 0, found {self.heldout_images}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: expected >= 0, found {self.num_workers}")
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
class TrainConfig:
    """One training run. `batch_size` is the global batch (all ranks together).

    The lr schedule spans `epochs x steps_per_epoch` steps, where an epoch is `epoch_size`
    samples (None: one pass over the mix). `max_steps` only stops the run early; it never
    changes the schedule, so a run stopped there and rerun with a larger value continues exactly.
    """

    student: StudentConfig = field(default_factory=StudentConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    dropping: DroppingConfig = field(default_factory=DroppingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    batch_size: int = 128
    epochs: int = 100
    epoch_size: int | None = None
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

    def __post_init__(self) -> None:
        check_types(self)
        positive = ("batch_size", "epochs", "log_every", "checkpoint_every", "eval_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"{name}: expected a positive integer, found {getattr(self, name)}"
                )
        if self.epoch_size is not None and self.epoch_size < self.batch_size:
            raise ConfigError(
                f"epoch_size: expected at least batch_size={self.batch_size} samples, "
                f"found {self.epoch_size}"
            )
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"max_steps: expected >= 0, found {self.max_steps}")
        if self.seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer, found {self.seed}")

    def base_lr(self) -> float:
        """Peak learning rate: `optim.lr` scaled by global batch / 256 (the reference's rule)."""
        scale = self.batch_size / 256 if self.optim.scale_lr_with_batch else 1.0
        return self.optim.lr * scale

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (what the run folder stores as config.json)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are a ConfigError naming them."""
        return from_dict(cls, data)


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
    if not cfg.data.cache:
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


def resume_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of the fields that differ between a stored and a current config dict,
    leaving out `RESUME_FREE_FIELDS` (which a rerun may change)."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if prefix in RESUME_FREE_FIELDS:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            diffs.append(f"{prefix} (stored {a!r}, now {b!r})")

    walk(stored, current, "")
    return diffs
