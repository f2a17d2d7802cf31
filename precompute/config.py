"""`CacheBuildConfig`: everything `dune-cache build` needs, read from one TOML file.

A build config names the cache, the token grid, the views, the encoding, the teachers, the
datasets and the data-sharing strategy. It is a frozen dataclass with nested parts; its
`to_dict()` is stored in the cache manifest (`build_config`), so a cache always says how it was
built, and a rerun with another config is refused field by field (see `precompute.plan`).

Two parts are kept apart on purpose:
- `[build]` settings change the cache's content (batch size, calibration sample, what counts as
  a bad image); they are compared on every rerun like the grid or the seed.
- `[runtime]` settings change only how the build runs (loader workers, threads, device, process
  model); they may differ between a run and its resume.

Relative paths in the file (cache, dataset roots and list files, teacher checkpoints: the fields
annotated `PathStr`) are taken relative to the file's folder and stored absolute, so a config
works from any working directory. Reading the file, overrides and paths are shared with
`dune-train` (`cache_format.configfile`); every field is type-checked from its annotation
(`cache_format.serde.from_dict`).

Data-sharing strategies (which teacher runs on which dataset):
- `all`: every teacher on every dataset (what the paper found best).
- `own`: each teacher only on the datasets of its own domain.
- `own+generic`: its own domain plus the *generic* datasets, those whose domain is listed in
  `sharing.generic_domains`; left empty, the generic domain is the first teacher's domain (as in
  the reference, where the DINOv2 teacher's web images are the generic data, and as the trainer's
  `own+generic_data` teacher dropping assumes).
- `matrix`: an explicit table `teacher = ["dataset", ...]` in `[sharing.matrix]`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cache_format.configfile import load_config
from cache_format.encodings import EncodingSpec
from cache_format.errors import ConfigError
from cache_format.serde import PathStr, check_choice, check_types, from_dict, to_dict
from precompute.dataset_keys import DatasetConfig
from precompute.decode import DEFAULT_MAX_PIXELS, UNUSUAL_MODES
from precompute.teachers.config import TeacherConfig
from precompute.views import ViewConfig

SHARING_STRATEGIES: tuple[str, ...] = ("all", "own", "own+generic", "matrix")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: Top-level fields that do not describe the cache's content (not compared on a rerun).
RUNTIME_FIELDS: tuple[str, ...] = ("cache", "runtime")


def _at_least(value: int, where: str, low: int = 1) -> None:
    """Range check of an int field (its type was checked by `check_types`)."""
    if value < low:
        raise ConfigError(f"{where}: expected an integer >= {low}, found {value!r}")


@dataclass(frozen=True)
class SharingConfig:
    """Which teacher runs on which dataset (see the module docstring for the strategies)."""

    strategy: str = "all"
    generic_domains: tuple[str, ...] = ()
    matrix: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self, "sharing")
        check_choice(self.strategy, SHARING_STRATEGIES, "sharing.strategy")
        if self.strategy == "matrix" and not self.matrix:
            raise ConfigError(
                "sharing.matrix: strategy 'matrix' needs a table [sharing.matrix] with "
                'lines like dinov2 = ["imagenet", "mapillary"], found none'
            )
        if self.strategy != "matrix" and self.matrix:
            raise ConfigError(
                f"sharing.matrix: only used by strategy 'matrix', but strategy is "
                f"{self.strategy!r} (remove [sharing.matrix] or set strategy = 'matrix')"
            )
        if self.generic_domains and self.strategy != "own+generic":
            raise ConfigError(
                f"sharing.generic_domains: only used by strategy 'own+generic', but strategy is "
                f"{self.strategy!r} (remove generic_domains)"
            )


@dataclass(frozen=True)
class BuildSettings:
    """Settings that change the cache's content (compared on every rerun).

    - `batch_size`: samples per teacher forward. Fixed per shard so that results do not depend
      on scheduling; changing it could change the last bits of the tokens.
    - `calibration_samples`: the int8 calibration sample of each (dataset, teacher) pair: the
      first K samples with status ok (ignored by fp16 / bf16).
    - `max_pixels`, `unusual_modes`: what counts as a bad image (see precompute.sources).
    """

    batch_size: int = 32
    calibration_samples: int = 256
    max_pixels: int = DEFAULT_MAX_PIXELS
    unusual_modes: str = "skip"

    def __post_init__(self) -> None:
        check_types(self, "build")
        _at_least(self.batch_size, "build.batch_size")
        _at_least(self.calibration_samples, "build.calibration_samples")
        _at_least(self.max_pixels, "build.max_pixels")
        check_choice(self.unusual_modes, UNUSUAL_MODES, "build.unusual_modes")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the build runs; free to change between a run and its resume.

    - `loader_workers`: DataLoader processes decoding images per dask worker (0: decode in the
      unit's own thread).
    - `torch_threads`: torch intra-op threads in every unit; 0 means the driver machine's core
      count. Fixed for the whole build (not derived from the number of workers) so that the
      tokens do not depend on how many workers share a machine.
    - `processes`: the default local cluster runs its workers as processes (true) or as threads
      of the `dune-cache` process (false: for debugging, one worker).
    - `device`: "auto" (CUDA when available), "cpu" or "cuda".
    - `units_per_worker`: units a worker runs at once; 0 means 1 on CPU (torch already uses
      every core) and 4 on CUDA (while one unit's batches run on the GPU, others decode, encode
      and write on the CPU; the units share the worker's one loaded teacher).
    """

    loader_workers: int = 2
    torch_threads: int = 0
    processes: bool = True
    device: str = "auto"
    units_per_worker: int = 0

    def __post_init__(self) -> None:
        check_types(self, "runtime")
        _at_least(self.loader_workers, "runtime.loader_workers", 0)
        _at_least(self.torch_threads, "runtime.torch_threads", 0)
        _at_least(self.units_per_worker, "runtime.units_per_worker", 0)
        check_choice(self.device, DEVICES, "runtime.device")


