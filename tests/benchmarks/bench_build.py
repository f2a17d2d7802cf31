"""Benchmark: cache-build throughput against the teacher's bare forward throughput.

    .venv/bin/python tests/benchmarks/bench_build.py [--images N] [--quick] [--large]

For each grid, in one run, on the same generated JPEG/PNG images and the same views:
1. `build_cache` of a fresh one-teacher int8 cache on the default local cluster (one worker
   process), timed end to end (cluster start, index pass, calibration, units, statistics) and
   for its teacher phase (its units, first submission to last result: a large build's steady
   state);
2. the bare teacher forward on exactly the cached views, already rendered and normalized, same
   batch size, threads, device and precision (the better of two passes);
3. the teacher units again in this process, one after the other, with the time inside the
   teacher forward, inside decoding + rendering, and inside encoding + writing accumulated
   separately. Both rates of this ratio come from the same seconds of the same run, so it moves
   less with other jobs on a shared machine than the wall-clock ratios of 1 and 2 (the load
   average is given), though a busy machine slows the two-thread forward and the one-thread
   rendering differently.

The ratio build / bare forward is what decoding, rendering, encoding, writing and scheduling
cost on top of the teacher; the goal is >= 0.9 on a GPU. On CPU the teacher is a random-init
DINOv2-reg ViT of ViT-S/14 width (384, 12 blocks, 6 heads); --large uses the real ViT-L/14 width
(for a GPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _report import machine_description, markdown_table, write_section  # noqa: E402

from cache_format.reader import open_cache  # noqa: E402
from cache_format.writer import CacheWriter  # noqa: E402
from precompute import units, worker_state  # noqa: E402
from precompute.build import build_cache  # noqa: E402
from precompute.config import CacheBuildConfig, load_build_config  # noqa: E402
from precompute.sources import open_source  # noqa: E402
from precompute.synthetic import make_image_folder  # noqa: E402
from precompute.teachers.loaded import load_teacher  # noqa: E402

VIEWS = 2


def write_config(root: Path, grid: int, threads: int, loader_workers: int, device: str,
                 large: bool, batch: int) -> Path:
    """A one-teacher build config over root/images."""
    dims = "" if large else "embed_dim = 384\ndepth = 12\nnum_heads = 6\n"
    text = f"""cache = "{root / 'cache'}"
grid = [{grid}, {grid}]
views_per_image = {VIEWS}
samples_per_shard = 32

[encoding]
name = "int8"

[build]
batch_size = {batch}
calibration_samples = 32

[runtime]
loader_workers = {loader_workers}
torch_threads = {threads}
device = "{device}"

