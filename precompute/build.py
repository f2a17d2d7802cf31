"""`build_cache`: run the plan on dask, teacher by teacher, and fill the cache.

Phases, in order, each waiting for the previous one:
1. the index: one unit per (dataset, shard) still without its index (images decoded, statuses
   and view parameters written);
2. per teacher, in config order: its new (dataset, teacher) pairs are prepared (teacher
   fingerprint; int8 calibration on the dataset's first ok samples) and added to the cache, then
   one unit per (dataset, shard) still without its done mark, then each pair's exact statistics
   are merged. Submitting one teacher at a time keeps one teacher in each worker's memory: a
   worker loads it on its first unit and releases it when the next teacher's first unit arrives.

Dask: without `--scheduler`, an in-process `LocalCluster` (nothing to start). Its workers are
processes by default: each holds its own teacher and its own torch threads, the GIL does not
serialize decoding and encoding across workers, a worker that dies (out of memory) does not take
the build with it, and on a multi-GPU machine each worker owns one GPU. Worker processes are
started non-daemonic so that they may fork DataLoader processes. With `--scheduler ADDR` the
units go to an existing cluster whose workers see the cache path and the images (shared file
system or object store); workers that advertise a `GPU` resource get the units one GPU's share
at a time.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cache_format import layout
from cache_format.errors import DuneError
from cache_format.locations import is_url
from cache_format.manifest import STATUS_OK, Manifest, status_name
from cache_format.writer import CacheWriter
from precompute.config import RUNTIME_FIELDS, CacheBuildConfig
from precompute.plan import BuildPlan, PairPlan, check_fits, make_plan, plan_lines
from precompute.replay_spec import replay_spec_from_build_config
from precompute.sources import ImageSource
from precompute.units import (
    CalibrationViews,
    PrepareResult,
    UnitResult,
    UnitSettings,
    calibration_views,
    release_teachers,
    run_index_unit,
    run_prepare_unit,
    run_teacher_unit,
    shard_images,
)
from precompute.view_params import VIEW_PARAM_NAMES

log = logging.getLogger("dune.build")


@dataclass
class PairTotals:
    """What this run wrote for one (teacher, dataset) pair."""

    samples: int = 0
    skipped: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


@dataclass
class BuildSummary:
    """The outcome of `build_cache`: per-pair totals of this run and the cache's state."""

    plan: BuildPlan
    pairs: dict[tuple[str, str], PairTotals] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset -> reason -> n
    cache_bytes: int = 0
    seconds: float = 0.0


def directory_bytes(path: str) -> int:
    """Bytes of every file under `path` (0 for URLs or a missing folder)."""
    if is_url(path) or not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


# -- the cluster -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cluster:
    client: Any  # distributed.Client
    device: str
    workers: int
    unit_resources: dict[str, float] | None


def _units_per_worker(config: CacheBuildConfig, device: str) -> int:
    return config.runtime.units_per_worker or (4 if device == "cuda" else 1)


def _local_device(config: CacheBuildConfig) -> str:
    wanted = config.runtime.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise DuneError("runtime.device: 'cuda' was asked for but torch sees no CUDA device",
                        hint="set runtime.device = 'auto' or 'cpu'")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


