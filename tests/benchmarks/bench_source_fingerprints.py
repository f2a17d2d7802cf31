"""Benchmark: what the source fingerprints (issue 10, item 7) cost the build and the trainer.

    .venv/bin/python tests/benchmarks/bench_source_fingerprints.py [--quick] [--repeats N]

On the demo's data (train/demo.py's DemoSizes: 352 generated JPEG/PNG images of 48-128 px, three
datasets; --quick: a quarter of them) plus 32 ImageNet-size JPEGs (375-500 px):
1. per image: reading the file, decoding it (`decode_image`), and checksumming its bytes with
   each candidate (CRC-64/XZ from fastcrc, the one used; hashlib's blake2b with an 8-byte
   digest and sha256; xxhash's xxh3_64 when installed, which is not a dependency);
2. the build: the demo's `dune-cache build` (three stand-in teachers) end to end, and its index
   phase alone (`run_index_unit` over every shard, decoding in the unit's thread), with the
   fingerprint computed and with it replaced by a constant (no hashing);
3. the trainer's loader: `CacheTrainData.__getitems__` over every item in batches of 16, with
   `check_source_fingerprints` on and off.
Variants alternate and the best of `--repeats` passes is kept (other jobs share the machine;
the load average is given). Writes the "bench_source_fingerprints" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _report import machine_description, markdown_table, write_section  # noqa: E402

from cache_format.source_fingerprint import ALGORITHM, fingerprint  # noqa: E402
from cache_format.writer import CacheWriter  # noqa: E402
from precompute import sources, units  # noqa: E402
from precompute.build import build_cache  # noqa: E402
from precompute.config import load_build_config  # noqa: E402
from precompute.dataset_keys import DatasetConfig  # noqa: E402
from precompute.decode import decode_image  # noqa: E402
from precompute.sources import open_source  # noqa: E402
from precompute.synthetic import make_image_folder  # noqa: E402
from train.data import CacheTrainData  # noqa: E402
from train.demo import DemoSizes, write_demo_configs  # noqa: E402


def candidates() -> dict[str, Callable[[bytes], object]]:
    """The checksums compared (name -> function of the bytes)."""
    out: dict[str, Callable[[bytes], object]] = {
        f"{ALGORITHM} (fastcrc, used)": fingerprint,
        "blake2b-64 (hashlib)": lambda d: hashlib.blake2b(d, digest_size=8).digest(),
        "sha256 (hashlib)": lambda d: hashlib.sha256(d).digest(),
    }
    try:
        import xxhash

        out["xxh3-64 (xxhash, not a dependency)"] = xxhash.xxh3_64_intdigest
    except ImportError:
        pass
    return out


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """The best wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def per_image(files: list[bytes], names: list[str], repeats: int) -> list[list[object]]:
    """Mean microseconds per image: decode, and each checksum (with MB/s and % of decode)."""
    decode = best_of(lambda: [decode_image(d, n) for d, n in zip(files, names, strict=True)],
                     repeats) / len(files)
    mb = sum(len(d) for d in files) / len(files) / 1e6
    rows: list[list[object]] = [["decode_image", f"{decode * 1e6:.0f}", "-", "100%"]]
    for name, fn in candidates().items():
        t = best_of(lambda fn=fn: [fn(d) for d in files], repeats) / len(files)
        rows.append([name, f"{t * 1e6:.1f}", f"{mb / t:.0f}", f"{100 * t / decode:.1f}%"])
    return rows


@contextmanager
def hashing(on: bool):  # type: ignore[no-untyped-def]
    """The fingerprint as the sources compute it, or a constant (no checksum pass)."""
    saved = sources.fingerprint
    if not on:
        sources.fingerprint = lambda data: 0  # type: ignore[assignment]
    try:
        yield
    finally:
        sources.fingerprint = saved


def index_phase(cache_toml: Path, cache: Path) -> float:
    """Seconds of every index unit of the built cache, in this thread."""
    cfg = load_build_config(cache_toml, {"cache": str(cache), "runtime.loader_workers": 0})
    settings = units.UnitSettings(cfg, "cpu", 1)
    writer = CacheWriter.open(cfg.cache)
    began = time.perf_counter()
    for dataset in cfg.datasets:
        source = open_source(dataset, cfg.build.max_pixels, cfg.build.unusual_modes)
        for shard in range(writer.num_shards(dataset.name)):
            start, stop = writer.shard_bounds(dataset.name, shard)
            units.run_index_unit(settings, units.shard_images(
                source, cfg.views_per_image, start, stop), shard)
    return time.perf_counter() - began


