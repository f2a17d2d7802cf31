"""The work units of a build, as they run inside dask workers.

Three kinds of unit, each a plain function of picklable arguments returning a small result:
- `run_index_unit(settings, images, shard)`: decode every image of the shard, record its status
  (ok or the skip reason) and its content fingerprint (the checksum of the bytes decoded,
  cache_format/source_fingerprint.py), draw each view's parameters, write the index shard.
- `run_prepare_unit(settings, teacher, dataset, calibration)`: load the teacher, return its
  fingerprint and, for int8, the calibration (per-channel mean/std of its tokens on the views of
  `calibration_views`: the dataset's first K ok samples), which the driver records before any
  shard of the pair is written.
- `run_teacher_unit(settings, teacher, images, shard)`: read the shard's view parameters,
  statuses and fingerprints back from the cache, replay every ok view (refusing an image whose
  content changed since the index was written: a teacher added later reads the images again),
  run the teacher, write the token shard.

What a unit ships is proportional to the unit, not to the dataset: `images` is the source slice
of the shard's images (`ImageSource.slice`: their keys only, a few dozen, not the dataset's
millions), cut by the driver from the source it listed once. Workers never list a dataset.

Bad images: decoding runs in DataLoader processes, whose items report a bad image (its reason,
message and path) instead of raising: an exception there would end the shard's iteration (and
the DataLoader re-raises it as a RuntimeError, without the reason), while a bad image must be
recorded and the next one decoded. Only under `strict` does the unit itself raise the
BadImageError, which reaches the driver through dask (it pickles with its reason and path).

Determinism: a unit's output depends only on its arguments and the cache's index. Batches are
consecutive ok samples of the shard in sample order, `batch_size` at a time, whatever the loader
timing; torch's thread count is fixed by the driver; views are replayed from the stored rows.

Worker state (precompute/worker_state.py): each dask worker keeps the teacher it last used (one
teacher on the device at a time; loading another releases it). Decoding happens in DataLoader
processes forked from the worker (dask's own worker processes are spawned, so the fork start
method is named explicitly; a daemonic worker cannot fork, and then images are decoded in the
unit's thread).
"""

from __future__ import annotations

import multiprocessing
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cache_format.encodings import fit_calibration
from cache_format.errors import BadImageError, CacheMismatchError, CacheVersionError
from cache_format.manifest import STATUS_OK, TeacherFingerprint, status_code, status_name
from cache_format.source_fingerprint import ALGORITHM as FINGERPRINT_ALGORITHM
from cache_format.source_fingerprint import hex_of
from cache_format.writer import CacheWriter
from precompute.config import CacheBuildConfig
from precompute.render import normalize, render_view, resize_for_teacher
from precompute.sources import ImageSource
from precompute.teachers.loaded import LoadedTeacher
from precompute.view_params import NUM_VIEW_PARAMS, ViewParams
from precompute.views import sample_view
from precompute.worker_state import acquire_teacher, setup_torch, worker_device


@dataclass(frozen=True)
class UnitSettings:
    """What every unit needs besides its own coordinates (resolved once by the driver)."""

    config: CacheBuildConfig
    device: str  # "cpu" or "cuda"
    torch_threads: int
    strict: bool = False


@dataclass(frozen=True)
class UnitResult:
    """What a unit reports back: counts for the progress bars and the summary."""

    teacher: str
    dataset: str
    shard: int
    samples: int  # samples computed (status ok)
    skipped: dict[str, int] = field(default_factory=dict)  # skip reason -> samples
    bytes_written: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class CalibrationViews:
    """The int8 calibration sample of a dataset: its first K ok samples, in sample order."""

    images: ImageSource  # the slice of the images the samples come from
    samples: np.ndarray  # int64 [K] sample indices
    rows: np.ndarray  # float32 [K, P] their stored view parameters


@dataclass(frozen=True)
class PrepareResult:
    """A teacher's fingerprint and, for int8, its calibration on one dataset."""

    teacher: str
    dataset: str
    fingerprint: TeacherFingerprint
    calibration: dict[str, tuple[np.ndarray, np.ndarray]] | None


#: Whether the daemonic-worker warning of `_loader` was given in this process.
_warned_daemon = False