@dataclass(frozen=True, kw_only=True)
class CacheBuildConfig:
    """One cache build: where, at which grid, which views, which teachers on which datasets."""

    cache: PathStr
    grid: tuple[int, int]
    teachers: tuple[TeacherConfig, ...]
    datasets: tuple[DatasetConfig, ...]
    student_patch: int = 14
    views_per_image: int = 4
    seed: int = 0
    samples_per_shard: int = 64
    views: ViewConfig = field(default_factory=ViewConfig)
    encoding: EncodingSpec = field(default_factory=EncodingSpec)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    build: BuildSettings = field(default_factory=BuildSettings)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        check_types(self)
        if not self.cache:
            raise ConfigError(
                f"cache: expected the cache's path, found {self.cache!r}",
                hint="set `cache = \"...\"` in the config file or pass --cache PATH",
            )
        for i, value in enumerate(self.grid):
            _at_least(value, f"grid[{i}]")
        _at_least(self.student_patch, "student_patch")
        _at_least(self.views_per_image, "views_per_image")
        _at_least(self.seed, "seed", 0)
        _at_least(self.samples_per_shard, "samples_per_shard")
        if self.samples_per_shard % self.views_per_image:
            lower = max(self.views_per_image, self.samples_per_shard // self.views_per_image
                        * self.views_per_image)
            raise ConfigError(
                f"samples_per_shard: expected a multiple of views_per_image "
                f"({self.views_per_image}) so that an image's views share a shard, found "
                f"{self.samples_per_shard}",
                hint=f"use samples_per_shard = {lower}",
            )
        if self.views.mode == "center" and self.views_per_image != 1:
            raise ConfigError(
                f"views_per_image: views.mode 'center' gives one fixed view per image, so "
                f"views_per_image must be 1, found {self.views_per_image}"
            )
        self._check_names()
        self.assignment()  # every teacher gets data and every dataset a teacher

    def _check_names(self) -> None:
        if not self.teachers:
            raise ConfigError("teachers: expected at least one [[teachers]] table, found none")
        if not self.datasets:
            raise ConfigError("datasets: expected at least one [[datasets]] table, found none")
        for what, names in (
            ("teachers", [t.name for t in self.teachers]),
            ("datasets", [d.name for d in self.datasets]),
        ):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ConfigError(f"{what}: the name(s) {repeated} appear more than once; "
                                  "names must be unique")

    @property
    def teacher_names(self) -> tuple[str, ...]:
        """Teacher names in config order (the order in which they run)."""
        return tuple(t.name for t in self.teachers)

    @property
    def dataset_names(self) -> tuple[str, ...]:
        """Dataset names in config order."""
        return tuple(d.name for d in self.datasets)

    def teacher(self, name: str) -> TeacherConfig:
        """The config of teacher `name`."""
        return next(t for t in self.teachers if t.name == name)

    def dataset(self, name: str) -> DatasetConfig:
        """The config of dataset `name`."""
        return next(d for d in self.datasets if d.name == name)

    def generic_domains(self) -> tuple[str, ...]:
        """The generic domains of `own+generic`: as declared, else the first teacher's domain."""
        return self.sharing.generic_domains or (self.teachers[0].effective_domain(),)

    def assignment(self) -> dict[str, tuple[str, ...]]:
        """{teacher: datasets it runs on}, both in config order, from the sharing strategy.

        Raises ConfigError when a teacher would get no dataset or a dataset no teacher, naming
        them and the domains involved.
        """
        strategy = self.sharing.strategy
        datasets = self.dataset_names
        result: dict[str, tuple[str, ...]] = {}
        if strategy == "matrix":
            unknown_t = sorted(set(self.sharing.matrix) - set(self.teacher_names))
            if unknown_t:
                raise ConfigError(f"sharing.matrix: unknown teacher(s) {unknown_t}; the teachers "
                                  f"are {list(self.teacher_names)}")
            for teacher, names in self.sharing.matrix.items():
                unknown_d = sorted(set(names) - set(datasets))
                if unknown_d:
                    raise ConfigError(f"sharing.matrix.{teacher}: unknown dataset(s) {unknown_d}; "
                                      f"the datasets are {list(datasets)}")
            for teacher in self.teacher_names:
                chosen = set(self.sharing.matrix.get(teacher, ()))
                result[teacher] = tuple(d for d in datasets if d in chosen)
        else:
            generic = set(self.generic_domains()) if strategy == "own+generic" else set()
            for t in self.teachers:
                own = t.effective_domain()
                result[t.name] = tuple(
                    d.name for d in self.datasets
                    if strategy == "all" or d.domain == own or d.domain in generic
                )
        idle = [t for t, names in result.items() if not names]
        if idle:
            domains = {t.name: t.effective_domain() for t in self.teachers if t.name in idle}
            raise ConfigError(
                f"sharing: teacher(s) {idle} get no dataset under strategy {strategy!r} "
                f"(teacher domains {domains}; dataset domains "
                f"{ {d.name: d.domain for d in self.datasets} })",
                hint="add a dataset of that domain, fix the domains, or change sharing.strategy",
            )
        used = {d for names in result.values() for d in names}
        unused = [d for d in datasets if d not in used]
        if unused:
            raise ConfigError(
                f"sharing: dataset(s) {unused} get no teacher under strategy {strategy!r} "
                f"(their domains {[self.dataset(d).domain for d in unused]}; teacher domains "
                f"{ {t.name: t.effective_domain() for t in self.teachers} })",
                hint="fix the dataset's domain, remove it, or change sharing.strategy",
            )
        return result

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored in the cache manifest's `build_config`)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheBuildConfig:
        """Rebuild from `to_dict()` output or a parsed TOML file (unknown keys are errors)."""
        return from_dict(cls, dict(data))


def load_build_config(
    path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None
) -> CacheBuildConfig:
    """Read a TOML build config and apply `overrides` ({"cache": ..., "runtime.device": ...}).

    Relative paths in the file are taken from the file's folder, relative override paths from
    the working directory; unknown fields, missing required fields and values of the wrong
    type, in the file or in the overrides, are a ConfigError naming them
    (`cache_format.configfile`, shared with `dune-train`).
    """
    return load_config(
        CacheBuildConfig, path, overrides,
        missing_hint="pass the path of a build config (TOML); see docs/building.md",
    )