@contextmanager
def _cluster(config: CacheBuildConfig, scheduler: str | None,
             workers: int | None) -> Iterator[_Cluster]:
    """A dask client: connected to `scheduler`, or to a fresh local cluster."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise DuneError(
                f"--scheduler {scheduler}: cannot connect ({exc})",
                hint="start one with `dask scheduler` and `dask worker ADDR`, or leave "
                     "--scheduler out to use a local cluster") from None
        try:
            try:
                client.wait_for_workers(workers or 1, timeout=120)
            except TimeoutError:
                found = len(client.scheduler_info()["workers"])
                raise DuneError(
                    f"--scheduler {scheduler}: {found} worker(s) connected after 120 s, "
                    f"{workers or 1} wanted",
                    hint="start more `dask worker` processes, or lower --workers") from None
            cuda = client.run(torch.cuda.is_available)
            device = config.runtime.device
            if device == "auto":
                device = "cuda" if cuda and all(cuda.values()) else "cpu"
            infos = client.scheduler_info()["workers"].values()
            has_gpu = all("GPU" in (w.get("resources") or {}) for w in infos)
            share = 1.0 / _units_per_worker(config, device)
            yield _Cluster(client, device, len(cuda),
                           {"GPU": share} if device == "cuda" and has_gpu else None)
        finally:
            try:
                client.run(release_teachers)
            finally:
                client.close()
        return
    device = _local_device(config)
    n = workers or (torch.cuda.device_count() if device == "cuda" else 1)
    slots = _units_per_worker(config, device)
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"),
               # dask's default trims malloc eagerly; that fixes glibc's mmap threshold, so each
               # of torch's large activation buffers is mapped and page-faulted anew on every
               # forward (a third slower on CPU here). Unset it.
               "MALLOC_TRIM_THRESHOLD_": None}
    with dask.config.set({"distributed.worker.daemon": False,
                          "distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=slots, processes=config.runtime.processes,
            dashboard_address=":0", silence_logs=logging.ERROR,
            resources={"GPU": 1} if device == "cuda" else None,
        )
    threads = torch.get_num_threads()  # units in this process (threads mode) change it
    try:
        client = Client(cluster)
        try:
            yield _Cluster(client, device, n, {"GPU": 1.0 / slots} if device == "cuda" else None)
        finally:
            if not config.runtime.processes:
                release_teachers()
            client.close()
    finally:
        cluster.close()
        torch.set_num_threads(threads)


def _run_units(cluster: _Cluster, fn: Callable[..., Any], arguments: Sequence[tuple[Any, ...]],
               on_result: Callable[[Any], None], *, gpu: bool) -> None:
    """Submit `fn(*args)` for every args (earlier ones first) and handle results as they come.

    An exception in a unit, or raised by `on_result`, cancels the units still pending and
    propagates; shards already written keep their done marks.
    """
    from distributed import KilledWorker, as_completed

    run_id = uuid.uuid4().hex[:8]
    resources = cluster.unit_resources if gpu else None
    futures = [
        cluster.client.submit(fn, *args, key=f"dune-{fn.__name__}-{k}-{run_id}", pure=False,
                              priority=len(arguments) - k, resources=resources)
        for k, args in enumerate(arguments)
    ]
    try:
        for future in as_completed(futures):
            on_result(future.result())
    except KilledWorker as exc:
        cluster.client.cancel(futures)
        raise DuneError(
            f"dask workers died running {exc.args[0] if exc.args else 'a unit'} too many times "
            "(out of memory?); finished shards are kept",
            hint="lower build.batch_size or runtime.units_per_worker, then rerun to resume",
        ) from exc
    except BaseException:
        cluster.client.cancel(futures)
        raise


# -- progress ----------------------------------------------------------------------------------
class _RateColumn(ProgressColumn):
    """Teacher input images (views) per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "- img/s", style="cyan")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
        _RateColumn(), TextColumn("{task.fields[mb]:.2f} MB"), TimeRemainingColumn(),
        TextColumn("skipped {task.fields[skipped]}"), console=console,
    )


# -- the build ---------------------------------------------------------------------------------
def _open_writer(plan: BuildPlan) -> CacheWriter:
    """Create the cache (first run) or open it, and add the datasets it lacks."""
    config = plan.config
    if plan.cache_exists:
        writer = CacheWriter.open(config.cache)
    else:
        manifest = Manifest(
            grid=config.grid, student_patch=config.student_patch,
            views_per_image=config.views_per_image, view_mode=config.views.mode,
            seed=config.seed, samples_per_shard=config.samples_per_shard,
            encoding=config.encoding, view_param_names=VIEW_PARAM_NAMES,
            build_config=config.to_dict(),
        )
        writer = CacheWriter.create(config.cache, manifest, exist_ok=True)
    for d in plan.datasets.values():
        if not writer.has_dataset(d.name):
            writer.add_dataset(d.fingerprint, d.source.keys())
    _record_build_config(writer, config)
    return writer


