"""Cache scale benchmark: does starting a trainer stay flat as a cache grows to DUNE's size?

    .venv/bin/python tests/benchmarks/bench_scale.py [--sizes 10000 100000 1000000]

For each size, a synthetic complete cache is written through the real writer (CacheWriter, the
same calls as the builder: index shards, finalize_index, token shards, finalize_stats): one
dataset of tiny images (an HDF5 file of one 16 x 16 PNG repeated, 2 views per image, the views
the builder would draw), 3 teachers with cls + patch tokens at grid 2x2, D = 8, int8, 64 samples
per shard, and the manifest's build_config as the builder writes it. Then, each in a fresh
process:

- objects: store objects (files, zarr.json documents aside) per shard and per (pair, shard);
- open cold / warm: `open_cache` plus what a trainer reads at start (statuses, completeness and
  calibration of every pair), after evicting the cache's files from the page cache
  (posix_fadvise DONTNEED) and then again in the same process; with the number of read system
  calls of the cold start (/proc/self/io syscr: flat in shards is the goal);
- first batch: `CacheTrainData` + `ViewEpochSampler` + a DataLoader with one worker, from
  nothing to the first batch of 64 (view replay, encoded token reads), cold; twice: the first
  run over this cache and source (its HDF5 key list is read and checked against the cache) and
  a later one (the passed check is remembered: train/source_checks.py);
- memory of the trainer process and of its DataLoader worker after that batch: RSS (VmRSS) and
  USS (the private pages, smaps_rollup Private_Clean + Private_Dirty), and their growth in bytes
  per sample between the two largest sizes. The goal (<= 6 B per sample) is judged on the
  trainer's RSS and the worker's USS: a forked worker's RSS also counts the trainer's pages it
  shares copy-on-write (counted once, in the trainer), and the trainer's USS drops once a
  worker shares its pages. Beside them, the bytes per sample of what the data path holds by
  design (statuses, item table, the sampler's epoch order);
- `dune-cache info` and `verify` (every chunk) times, in-process.

The table goes to the `bench_scale` section of docs/benchmarks.md, with the growth ratio of each
figure between consecutive sizes and a linear projection to DUNE's 128 M samples, and the load
average of the machine while measuring. With `--root DIR` (an existing folder) the caches are
built in DIR/n<size>/ and kept, and a later run reuses a cache found there (complete, with the
build time it recorded), so that a rerun measures without rebuilding.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from _report import machine_description, markdown_table, write_section  # noqa: E402

DUNE_SAMPLES = 128_000_000
VIEWS, PER_SHARD, DIM, TEACHERS, BATCH = 2, 64, 8, ("t0", "t1", "t2"), 64
DATASET = "synth"


# -- building --------------------------------------------------------------------------------
def _tiny_png() -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_images(path: Path, num_images: int) -> None:
    """An HDF5 source (precompute.synthetic's format) of `num_images` copies of one tiny PNG.

    Every other copy carries one byte after the PNG's end (decoders ignore it): rows of unequal
    lengths are what lets h5py write a whole block of variable-length rows at once."""
    import h5py

    png = np.frombuffer(_tiny_png(), dtype=np.uint8)
    padded = np.concatenate([png, np.zeros(1, np.uint8)])
    with h5py.File(path, "w") as f:
        images = f.create_dataset("images", shape=(num_images,), dtype=h5py.vlen_dtype(np.uint8))
        block = np.empty(min(num_images, 65536), dtype=object)
        for i in range(block.size):
            block[i] = png if i % 2 == 0 else padded
        for start in range(0, num_images, block.size):
            stop = min(start + block.size, num_images)
            images[start:stop] = block[: stop - start]
        f.create_dataset("images_keys", data=[f"img_{i:08d}.png" for i in range(num_images)],
                         dtype=h5py.string_dtype("utf-8"))


def build(root: Path, num_samples: int) -> Path:
    """Write the synthetic complete cache of `num_samples` samples under root; its path."""
    from dataclasses import replace

    from cache_format.encodings import fit_calibration
    from cache_format.manifest import DatasetFingerprint, Manifest, TeacherFingerprint
    from cache_format.writer import CacheWriter
    from precompute.config import CacheBuildConfig
    from precompute.replay_spec import replay_spec_from_build_config
    from precompute.sources import open_source
    from precompute.view_params import VIEW_PARAM_NAMES
    from precompute.views import sample_view
    from tests.build_fixtures import config_toml

    cache = root / "cache"
    images = root / "images.h5"
    _write_images(images, num_samples // VIEWS)
    data = tomllib.loads(config_toml(cache, {DATASET: {
        "kind": "hdf5", "root": str(images), "hdf5_key": "images", "domain": "2d"}},
        dataset_names=(DATASET,), teachers=("dino",)))
    config = CacheBuildConfig.from_dict({**data, "samples_per_shard": PER_SHARD})
    manifest = Manifest(grid=config.grid, student_patch=config.student_patch,
                        views_per_image=VIEWS, view_mode=config.views.mode, seed=config.seed,
                        samples_per_shard=PER_SHARD, encoding=config.encoding,
                        view_param_names=VIEW_PARAM_NAMES, build_config=config.to_dict())
    writer = CacheWriter.create(cache, manifest)
    # What training replays; the synthetic teachers (not in build_config) own the data's domain.
    replay = replay_spec_from_build_config(config.to_dict())
    writer.set_replay(replace(replay, teacher_domains={t: "2d" for t in TEACHERS}))
    source = open_source(config.dataset(DATASET), config.build.max_pixels,
                         config.build.unusual_modes)
    writer.add_dataset(DatasetFingerprint(**source.describe()), source.keys())  # type: ignore[arg-type]
    hw = tuple(int(v) for v in source.load(0).shape[1:])
    status = np.ones(PER_SHARD, dtype=np.uint8)
    for shard in range(writer.num_shards(DATASET)):
        start, stop = writer.shard_bounds(DATASET, shard)
        rows = np.stack([sample_view(config.seed, DATASET, s // VIEWS, s % VIEWS, hw,
                                     config.views).to_array() for s in range(start, stop)])
        writer.write_index_shard(DATASET, shard, rows, status[: stop - start])
    writer.finalize_index(DATASET)
    rng = np.random.default_rng(0)
    tokens = manifest.num_tokens
    for name in TEACHERS:
        fp = TeacherFingerprint(name=name, arch="synthetic", checkpoint_sha256="0" * 64,
                                input_size=(28, 28), patch_size=14, mean=(0.5,) * 3,
                                std=(0.5,) * 3, token_types=("cls", "patch"), dim=DIM)
        sample = {"patch": rng.normal(size=(PER_SHARD, tokens, DIM)).astype(np.float32),
                  "cls": rng.normal(size=(PER_SHARD, DIM)).astype(np.float32)}
        writer.add_teacher(DATASET, fp, {t: fit_calibration(x) for t, x in sample.items()})
        for shard in range(writer.num_shards(DATASET)):
            start, stop = writer.shard_bounds(DATASET, shard)
            x = {t: v[: stop - start] for t, v in sample.items()}
            writer.write_shard(DATASET, name, shard, x, np.ones(stop - start, bool))
        writer.finalize_stats(DATASET, name)
    return cache


def built(root: Path, num_samples: int) -> tuple[Path, float]:
    """(the cache, its build seconds) of `num_samples` under root: the one a previous run built
    and recorded there, else a new build."""
    record = root / "build.json"
    if record.is_file():
        facts = json.loads(record.read_text())
        if facts.get("samples") == num_samples:
            return root / "cache", float(facts["build_s"])
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    began = time.perf_counter()
    cache = build(root, num_samples)
    seconds = time.perf_counter() - began
    record.write_text(json.dumps({"samples": num_samples, "build_s": seconds}))
    return cache, seconds


# -- measuring (in a fresh process each) -----------------------------------------------------
def _evict(cache: Path) -> None:
    """Drop the cache's files from the page cache, so that the next reads come from the disk."""
    for path in cache.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _read_syscalls() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    return 0


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _uss(pid: int) -> int:
    """The process's private pages (bytes): what it alone holds, shared pages aside."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) * 1024 for k in ("Private_Clean", "Private_Dirty"))


def _start(cache: Path) -> None:
    """What a trainer reads when it opens a cache: statuses, completeness, calibration."""
    from cache_format.reader import open_cache

    with open_cache(cache) as reader:
        for dataset in reader.datasets:
            _ = reader.index(dataset).status
            for teacher in reader.teachers_for(dataset):
                assert reader.pair_complete(dataset, teacher)
                for tok in reader.manifest.teachers[teacher].token_types:
                    reader.calibration(dataset, teacher, tok)


def first_batch(cache: Path) -> tuple[Any, Any]:
    """The trainer's data path up to its first batch: (the batch, the DataLoader iterator).

    CacheTrainData finds the replay settings in the manifest's `replay` section."""
    from torch.utils.data import DataLoader

    from train.batch import collate_cached
    from train.data import CacheTrainData
    from train.sampling import ViewEpochSampler

    data = CacheTrainData(cache, heldout_images=0)
    sampler = ViewEpochSampler(data, seed=0, batch_size=BATCH)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler, num_workers=1,
                        collate_fn=collate_cached)
    iterator = iter(loader)
    return next(iterator), iterator