def _loader(items: Dataset, workers: int) -> Iterator[object]:
    """Iterate `items` in order, decoding in `workers` forked processes when allowed."""
    global _warned_daemon
    if workers and multiprocessing.current_process().daemon:
        if not _warned_daemon:
            warnings.warn(
                "dask worker processes are daemonic here, so images are decoded in the unit's "
                "thread; start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False for decoding "
                "processes", stacklevel=2)
            _warned_daemon = True
        workers = 0
    if workers == 0:
        return iter(items[i] for i in range(len(items)))  # type: ignore[arg-type]
    context = "fork" if sys.platform.startswith("linux") else None
    return iter(DataLoader(items, batch_size=None, shuffle=False, num_workers=workers,
                           multiprocessing_context=context, prefetch_factor=4))


class _ImageProbe(Dataset):
    """Item k: (image index, (h, w), skip reason or "", message, path, content fingerprint) of
    one image (the fingerprint is taken of the bytes decoded; 0 for a bad image)."""

    def __init__(self, source: ImageSource, images: Sequence[int]) -> None:
        self.source, self.images = source, list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, k: int) -> tuple[int, tuple[int, int], str, str, str, int]:
        i = self.images[k]
        try:
            image, fingerprint = self.source.load_fingerprinted(i)
        except BadImageError as exc:  # reported, not raised: see the module's docstring
            return i, (0, 0), exc.reason, str(exc), exc.path or self.source.location(i), 0
        return i, (int(image.shape[1]), int(image.shape[2])), "", "", "", fingerprint