def _record_build_config(writer: CacheWriter, config: CacheBuildConfig) -> None:
    """Store the config in the manifest once it adds teachers or datasets (the trainer reads
    dataset roots and teacher domains there). The first run's cache path and runtime settings
    are kept, so a resume with other runtime settings rewrites nothing."""
    stored = dict(writer.manifest.build_config)
    wanted = {**config.to_dict(), **{k: stored[k] for k in RUNTIME_FIELDS if k in stored}}
    if stored != wanted:
        writer.set_build_config(wanted)
    replay = replay_spec_from_build_config(wanted)  # what training reads (cache_format/replay.py)
    if writer.manifest.replay != replay:
        writer.set_replay(replay)


def _status_counts(cache: str, dataset: str) -> dict[str, int]:
    status = zarr.open_group(cache, mode="r")[f"{layout.dataset_path(dataset)}/{layout.STATUS}"]
    codes, counts = np.unique(status[:], return_counts=True)  # type: ignore[index]
    return {("ok" if c == STATUS_OK else status_name(int(c))): int(k)
            for c, k in zip(codes, counts, strict=True)}


def _shard_slice(plan: BuildPlan, dataset: str, shard: int) -> ImageSource:
    """The images of one shard, cut from the source the plan listed: what a unit ships."""
    start, stop = layout.shard_bounds(shard, plan.datasets[dataset].num_samples,
                                      plan.config.samples_per_shard)
    return shard_images(plan.datasets[dataset].source, plan.config.views_per_image, start, stop)