def _held(iterator: Any) -> dict[str, float]:
    """What the data path holds by design, by array sizes: the reader's statuses (per sample),
    the item table (its exceptions: held-out images and images with a failed view) and the
    sampler's order of the epoch (per epoch position). The trainer process holds all three; a
    DataLoader worker the table it inherits and the statuses its own reader loads (the token
    reads check a shard's records against them). Bytes per sample here, and per sample at
    DUNE's 6 views per image (the same images, so the order costs a third as much)."""
    data = iterator._dataset  # noqa: SLF001
    sampler = iterator._index_sampler.sampler  # noqa: SLF001 (the BatchSampler's sampler)
    samples = sum(data.reader.num_samples(d) for d in data.dataset_names)
    statuses = sum(data.reader.index(d).status.nbytes for d in data.dataset_names) / samples
    items = data.items.nbytes / samples
    order = sampler.held_nbytes / samples
    return {"held_per_sample": statuses + items + order,
            "held_worker_per_sample": statuses + items,
            "held_per_sample_6_views": statuses + items + order * VIEWS / 6,
            "held_worker_per_sample_6_views": statuses + items}


def measure(cache: Path, what: str) -> dict[str, float]:
    """One measurement, run in this (fresh) process; imports happen before any clock starts."""
    import train.data
    import train.sampling  # noqa: F401

    if what == "open":
        calls, began = _read_syscalls(), time.perf_counter()
        _start(cache)
        cold, calls = time.perf_counter() - began, _read_syscalls() - calls
        began = time.perf_counter()
        _start(cache)
        return {"open_cold_s": cold, "open_warm_s": time.perf_counter() - began,
                "open_reads": calls}
    if what in ("batch", "batch_first_run"):
        began = time.perf_counter()
        batch, iterator = first_batch(cache)
        seconds = time.perf_counter() - began
        if what == "batch_first_run":
            return {"first_run_batch_s": seconds}
        worker = iterator._workers[0].pid  # noqa: SLF001 (the worker process to measure)
        return {"first_batch_s": seconds, "rss_main": _rss(os.getpid()),
                "uss_main": _uss(os.getpid()), "rss_worker": _rss(worker),
                "uss_worker": _uss(worker), **_held(iterator)}
    from cache_format.reader import open_cache
    from precompute.cache_tools import cache_info

    began = time.perf_counter()
    cache_info(str(cache))
    info = time.perf_counter() - began
    began = time.perf_counter()
    with open_cache(cache) as reader:
        report = reader.verify()
    assert report.ok and not report.missing and not report.incomplete, report
    return {"info_s": info, "verify_s": time.perf_counter() - began}