def loader_pass(cache: Path, check: bool) -> tuple[float, int]:
    """(seconds, items) of reading every item in batches of 16."""
    data = CacheTrainData(cache, heldout_images=0, check_source_fingerprints=check)
    items = list(range(len(data)))
    began = time.perf_counter()
    for at in range(0, len(items), 16):
        data.__getitems__(items[at : at + 16])
    return time.perf_counter() - began, len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the demo's images")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = DemoSizes(images=(40, 24, 24)) if args.quick else DemoSizes()
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache_toml, _ = write_demo_configs(root / "demo", sizes)
        photos = make_image_folder(str(root / "photos"), 32, (375, 500), seed=5)
        demo_cfg = load_build_config(cache_toml)
        demo_files, demo_names = [], []
        for dataset in demo_cfg.datasets:
            source = open_source(dataset)
            for i in range(len(source)):
                demo_files.append(source.read_bytes(i))
                demo_names.append(source.location(i))
        photo_source = open_source(DatasetConfig(name="photos", kind="folder",
                                                 root=str(root / "photos"), domain="2d"))
        photo_files = [photo_source.read_bytes(i) for i in range(len(photos))]
        photo_names = [photo_source.location(i) for i in range(len(photos))]
        loads.append(os.getloadavg()[0])
        demo_rows = per_image(demo_files, demo_names, args.repeats)
        photo_rows = per_image(photo_files, photo_names, args.repeats)
        loads.append(os.getloadavg()[0])

        # The build, end to end and its index phase, hashing on and off (alternating).
        builds: dict[bool, list[float]] = {True: [], False: []}
        index: dict[bool, list[float]] = {True: [], False: []}
        for k in range(args.repeats):
            for on in (True, False):
                cache = root / f"cache-{k}-{on}"
                cfg = load_build_config(cache_toml, {"cache": str(cache)})
                with hashing(on):
                    began = time.perf_counter()
                    build_cache(cfg, console=Console(quiet=True))
                    builds[on].append(time.perf_counter() - began)
                    torch.set_num_threads(1)
                    index[on].append(index_phase(cache_toml, cache))
                loads.append(os.getloadavg()[0])
        built = root / f"cache-0-{True}"

        loader: dict[bool, list[float]] = {True: [], False: []}
        items = 0
        for _ in range(args.repeats):
            for on in (True, False):
                seconds, items = loader_pass(built, on)
                loader[on].append(seconds)
        loads.append(os.getloadavg()[0])

    def ms(values: list[float], scale: float = 1e3) -> str:
        return f"{min(values) * scale:.0f}"

    n_images = sum(sizes.images)
    demo_kb = sum(len(d) for d in demo_files) / len(demo_files) / 1e3
    photo_kb = sum(len(d) for d in photo_files) / len(photo_files) / 1e3
    header = ["per image", "us", "MB/s", "of decode"]
    body = "\n".join([
        f"Machine: {machine_description()}; load average (1 min) during the run: "
        f"{min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores (other jobs share "
        f"them). {'--quick: ' if args.quick else ''}{n_images} demo images, best of "
        f"{args.repeats} alternating passes.",
        "",
        f"Checksumming an image's file bytes against decoding it, microseconds per image "
        f"(one core). Demo images ({len(demo_files)} files, 48-128 px, {demo_kb:.1f} kB on "
        "average):",
        "",
        markdown_table(header, demo_rows),
        "",
        f"ImageNet-size JPEGs ({len(photo_files)} files, 375-500 px, {photo_kb:.1f} kB on "
        "average):",
        "",
        markdown_table(header, photo_rows),
        "",
        "The demo's build (three stand-in teachers, in-process cluster) and its index phase "
        "(every index unit in one thread: read, decode, fingerprint, views, write), seconds, "
        "with the fingerprint computed and replaced by a constant; the trainer's loader "
        f"(`CacheTrainData.__getitems__`, {items} items in batches of 16: replay, render, "
        "encoded tokens) with the check on and off:",
        "",
        markdown_table(["what", "fingerprints on", "off", "on / off"], [
            ["build, end to end (s)", f"{min(builds[True]):.1f}", f"{min(builds[False]):.1f}",
             f"{min(builds[True]) / min(builds[False]):.3f}"],
            ["index phase (s)", f"{min(index[True]):.2f}", f"{min(index[False]):.2f}",
             f"{min(index[True]) / min(index[False]):.3f}"],
            ["loader, all items (s)", f"{min(loader[True]):.2f}", f"{min(loader[False]):.2f}",
             f"{min(loader[True]) / min(loader[False]):.3f}"],
            ["loader, per item (us)", ms([t / items for t in loader[True]], 1e6),
             ms([t / items for t in loader[False]], 1e6), ""],
        ]),
    ])
    print(body)
    write_section("bench_source_fingerprints", body)


if __name__ == "__main__":
    main()