def _run_index(cluster: _Cluster, settings: UnitSettings, plan: BuildPlan,
               progress: Progress) -> None:
    todo = [(d.name, s) for d in plan.datasets.values() for s in d.index_todo]
    if not todo:
        return
    views = settings.config.views_per_image
    units = [(settings, _shard_slice(plan, d, s), s) for d, s in todo]
    total = sum(len(images) for _, images, _ in units)
    task = progress.add_task("index", total=total, mb=0.0, skipped=0)

    def done(result: UnitResult) -> None:
        skipped = sum(result.skipped.values())
        progress.update(task, advance=(result.samples + skipped) // views,
                        skipped=progress.tasks[task].fields["skipped"] + skipped // views)

    # Under --strict a unit raises the first bad image's BadImageError; _run_units re-raises it.
    _run_units(cluster, run_index_unit, units, done, gpu=False)


def _prepare_pairs(cluster: _Cluster, settings: UnitSettings, writer: CacheWriter,
                   plan: BuildPlan, pairs: Sequence[PairPlan]) -> None:
    """Fingerprint (and int8-calibrate) the teacher on its new pairs, then add them."""
    new = [(p.teacher, p.dataset) for p in pairs if not writer.has_teacher(p.dataset, p.teacher)]
    results: dict[tuple[str, str], PrepareResult] = {}

    def done(result: PrepareResult) -> None:
        results[(result.teacher, result.dataset)] = result

    def calibration(dataset: str) -> CalibrationViews | None:
        if not plan.config.encoding.has_scale:
            return None
        return calibration_views(plan.config, plan.datasets[dataset].source)

    _run_units(cluster, run_prepare_unit, [(settings, t, d, calibration(d)) for t, d in new],
               done, gpu=True)
    for key in new:  # added in plan order, whatever order the units finished in
        result = results[key]
        writer.add_teacher(result.dataset, result.fingerprint, result.calibration)


def _run_teacher(cluster: _Cluster, settings: UnitSettings, teacher: str, plan: BuildPlan,
                 pairs: Sequence[PairPlan], progress: Progress,
                 totals: dict[tuple[str, str], PairTotals]) -> None:
    units = [(settings, teacher, _shard_slice(plan, p.dataset, s), s)
             for p in pairs for s in p.shards_todo]
    task = progress.add_task(teacher, total=sum(p.samples_todo for p in pairs), mb=0.0,
                             skipped=0)
    began = time.perf_counter()

    def done(result: UnitResult) -> None:
        skipped = sum(result.skipped.values())
        pair = totals.setdefault((teacher, result.dataset), PairTotals())
        pair.samples += result.samples
        pair.skipped += skipped
        pair.bytes_written += result.bytes_written
        pair.seconds = time.perf_counter() - began
        fields = progress.tasks[task].fields
        progress.update(task, advance=result.samples + skipped,
                        mb=fields["mb"] + result.bytes_written / 1e6,
                        skipped=fields["skipped"] + skipped)

    _run_units(cluster, run_teacher_unit, units, done, gpu=True)


def build_cache(config: CacheBuildConfig, *, scheduler: str | None = None,
                workers: int | None = None, strict: bool = False,
                console: Console | None = None, plan: BuildPlan | None = None) -> BuildSummary:
    """Build (or resume, or extend) the cache described by `config`; returns what was done.

    Refuses before starting when the config differs from the cache's (other than additions) or
    when the estimated remaining size exceeds the free space. Under `strict`, the first bad
    image stops the build with a BadImageError naming the file; finished shards stay written.

    Whoever makes the plan shows it: given `plan`, the caller has printed it (the CLI prints
    `plan_lines`, which say when the cache is complete); without, it is made and its lines are
    printed here. So "nothing to do" is said once.
    """
    console = console or Console(stderr=True)
    began = time.perf_counter()
    if plan is None:
        plan = make_plan(config)
        for line in plan_lines(plan):
            console.print(line, soft_wrap=True)
    check_fits(plan)
    summary = BuildSummary(plan)
    console.print(f"cache: {config.cache}", soft_wrap=True)
    if not plan.nothing_to_do:
        writer = _open_writer(plan)
        with _cluster(config, scheduler, workers) as cluster:
            threads = config.runtime.torch_threads or os.cpu_count() or 1
            settings = UnitSettings(config, cluster.device, threads, strict)
            console.print(f"dask: {cluster.workers} worker(s) on {cluster.device}, "
                          f"{threads} torch thread(s) per unit", soft_wrap=True)
            with _progress(console) as progress:
                _run_index(cluster, settings, plan, progress)
                for teacher in config.teacher_names:
                    pairs = [p for p in plan.pairs_of(teacher) if not p.done]
                    if not pairs:
                        continue
                    _prepare_pairs(cluster, settings, writer, plan, pairs)
                    _run_teacher(cluster, settings, teacher, plan, pairs, progress,
                                 summary.pairs)
                    for p in pairs:
                        writer.finalize_stats(p.dataset, p.teacher)
    summary.skipped = {d: {r: n for r, n in _status_counts(config.cache, d).items() if r != "ok"}
                       for d in plan.datasets}
    summary.cache_bytes = directory_bytes(config.cache)
    summary.seconds = time.perf_counter() - began
    return summary


def summary_tables(summary: BuildSummary) -> list[Table]:
    """The end-of-build tables: per (teacher, dataset) this run, and skips per dataset."""
    run = Table(title="written this run")
    for column in ("teacher", "dataset", "samples", "skipped", "MB", "seconds", "img/s"):
        run.add_column(column, justify="left" if column in ("teacher", "dataset") else "right")
    for (teacher, dataset), t in summary.pairs.items():
        rate = t.samples / t.seconds if t.seconds else 0.0
        run.add_row(teacher, dataset, str(t.samples), str(t.skipped),
                    f"{t.bytes_written / 1e6:.1f}", f"{t.seconds:.1f}", f"{rate:.1f}")
    skips = Table(title="images per dataset")
    for column in ("dataset", "images", "skipped images", "reasons"):
        skips.add_column(column, justify="left" if column in ("dataset", "reasons") else "right")
    views = summary.plan.config.views_per_image
    for name, d in summary.plan.datasets.items():
        reasons = summary.skipped.get(name, {})
        skipped = sum(reasons.values()) // views
        skips.add_row(name, str(d.num_images), str(skipped),
                      ", ".join(f"{r} {n // views}" for r, n in sorted(reasons.items())) or "-")
    return [run, skips] if summary.pairs else [skips]