def _in_fresh_process(cache: Path, what: str) -> dict[str, float]:
    if what != "tools":
        # Evicted from here, not in the measuring process: walking 125,000 files leaves about
        # 15 MB of freed Python objects in the walker's heap, which its RSS would count.
        _evict(cache)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" /
                                                                          "benchmarks")]),
           # The remembered source checks of this cache only (train/source_checks.py).
           "DUNE_SOURCE_CHECKS": str(cache.parent / "source-checks")}
    out = subprocess.run([sys.executable, __file__, "--measure", what, str(cache)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"measuring {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def objects(cache: Path, num_shards: int) -> dict[str, float]:
    """Store objects (zarr.json aside) per shard, and per (pair, shard) of the token arrays."""
    files = [p for p in cache.rglob("*") if p.is_file() and p.name != "zarr.json"]
    pair = [p for p in files if "/teachers/" in str(p)]
    return {"objects": len(files), "objects_per_shard": len(files) / num_shards,
            "objects_per_pair_shard": len(pair) / (num_shards * len(TEACHERS))}


# -- the report ----------------------------------------------------------------------------
COLUMNS = [("objects_per_shard", "objects / shard", "{:.2f}"),
           ("objects_per_pair_shard", "objects / (pair, shard)", "{:.2f}"),
           ("open_cold_s", "open cold (s)", "{:.3f}"), ("open_warm_s", "open warm (s)", "{:.3f}"),
           ("open_reads", "read calls at open", "{:.0f}"),
           ("first_run_batch_s", "first batch, first run (s)", "{:.2f}"),
           ("first_batch_s", "first batch (s)", "{:.2f}"),
           ("rss_main", "RSS trainer (MB)", "{:.1f}"), ("uss_main", "USS trainer (MB)", "{:.1f}"),
           ("rss_worker", "RSS worker (MB)", "{:.1f}"), ("uss_worker", "USS worker (MB)", "{:.1f}"),
           ("held_per_sample", "held B/sample trainer", "{:.2f}"),
           ("held_worker_per_sample", "held B/sample worker", "{:.2f}"),
           ("info_s", "info (s)", "{:.2f}"), ("verify_s", "verify (s)", "{:.1f}")]


def _fmt(key: str, value: float, fmt: str) -> str:
    return fmt.format(value / 1e6 if key.startswith(("rss", "uss")) else value)


def report(results: dict[int, dict[str, float]], build_s: dict[int, float],
           load: tuple[float, float]) -> str:
    sizes = sorted(results)
    header = ["samples", "build (s)", *(label for _, label, _ in COLUMNS)]
    rows = [[f"{n:,}", f"{build_s[n]:.0f}", *(_fmt(k, results[n][k], f) for k, _, f in COLUMNS)]
            for n in sizes]
    for a, b in zip(sizes, sizes[1:], strict=False):
        rows.append([f"ratio {b // a}x", "", *(f"{results[b][k] / results[a][k]:.2f}x"
                                               if results[a][k] else "-" for k, _, _ in COLUMNS)])
    lo, hi = sizes[-2] if len(sizes) > 1 else sizes[-1], sizes[-1]

    def project(key: str) -> float:
        """RSS: linear (a base plus bytes per sample); the rest: the power law through the two
        largest sizes, never decreasing (a figure that shrank is projected flat)."""
        a, b = results[lo][key], results[hi][key]
        if lo == hi or a <= 0:
            return b
        if key.startswith(("rss", "uss")):
            return b + max(0.0, (b - a) / (hi - lo)) * (DUNE_SAMPLES - hi)
        exponent = max(0.0, np.log(b / a) / np.log(hi / lo))
        return b * (DUNE_SAMPLES / hi) ** exponent

    rows.append(["128 M (projected)", "", *(_fmt(k, project(k), f) for k, _, f in COLUMNS)])
    per_sample = {k: (results[hi][k] - results[lo][k]) / (hi - lo) if hi > lo else float("nan")
                  for k in ("rss_main", "uss_main", "rss_worker", "uss_worker")}
    return "\n".join([
        "## bench_scale: start-up and memory as a cache grows",
        "",
        f"Machine: {machine_description()}; load average (1 min) while measuring: "
        f"{load[0]:.1f} to {load[1]:.1f} on {os.cpu_count()} cores (other jobs share them).",
        "",
        "Synthetic complete caches written through the real writer: one dataset, 2 views per "
        f"image, {len(TEACHERS)} teachers (cls + patch, grid 2x2, D = {DIM}, int8), "
        f"{PER_SHARD} samples per shard. Each figure is measured in a fresh process; \"cold\" "
        "means the cache's files were evicted from the page cache first (posix_fadvise "
        "DONTNEED). \"open\" = open_cache plus what a trainer reads at start (statuses, "
        "completeness and calibration of every pair); \"read calls\" counts its read system "
        "calls. \"first batch\" = CacheTrainData + ViewEpochSampler + DataLoader (1 worker), "
        f"batch {BATCH}, from nothing to the first batch; \"first run\": no check of this "
        "source against this cache remembered yet, so its HDF5 key list is read and hashed "
        "(train/source_checks.py); later runs open it without listing. RSS: resident pages "
        "(VmRSS); USS: the process's private pages (smaps_rollup Private_Clean + "
        "Private_Dirty). \"held B/sample\": statuses + item table (+ the sampler's epoch "
        "order in the trainer), by their array sizes. Projection: "
        "from the two "
        "largest sizes to 128 M samples: RSS linearly (base + bytes per sample), every other "
        "figure along the power law through those two points (flat when it did not grow).",
        "",
        markdown_table(header, rows),
        "",
        f"Memory growth between {lo:,} and {hi:,} samples, in bytes per sample: trainer RSS "
        f"{per_sample['rss_main']:.1f} (USS {per_sample['uss_main']:.1f}), DataLoader worker "
        f"USS {per_sample['uss_worker']:.1f} (RSS {per_sample['rss_worker']:.1f}); goal: at "
        "most 6, judged on the trainer's RSS and the worker's USS (a forked worker's RSS also "
        "counts the trainer's pages it shares copy-on-write, and the trainer's USS drops once "
        "they are shared). Held by design (statuses 1 B per sample, the item table's "
        f"exceptions, the epoch order per position), at this benchmark's {VIEWS} "
        f"views per image: trainer {results[hi]['held_per_sample']:.2f}, worker "
        f"{results[hi]['held_worker_per_sample']:.2f} B/sample; at DUNE's 6 views per image: "
        f"trainer {results[hi]['held_per_sample_6_views']:.2f}, worker "
        f"{results[hi]['held_worker_per_sample_6_views']:.2f} B/sample.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--measure", nargs=2, metavar=("WHAT", "CACHE"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=None,
                        help="an existing folder to build in (kept, and reused by a later run); "
                        "default: a temporary folder")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[1]), args.measure[0])))
        return
    results: dict[int, dict[str, float]] = {}
    build_s: dict[int, float] = {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        for n in args.sizes:
            cache, build_s[n] = built(Path(args.root or tmp) / f"n{n}", n)
            results[n] = objects(cache, -(-n // PER_SHARD))
            shutil.rmtree(cache.parent / "source-checks", ignore_errors=True)
            for what in ("open", "batch_first_run", "batch", "tools"):
                loads.append(os.getloadavg()[0])
                results[n].update(_in_fresh_process(cache, what))
            print(n, f"built in {build_s[n]:.0f} s", results[n], flush=True)
    body = report(results, build_s, (min(loads), max(loads)))
    print(body)
    write_section("bench_scale", body)


if __name__ == "__main__":
    main()