class _ReplayedViews(Dataset):
    """Item k: (sample indices, teacher inputs [v, 3, H, W]) of the k-th image's ok views, or
    (sample indices, what is wrong) when the image no longer decodes or, given the index's
    `fingerprints` (one per sample), its content is not the one the index recorded."""

    def __init__(self, source: ImageSource, views_per_image: int,
                 samples: Sequence[int], rows: np.ndarray, student_hw: tuple[int, int],
                 teacher_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 fingerprints: np.ndarray | None = None) -> None:
        self.source, self.student_hw, self.teacher_hw = source, student_hw, teacher_hw
        self.mean, self.std = tuple(mean), tuple(std)
        groups: dict[int, list[tuple[int, np.ndarray]]] = {}
        for sample, row in zip(samples, rows, strict=True):
            groups.setdefault(int(sample) // views_per_image, []).append((int(sample), row))
        self.groups = list(groups.items())
        self.expected: list[int] | None = None
        if fingerprints is not None:
            first = {int(s) // views_per_image: int(f)
                     for s, f in zip(samples, fingerprints, strict=True)}
            self.expected = [first[image] for image, _ in self.groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, k: int) -> tuple[list[int], torch.Tensor | str]:
        image_index, views = self.groups[k]
        try:
            image, found = self.source.load_fingerprinted(image_index)
        except BadImageError as exc:
            return [s for s, _ in views], f"{exc.path or self.source.location(image_index)}: {exc}"
        if self.expected is not None and found != self.expected[k]:
            return [s for s, _ in views], (
                f"{self.source.location(image_index)}: its content changed (fingerprint "
                f"{hex_of(found)}, the index recorded {hex_of(self.expected[k])})")
        rendered = torch.stack([render_view(image, ViewParams.from_array(row), self.student_hw)
                                for _, row in views])
        x = normalize(resize_for_teacher(rendered, self.teacher_hw), self.mean, self.std)
        return [s for s, _ in views], x.contiguous()


def teacher_inputs(settings: UnitSettings, teacher: LoadedTeacher, source: ImageSource,
                   samples: Sequence[int], rows: np.ndarray,
                   fingerprints: np.ndarray | None = None
                   ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(samples, normalized teacher inputs) per image, in sample order, for the given views;
    with the index's `fingerprints`, an image whose content changed since it was indexed is
    refused (its tokens would not match the index's view of it)."""
    cfg = settings.config
    student_hw = (cfg.grid[0] * cfg.student_patch, cfg.grid[1] * cfg.student_patch)
    items = _ReplayedViews(source, cfg.views_per_image, samples, rows, student_hw,
                           teacher.input_size(cfg.grid), teacher.mean, teacher.std,
                           fingerprints)
    for item in _loader(items, cfg.runtime.loader_workers):
        ids, x = item  # type: ignore[misc]
        if isinstance(x, str):
            raise CacheMismatchError(
                f"dataset {source.cfg.name}, cache {cfg.cache}: {x}; the cache's index was "
                "written from the original image",
                hint="restore the original image, or build a new cache")
        yield list(ids), x


def forward(teacher: LoadedTeacher, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Teacher tokens of one batch as float32 numpy: bf16 autocast on CUDA, fp32 on CPU."""
    x = x.to(teacher.device, non_blocking=True)
    if x.device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = teacher.forward_tokens(x)
    else:
        out = teacher.forward_tokens(x)
    return {tok: t.float().cpu().numpy() for tok, t in out.items()}


def compute_tokens(settings: UnitSettings, teacher: LoadedTeacher, source: ImageSource,
                   samples: Sequence[int], rows: np.ndarray,
                   fingerprints: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Tokens of `samples` (views given by `rows`; images checked against `fingerprints`
    when given), batched `batch_size` at a time in order."""
    cfg = settings.config
    n, tokens = len(samples), cfg.grid[0] * cfg.grid[1]
    out = {tok: np.zeros((n, tokens, teacher.dim) if tok == "patch" else (n, teacher.dim),
                         dtype=np.float32) for tok in teacher.token_types}
    position = {s: k for k, s in enumerate(samples)}
    pending_ids: list[int] = []
    pending_x: list[torch.Tensor] = []

    def run(count: int) -> None:
        x = torch.cat(pending_x)
        result = forward(teacher, x[:count])
        rows_out = [position[s] for s in pending_ids[:count]]
        for tok, values in result.items():
            out[tok][rows_out] = values
        rest = x[count:]
        del pending_ids[:count]
        pending_x[:] = [rest] if len(rest) else []

    batch = cfg.build.batch_size
    for ids, x in teacher_inputs(settings, teacher, source, samples, rows, fingerprints):
        pending_ids.extend(ids)
        pending_x.append(x)
        while len(pending_ids) >= batch:
            run(batch)
    if pending_ids:
        run(len(pending_ids))
    return out


def shard_images(source: ImageSource, views_per_image: int, start: int,
                 stop: int) -> ImageSource:
    """The slice of `source` holding the images of samples [start, stop)."""
    return source.slice(start // views_per_image, -(-stop // views_per_image))


def calibration_views(config: CacheBuildConfig, source: ImageSource,
                      writer: CacheWriter) -> CalibrationViews:
    """The dataset's int8 calibration sample, read from its index (run on the driver)."""
    name, wanted = source.cfg.name, config.build.calibration_samples
    views = config.views_per_image
    samples: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    found = 0
    for shard in range(writer.num_shards(name)):
        start = writer.shard_bounds(name, shard)[0]
        params, status = writer.index_rows(name, shard)
        ok = np.nonzero(status == STATUS_OK)[0][: wanted - found]
        samples.append(ok + start)
        rows.append(params[ok])
        found += ok.size
        if found >= wanted:
            break
    if not found:
        raise CacheMismatchError(
            f"dataset {name}: no sample has status ok, so no teacher can be calibrated for int8",
            hint="check the dataset's images (`dune-cache info`)")
    chosen = np.concatenate(samples).astype(np.int64)
    return CalibrationViews(shard_images(source, views, 0, int(chosen[-1]) + 1), chosen,
                            np.concatenate(rows))


def _skip_counts(status: np.ndarray) -> dict[str, int]:
    codes, counts = np.unique(status[status != STATUS_OK], return_counts=True)
    return {status_name(int(c)): int(k) for c, k in zip(codes, counts, strict=True)}


# -- the units -------------------------------------------------------------------------------
def run_index_unit(settings: UnitSettings, images: ImageSource, shard: int) -> UnitResult:
    """Decode the shard's images (`images`: their slice), draw their views, write the index
    shard. A bad image is recorded with its reason; under `strict` it raises BadImageError."""
    began = time.perf_counter()
    cfg, dataset = settings.config, images.cfg.name
    setup_torch(settings.torch_threads, torch.device("cpu"))
    images.check_root()
    writer = CacheWriter.open(cfg.cache)
    start, stop = writer.shard_bounds(dataset, shard)
    views = cfg.views_per_image
    params = np.zeros((stop - start, NUM_VIEW_PARAMS), dtype=np.float32)
    status = np.full(stop - start, STATUS_OK, dtype=np.uint8)
    prints = np.zeros(stop - start, dtype=np.uint64)
    # Fingerprints are recorded when the dataset's manifest entry names this code's algorithm;
    # a dataset indexed before fingerprints existed keeps its row layout on resume.
    algorithm = writer.manifest.datasets[dataset].source_fingerprint
    if algorithm and algorithm != FINGERPRINT_ALGORITHM:
        raise CacheVersionError(
            f"{cfg.cache}: dataset {dataset} records source fingerprints with {algorithm!r}; "
            f"this dune-distill computes {FINGERPRINT_ALGORITHM!r}",
            hint="resume the build with the dune-distill that started it")
    probe = _ImageProbe(images, range(start // views, -(-stop // views)))
    try:
        for item in _loader(probe, cfg.runtime.loader_workers):
            i, hw, reason, message, path, fingerprint = item  # type: ignore[misc]
            rows = slice(i * views - start, (i + 1) * views - start)
            prints[rows] = fingerprint
            if reason and settings.strict:
                raise BadImageError(f"--strict: dataset {dataset}: {message}", reason=reason,
                                    path=path)
            if reason:
                status[rows] = status_code(reason)
                continue
            for v in range(views):
                view = sample_view(cfg.seed, dataset, i, v, tuple(hw), cfg.views)
                params[i * views - start + v] = view.to_array()
    finally:
        images.close()
    writer.write_index_shard(dataset, shard, params, status, prints if algorithm else None)
    return UnitResult("", dataset, shard, int((status == STATUS_OK).sum()),
                      _skip_counts(status), seconds=time.perf_counter() - began)


def run_prepare_unit(settings: UnitSettings, teacher: str, dataset: str,
                     calibration: CalibrationViews | None) -> PrepareResult:
    """Load the teacher; return its fingerprint and (int8) its calibration on `calibration`."""
    cfg = settings.config
    device = worker_device(settings.device)
    setup_torch(settings.torch_threads, device)
    model = acquire_teacher(cfg.teacher(teacher), device)
    fingerprint = TeacherFingerprint(
        name=teacher, arch=model.arch, checkpoint_sha256=model.checkpoint_sha256,
        input_size=model.input_size(cfg.grid), patch_size=model.patch_size,
        mean=tuple(model.mean), std=tuple(model.std), token_types=tuple(model.token_types),
        dim=model.dim)
    if calibration is None:
        return PrepareResult(teacher, dataset, fingerprint, None)
    try:
        tokens = compute_tokens(settings, model, calibration.images,
                                calibration.samples.tolist(), calibration.rows)
    finally:
        calibration.images.close()
    return PrepareResult(teacher, dataset, fingerprint,
                         {tok: fit_calibration(x) for tok, x in tokens.items()})


def run_teacher_unit(settings: UnitSettings, teacher: str, images: ImageSource,
                     shard: int) -> UnitResult:
    """Replay the shard's stored views (`images`: the slice of its images) through the teacher
    and write its token shard."""
    began = time.perf_counter()
    cfg, dataset = settings.config, images.cfg.name
    device = worker_device(settings.device)
    setup_torch(settings.torch_threads, device)
    model = acquire_teacher(cfg.teacher(teacher), device)
    images.check_root()
    writer = CacheWriter.open(cfg.cache)
    start, stop = writer.shard_bounds(dataset, shard)
    params, status, prints = writer.index_rows_fingerprinted(dataset, shard)
    valid = status == STATUS_OK
    ok = np.nonzero(valid)[0]
    try:
        tokens = compute_tokens(settings, model, images, (ok + start).tolist(), params[ok],
                                None if prints is None else prints[ok])
    finally:
        images.close()
    if not valid.all():  # skipped samples are stored as zeros (the writer ignores them)
        for tok, values in tokens.items():
            full = np.zeros((stop - start, *values.shape[1:]), dtype=np.float32)
            full[ok] = values
            tokens[tok] = full
    writer.write_shard(dataset, teacher, shard, tokens, valid)
    return UnitResult(teacher, dataset, shard, int(valid.sum()), _skip_counts(status),
                      writer.shard_nbytes(dataset, teacher, shard),
                      time.perf_counter() - began)