[[teachers]]
name = "dino"
kind = "dino2reg_vitlarge_14"
init = "random"  # timing a random-init ViT-L: the weights do not change the speed
{dims}
[[datasets]]
name = "web"
kind = "folder"
root = "{root / 'images'}"
domain = "2d"
"""
    path = root / "cache.toml"
    path.write_text(text)
    return path


def bare_forward_rate(cfg: CacheBuildConfig, threads: int, device: str) -> tuple[float, int]:
    """(samples/s, samples) of the teacher alone on the cached views, inputs prepared first."""
    teacher = load_teacher(cfg.teacher("dino"), device)
    index = open_cache(cfg.cache).index("web")
    ok = np.flatnonzero(index.ok)
    source = open_source(cfg.dataset("web"))
    settings = units.UnitSettings(cfg, device, threads)
    inputs = torch.cat([x for _, x in units.teacher_inputs(settings, teacher, source, ok.tolist(),
                                                           index.view_params[ok])])
    batches = list(torch.split(inputs, cfg.build.batch_size))
    if device == "cuda":
        batches = [b.to(device) for b in batches]
    torch.set_num_threads(threads)
    units.forward(teacher, batches[0])  # warm-up
    best = float("inf")
    for _ in range(2):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for batch in batches:
            units.forward(teacher, batch)  # includes the copy of the tokens back to the host
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - began)
    return len(inputs) / best, len(inputs)


def unit_breakdown(cfg: CacheBuildConfig, threads: int, device: str) -> dict[str, float]:
    """Run every teacher unit in this process; seconds in total and per part."""
    timers = {"total": 0.0, "forward": 0.0, "inputs": 0.0, "write": 0.0, "samples": 0.0}
    forward, inputs, write = units.forward, units.teacher_inputs, CacheWriter.write_shard

    def timed_forward(teacher: Any, x: torch.Tensor) -> dict[str, np.ndarray]:
        began = time.perf_counter()
        out = forward(teacher, x)
        timers["forward"] += time.perf_counter() - began
        return out

    def timed_inputs(*args: Any) -> Iterator[tuple[list[int], torch.Tensor]]:
        items = inputs(*args)
        while True:
            began = time.perf_counter()
            item = next(items, None)
            timers["inputs"] += time.perf_counter() - began
            if item is None:
                return
            yield item

    def timed_write(self: CacheWriter, *args: Any) -> None:
        began = time.perf_counter()
        write(self, *args)
        timers["write"] += time.perf_counter() - began

    settings = units.UnitSettings(cfg, device, threads)
    # Loaded outside the timing.
    worker_state.acquire_teacher(cfg.teacher("dino"), torch.device(device))
    units.forward, units.teacher_inputs = timed_forward, timed_inputs  # type: ignore[assignment]
    CacheWriter.write_shard = timed_write  # type: ignore[method-assign]
    try:
        writer = CacheWriter.open(cfg.cache)
        source = open_source(cfg.dataset("web"))  # listed once, as the build's driver does
        for shard in range(writer.num_shards("web")):
            start, stop = writer.shard_bounds("web", shard)
            images = units.shard_images(source, cfg.views_per_image, start, stop)
            began = time.perf_counter()
            result = units.run_teacher_unit(settings, "dino", images, shard)
            timers["total"] += time.perf_counter() - began
            timers["samples"] += result.samples
    finally:
        units.forward, units.teacher_inputs, CacheWriter.write_shard = forward, inputs, write
        worker_state.release_teachers()
    return timers


def run(images: int, grids: list[int], large: bool) -> tuple[list[list[object]], ...]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = os.cpu_count() or 1
    # On a small CPU machine decoding processes would fight the forward's threads for the same
    # cores (OpenMP stalls when one of its threads is preempted): decode in the unit's thread.
    loader_workers = 4 if device == "cuda" else 0
    batch = 64 if device == "cuda" else 16
    name = "ViT-L/14" if large else "ViT-S/14 width"
    same_run: list[list[object]] = []
    dask_rows: list[list[object]] = []
    for grid in grids:
        root = Path(tempfile.mkdtemp(prefix="bench_build_"))
        try:
            make_image_folder(root / "images", images, size_range=(256, 512), seed=0)
            cfg_path = write_config(root, grid, threads, loader_workers, device, large, batch)
            cfg = load_build_config(cfg_path)
            load = os.getloadavg()[0]
            began = time.perf_counter()
            summary = build_cache(cfg, console=Console(quiet=True))
            total = time.perf_counter() - began
            (pair,) = summary.pairs.values()
            bare, samples = bare_forward_rate(cfg, threads, device)
            phase, end_to_end = pair.samples / pair.seconds, pair.samples / total
            dask_rows.append([
                name, f"{grid}x{grid} ({grid * 14} px)", samples, f"{bare:.1f}",
                f"{phase:.1f}", f"{phase / bare:.2f}", f"{end_to_end:.1f}",
                f"{end_to_end / bare:.2f}", f"{summary.cache_bytes / 1e6:.1f}", f"{load:.1f}",
            ])
            t = unit_breakdown(load_build_config(cfg_path, {"runtime.processes": False}),
                               threads, device)
            other = t["total"] - t["forward"] - t["inputs"] - t["write"]
            same_run.append([
                name, f"{grid}x{grid} ({grid * 14} px)", int(t["samples"]),
                f"{t['samples'] / t['forward']:.1f}", f"{t['samples'] / t['total']:.1f}",
                f"**{t['forward'] / t['total']:.2f}**",
                *(f"{100 * v / t['total']:.1f}%" for v in
                  (t["inputs"], t["forward"], t["write"], other)),
            ])
            print(dask_rows[-1], same_run[-1], flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return same_run, dask_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="one small grid, few images")
    parser.add_argument("--large", action="store_true", help="real ViT-L/14 width (GPU)")
    args = parser.parse_args()
    grids = [16] if args.quick else [16, 24]
    images = 24 if args.quick else args.images
    same_run, dask_rows = run(images, grids, args.large)
    cuda = torch.cuda.is_available()
    device = "GPU (bf16 autocast)" if cuda else "CPU (fp32)"
    decoding = ("4 DataLoader decoding processes per unit" if cuda
                else "images decoded in the unit's thread (loader_workers = 0)")
    body = "\n\n".join([
        f"Machine: {machine_description()}",
        f"One int8 teacher, {images} generated JPEG/PNG images of 256-512 px, {VIEWS} views "
        f"per image, on {device}, {decoding}, torch threads = all cores, batch size "
        f"{64 if cuda else 16} for every rate.",
        "**Same run, same seconds** (the teacher units run one after the other in the "
        "benchmark's process; the time inside the teacher forward, inside decoding + "
        "rendering, inside int8 encoding + statistics + writing, and the rest are accumulated "
        "separately; other jobs still slow the two-thread forward and the one-thread rendering "
        "differently):",
        markdown_table(
            ["teacher", "grid", "samples", "forward only img/s", "units img/s",
             "ratio", "decode + render", "forward", "encode + write", "other"], same_run),
        "**The dask build** (default local cluster, one worker process) against the bare "
        "forward on the cached views measured after it (the better of two passes). Wall-clock "
        "rates taken minutes apart: on a shared machine they move with the other jobs (load "
        "average at the build's start):",
        markdown_table(
            ["teacher", "grid", "samples", "bare forward img/s", "build teacher phase img/s",
             "ratio", "build end-to-end img/s", "ratio end-to-end", "cache MB", "load avg"],
            dask_rows),
        "Teacher phase: the build's units for this teacher, first submission to last result. "
        "End to end: the whole `build_cache` on a fresh cache (cluster start, index pass, int8 "
        "calibration forward on 32 samples, units, statistics). On CPU the views' rendering "
        "(crop, bicubic resize, colour jitter, blur, solarize) shares the cores with the "
        "forward; on a GPU it runs in decoding processes on the otherwise idle CPU cores while "
        "the GPU computes. This 2-core machine is shared with other jobs: rows taken under a "
        "high load average are the least reliable (repeated runs of this script gave 0.54 to "
        "0.97 for the same row). Goal: >= 0.9 on a GPU.",
    ])
    write_section("bench_build", body)


if __name__ == "__main__":
    main()
