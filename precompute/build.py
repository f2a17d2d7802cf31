"""`build_cache`: run the plan on dask, teacher by teacher, and fill the cache.

Phases, in order, each waiting for the previous one:
1. the index: one unit per (dataset, shard) still without its index (images decoded, statuses
   and view parameters written);
2. per teacher, in config order: its new (dataset, teacher) pairs are prepared (teacher
   fingerprint; int8 calibration on the dataset's first ok samples) and added to the cache, then
   one unit per (dataset, shard) still without its done mark, then each pair's exact statistics
   are merged. Submitting one teacher at a time keeps one teacher in each worker's memory: a
   worker loads it on its first unit and releases it when the next teacher's first unit arrives.

3. each dataset whose index was completed is consolidated (`finalize_index`: statuses in a few
   large chunks and a summary, what trainers read at start).

The cluster's life cycle is cluster.py's; what a build did and how it is shown, results.py's.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress

from cache_format.errors import InsufficientSpaceError
from cache_format.files import tree_nbytes
from cache_format.manifest import Manifest, status_name
from cache_format.reader import open_cache
from cache_format.shards import shard_bounds
from cache_format.writer import CacheWriter
from precompute.build_lock import build_lock
from precompute.cluster import Cluster, open_cluster, run_units
from precompute.config import RUNTIME_FIELDS, CacheBuildConfig
from precompute.plan import BuildPlan, PairPlan, check_fits, make_plan, plan_lines
from precompute.replay_spec import replay_spec_from_build_config
from precompute.results import BuildSummary, PairTotals, progress_display
from precompute.sources import ImageSource
from precompute.units import (
    CalibrationViews,
    PrepareResult,
    UnitResult,
    UnitSettings,
    calibration_views,
    run_index_unit,
    run_prepare_unit,
    run_teacher_unit,
    shard_images,
)
from precompute.view_params import VIEW_PARAM_NAMES

log = logging.getLogger("dune.build")


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
    # Every pair the config asks for, before any is added: completeness is judged against it.
    writer.set_planned(config.assignment())
    replay = replay_spec_from_build_config(wanted)  # what training reads (cache_format/replay.py)
    if writer.manifest.replay != replay:
        writer.set_replay(replay)


def _skip_counts(cache: str, datasets: Sequence[str]) -> dict[str, dict[str, int]]:
    """Samples per skip reason (status other than ok) of each dataset, from the cache."""
    with open_cache(cache) as reader:
        return {d: {status_name(code): n for code, n in reader.status_counts(d).items()
                    if status_name(code) != "ok"} for d in datasets}


def _shard_slice(plan: BuildPlan, dataset: str, shard: int) -> ImageSource:
    """The images of one shard, cut from the source the plan listed: what a unit ships."""
    start, stop = shard_bounds(shard, plan.datasets[dataset].num_samples,
                                      plan.config.samples_per_shard)
    return shard_images(plan.datasets[dataset].source, plan.config.views_per_image, start, stop)


def _run_index(cluster: Cluster, settings: UnitSettings, plan: BuildPlan,
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
    run_units(cluster, run_index_unit, units, done, gpu=False)


def _prepare_pairs(cluster: Cluster, settings: UnitSettings, writer: CacheWriter,
                   plan: BuildPlan, pairs: Sequence[PairPlan]) -> None:
    """Fingerprint (and int8-calibrate) the teacher on its new pairs, then add them."""
    new = [(p.teacher, p.dataset) for p in pairs if not writer.has_teacher(p.dataset, p.teacher)]
    results: dict[tuple[str, str], PrepareResult] = {}

    def done(result: PrepareResult) -> None:
        results[(result.teacher, result.dataset)] = result

    def calibration(dataset: str) -> CalibrationViews | None:
        if not plan.config.encoding.has_scale:
            return None
        return calibration_views(plan.config, plan.datasets[dataset].source, writer)

    run_units(cluster, run_prepare_unit, [(settings, t, d, calibration(d)) for t, d in new],
               done, gpu=True)
    for key in new:  # added in plan order, whatever order the units finished in
        result = results[key]
        writer.add_teacher(result.dataset, result.fingerprint, result.calibration)


def _run_teacher(cluster: Cluster, settings: UnitSettings, teacher: str, plan: BuildPlan,
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

    run_units(cluster, run_teacher_unit, units, done, gpu=True)


@contextmanager
def disk_full_as_one_line(plan: BuildPlan, resume: str) -> Iterator[None]:
    """Turn ENOSPC anywhere in the build (this process or a worker's re-raised error) into one
    line naming the path, the space the plan still needed and the command that resumes."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC or isinstance(exc, InsufficientSpaceError):
            raise
        where = exc.filename or plan.config.cache
        raise InsufficientSpaceError(
            f"{where}: disk full (no space left on device) while building {plan.config.cache}; "
            f"the build needed about {plan.todo_bytes / 1e9:.2f} GB when it started; finished "
            "shards are kept",
            hint=f"free space there (or move the cache), then resume with: {resume}",
        ) from None


def build_cache(config: CacheBuildConfig, *, scheduler: str | None = None,
                workers: int | None = None, strict: bool = False,
                console: Console | None = None, plan: BuildPlan | None = None,
                resume: str = "") -> BuildSummary:
    """Build (or resume, or extend) the cache described by `config`; returns what was done.

    Refuses before starting when the config differs from the cache's (other than additions) or
    when the estimated remaining size exceeds the free space. Under `strict`, the first bad
    image stops the build with a BadImageError naming the file; finished shards stay written.

    Whoever makes the plan shows it: given `plan`, the caller has printed it (the CLI prints
    `plan_lines`, which say when the cache is complete); without, it is made and its lines are
    printed here. So "nothing to do" is said once.

    The build holds the cache's lock (precompute/build_lock.py) while it writes; a second build
    is refused naming the holder. `resume` is the command a disk-full error says to rerun.
    """
    console = console or Console(stderr=True)
    with build_lock(config.cache):  # before planning: the plan must see the last build's work
        return _build_locked(config, scheduler, workers, strict, console, plan, resume)


def _build_locked(config: CacheBuildConfig, scheduler: str | None, workers: int | None,
                  strict: bool, console: Console, plan: BuildPlan | None,
                  resume: str) -> BuildSummary:
    began = time.perf_counter()
    if plan is None:
        plan = make_plan(config)
        for line in plan_lines(plan):
            console.print(line, soft_wrap=True)
    check_fits(plan)
    summary = BuildSummary(plan)
    console.print(f"cache: {config.cache}", soft_wrap=True)
    resume = resume or f"dune-cache build CONFIG.toml --cache {config.cache}"
    if not plan.nothing_to_do:
        with disk_full_as_one_line(plan, resume):
            _execute(plan, summary, scheduler, workers, strict, console)
    summary.skipped = _skip_counts(config.cache, list(plan.datasets))
    summary.cache_bytes = tree_nbytes(config.cache)
    summary.seconds = time.perf_counter() - began
    return summary


def _execute(plan: BuildPlan, summary: BuildSummary, scheduler: str | None,
             workers: int | None, strict: bool, console: Console) -> None:
    """Run the plan's phases (see the module doc) on a dask cluster."""
    config = plan.config
    writer = _open_writer(plan)
    with open_cluster(config, scheduler, workers) as cluster:
        threads = config.runtime.torch_threads or os.cpu_count() or 1
        settings = UnitSettings(config, cluster.device, threads, strict)
        console.print(f"dask: {cluster.workers} worker(s) on {cluster.device}, "
                      f"{threads} torch thread(s) per unit", soft_wrap=True)
        with progress_display(console) as progress:
            _run_index(cluster, settings, plan, progress)
            for d in plan.datasets.values():
                if not d.index_final:
                    writer.finalize_index(d.name)
            for teacher in config.teacher_names:
                pairs = [p for p in plan.pairs_of(teacher) if not p.done]
                if not pairs:
                    continue
                _prepare_pairs(cluster, settings, writer, plan, pairs)
                _run_teacher(cluster, settings, teacher, plan, pairs, progress,
                             summary.pairs)
                for p in pairs:
                    writer.finalize_stats(p.dataset, p.teacher)
