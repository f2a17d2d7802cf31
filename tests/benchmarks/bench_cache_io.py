"""Cache I/O benchmark: size, encode/decode speed, random-access reads and fidelity per encoding.

Tokens are shaped like one ViT-L teacher at 448 px: 1024 patch tokens + 1 cls token of width
1024, synthetic activations with outlier channels. For every encoding the script writes a
sharded store of NUM_SAMPLES samples with CacheWriter, then measures, in one run and side by
side, random single-sample reads through our reader (checksums verified) against raw `os.pread`
calls of exactly the same byte ranges (a sample's record chunk, checksum included), plus
zarr-python's generic `array[i]` for reference, and splits a single read's time into the
positional read, the checksum pass and the rest (Python, tensors). Rates are the best of
interleaved chunks (the machine is shared; the best chunk is the least disturbed one).
Run: `.venv/bin/python tests/benchmarks/bench_cache_io.py [--quick]`; `--quick` measures the
uncompressed encodings only (fp16, bf16, int8, int4 and int4h with codec none: the ones whose
single-read ratio against raw `pread` is a goal) and writes them to its own section of
docs/benchmarks.md (`bench_cache_io_quick`), leaving the full run's section as it is;
`--only int4,int4h` measures those encodings (codec none) and prints without writing. Both
sections also time every installed crc32c implementation on this host (checksum.py picks the
fastest by measurement; DUNE_CRC32C=NAME fixes it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr
from _report import machine_description, markdown_table, write_section
from numcodecs import Blosc, Zstd

from cache_format.checksum import IMPLEMENTATION as CRC_IMPLEMENTATION
from cache_format.checksum import IMPLEMENTATIONS as CRC_IMPLEMENTATIONS
from cache_format.checksum import THREADED_IMPLEMENTATION as CRC_THREADED
from cache_format.checksum import crc32c_value  # the reader's own checksum function
from cache_format.encodings import EncodingSpec, decode_tokens, encode_tokens, fit_calibration
from cache_format.reader import open_cache
from cache_format.testing import synthetic_activations, tiny_dataset, tiny_manifest, tiny_teacher
from cache_format.writer import CacheWriter

GRID, DIM = (32, 32), 1024
NUM_SAMPLES = 192  # 3 shards of 64
SHARD = 64
BATCH = 32
CHUNK = 64  # samples per timed chunk of a random-access variant (more bytes than the L3 cache)
REPS = 40  # chunks per variant, interleaved across variants (order rotated every chunk)
ROUNDS = 3  # repeats of the CPU-speed measurements
SPECS = [EncodingSpec(n, c, 3) for n in ("fp16", "bf16", "int8") for c in ("none", "zstd", "blosc")]
SPECS += [EncodingSpec("int4"), EncodingSpec("int4h")]  # 4-bit: meant for codec none
FP16_SAMPLE_MB = (GRID[0] * GRID[1] + 1) * DIM * 2 / 1e6


def _rate(fn: Callable[[], object], repeats: int) -> float:
    """Calls per second of `fn`, best of ROUNDS."""
    best = 0.0
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = max(best, repeats / (time.perf_counter() - start))
    return best


def _codec_round_trip(spec: EncodingSpec, values: np.ndarray) -> tuple[bytes, Callable]:
    """The lossless codec step as zarr applies it to one chunk: (compressed, decompress)."""
    if spec.codec == "none":  # the reader reads straight into a writable array
        return bytearray(values.tobytes()), lambda raw: np.frombuffer(raw, values.dtype)
    codec = Zstd(level=spec.level) if spec.codec == "zstd" else Blosc(
        cname="zstd", clevel=spec.level, shuffle=Blosc.BITSHUFFLE, typesize=values.itemsize)
    return codec.encode(values), lambda raw: np.frombuffer(codec.decode(raw), values.dtype)


def _cpu_speeds(spec: EncodingSpec, x: np.ndarray, calib: tuple) -> tuple[float, float, float]:
    """Encode / numpy decode / torch decode MB/s (fp16-equivalent bytes) of one sample, 1 core."""
    patch = x[0]
    encoded_once: dict = {}

    def encode() -> None:
        values, scale = encode_tokens(patch, spec, *calib)
        encoded_once["chunk"] = _codec_round_trip(spec, values)
        encoded_once["scale"] = scale

    encode()
    raw, decompress = encoded_once["chunk"]
    scale = encoded_once["scale"]
    shape = (patch.shape[0], spec.stored_dim(patch.shape[1]))  # int4: two values per byte
    t_scale = None if scale is None else torch.from_numpy(scale)
    t_calib = tuple(torch.from_numpy(c) for c in calib) if calib[0] is not None else (None, None)

    def decode_numpy() -> None:
        decode_tokens(decompress(raw).reshape(shape), scale, spec, *calib)

    def decode_torch() -> None:
        values = torch.from_numpy(decompress(raw).reshape(shape))
        from cache_format.encodings import decode_tokens_torch

        decode_tokens_torch(values, t_scale, spec, *t_calib)

    mb = patch.size * 2 / 1e6
    return _rate(encode, 10) * mb, _rate(decode_numpy, 30) * mb, _rate(decode_torch, 30) * mb


def _crc_speeds() -> list[list[str]]:
    """Microseconds per MB of each installed crc32c, one core: on a 512 KiB buffer that sits in
    the L2 cache (as a record just read does) and on a 2.1 MB one (an fp16 record), best of
    interleaved rounds."""
    rows = []
    for nbytes in (512 << 10, int(FP16_SAMPLE_MB * 1e6)):
        data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        best = dict.fromkeys(CRC_IMPLEMENTATIONS, float("inf"))
        for _ in range(50):
            for name, impl in CRC_IMPLEMENTATIONS.items():
                start = time.perf_counter()
                impl.value(data)
                best[name] = min(best[name], time.perf_counter() - start)
        rows.append([f"{nbytes / 1e6:.2f}"] + [f"{best[n] / nbytes * 1e12:.1f}" for n in best])
    return rows


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def _build(path: Path, spec: EncodingSpec, patch: np.ndarray, cls: np.ndarray) -> float:
    """Write the store; returns writer samples/s (encode + statistics + write)."""
    manifest = tiny_manifest(spec, grid=GRID, views_per_image=1, samples_per_shard=SHARD)
    writer = CacheWriter.create(path, manifest)
    fingerprint, keys = tiny_dataset("ds", NUM_SAMPLES)
    writer.add_dataset(fingerprint, keys)
    calibration = {"patch": fit_calibration(patch[:8]), "cls": fit_calibration(cls)}
    writer.add_teacher("ds", tiny_teacher("vitl", dim=DIM), calibration)
    start = time.perf_counter()
    for shard in range(writer.num_shards("ds")):
        a, b = writer.shard_bounds("ds", shard)
        # The same SHARD samples in every shard: synthesizing 200 MB of tokens is not the point.
        writer.write_shard("ds", "vitl", shard, {"patch": patch[: b - a], "cls": cls[: b - a]},
                           np.ones(b - a, bool))
    rate = NUM_SAMPLES / (time.perf_counter() - start)
    writer.finalize_stats("ds", "vitl")
    return rate


def _raw_ranges(reader, samples: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """Per sample, the (fd, offset, nbytes) of each of its chunks (the same bytes we read:
    the sample's record chunk, checksum included)."""
    fast = reader._fast  # the benchmark looks inside on purpose: same index, same byte ranges
    layouts = [part.records for part in reader._plan("ds", ("vitl",)).parts]
    fds: dict[str, int] = {}
    result = []
    for sample in samples.tolist():
        ranges = []
        for lay in layouts:
            index, key = fast.shard_index(lay, sample // SHARD)
            offset, nbytes = np.frombuffer(index, "<u8")[2 * (sample % SHARD):][:2].tolist()
            if key not in fds:
                fds[key] = os.open(os.path.join(reader.location, key), os.O_RDONLY)
            ranges.append((fds[key], offset, nbytes))
        result.append(ranges)
    return result


def _random_access(path: Path, rng: np.random.Generator) -> dict[str, float]:
    """Samples/s of random reads: ours against raw preads of the same byte ranges.

    Modes: one call per sample ("single", also without checksum verification), and calls of
    BATCH samples with 1 or 4 threads; raw batches are also read into one batch array (what any
    batch reader must at least do). The machine is shared, so every variant runs CHUNK samples
    in turn, REPS times over, and the fastest chunk of each variant counts: interference only
    ever slows a chunk down.
    """
    samples = rng.integers(0, NUM_SAMPLES, CHUNK * REPS)
    rates: dict[str, float] = {}
    checked = open_cache(path, threads=1)
    unchecked = open_cache(path, threads=1, verify_checksums=False)
    threaded = open_cache(path, threads=4)
    pool = ThreadPoolExecutor(4)
    try:
        by_sample = dict(zip(samples.tolist(), _raw_ranges(checked, samples), strict=True))
        # Every shard index loaded once, as in training: one sample per shard. (Reading all
        # CHUNK * REPS samples in one call, as this line once did, makes a 5 GB batch that each
        # reader's BufferPool then keeps: three readers ran the machine out of memory.)
        first_of_shard = sorted({s // SHARD * SHARD for s in samples.tolist()})
        for reader in (checked, unchecked, threaded):
            reader.read_encoded("ds", first_of_shard)
        sample_bytes = max(sum(n for _, _, n in r) for r in by_sample.values())
        batch_buffer = np.empty((BATCH, sample_bytes), np.uint8)
        record = np.empty(sample_bytes, np.uint8)  # one reused buffer, as our reader has

        def raw_one(sample: int) -> None:
            for fd, offset, nbytes in by_sample[sample]:
                os.pread(fd, nbytes, offset)

        def record_one(sample: int, crc: bool) -> None:
            """The floor of a verified read: the same bytes into one reused buffer (+ crc32c
            of all but the stored 4-byte checksum)."""
            for fd, offset, nbytes in by_sample[sample]:
                os.preadv(fd, [record[:nbytes]], offset)
                if crc and crc32c_value(record[: nbytes - 4]) != int.from_bytes(
                        record[nbytes - 4 : nbytes].tobytes(), "little"):
                    raise AssertionError(f"sample {sample}: checksum mismatch")

        def raw_into(rows: list[tuple[int, int]]) -> None:
            """Read each (row, sample)'s ranges into row `row` of the batch array."""
            for row, sample in rows:
                at = 0
                for fd, offset, nbytes in by_sample[sample]:
                    os.preadv(fd, [batch_buffer[row, at : at + nbytes]], offset)
                    at += nbytes

        def raw_batch(batch: list[int], threads: int, into: bool) -> None:
            rows = list(enumerate(batch))
            parts = [rows[i::threads] for i in range(threads)]
            work = raw_into if into else (lambda part: [raw_one(s) for _, s in part])
            if threads == 1:
                work(rows)
            else:
                list(pool.map(work, parts))

        # Results are dropped at once, as a training step drops its batch (keeping them all
        # alive would measure fresh page allocation instead of reading).
        def per_sample(fn: Callable[[int], object]) -> Callable[[list[int]], None]:
            def run(chunk: list[int]) -> None:
                for sample in chunk:
                    fn(sample)
            return run

        def batched(fn: Callable[[list[int]], object]) -> Callable[[list[int]], None]:
            def run(chunk: list[int]) -> None:
                for i in range(0, len(chunk), BATCH):
                    fn(chunk[i : i + BATCH])
            return run

        variants: dict[str, Callable[[list[int]], object]] = {
            "ours_single": per_sample(lambda s: checked.read_encoded("ds", [s])),
            "unchecked_single": per_sample(lambda s: unchecked.read_encoded("ds", [s])),
            "raw_single": per_sample(raw_one),
            "record_single": per_sample(lambda s: record_one(s, crc=False)),
            "recordcrc_single": per_sample(lambda s: record_one(s, crc=True)),
        }
        for threads, reader in ((1, checked), (4, threaded)):
            variants[f"ours_batch{threads}"] = batched(
                lambda b, r=reader: r.read_encoded("ds", b))
            variants[f"raw_batch{threads}"] = batched(
                lambda b, t=threads: raw_batch(b, t, into=False))
            variants[f"rawinto_batch{threads}"] = batched(
                lambda b, t=threads: raw_batch(b, t, into=True))
        names = list(variants)
        for rep in range(REPS):
            chunk = samples[rep * CHUNK : (rep + 1) * CHUNK].tolist()
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                fn = variants[name]
                start = time.perf_counter()
                fn(chunk)
                rates[name] = max(rates.get(name, 0.0), CHUNK / (time.perf_counter() - start))
    finally:
        pool.shutdown()
        for reader in (checked, unchecked, threaded):
            reader.close()
    records = zarr.open_group(path, mode="r")["datasets/ds/teachers/vitl/tokens"]
    rates["zarr"] = _rate(lambda: records[int(rng.integers(NUM_SAMPLES))], 20)
    return rates


def _batch_cells(reads: dict[str, float], threads: int) -> list[str]:
    ours, raw, into = (reads[f"{k}_batch{threads}"] for k in ("ours", "raw", "rawinto"))
    return [f"{ours:.0f}", f"{raw:.0f} / {into:.0f}", f"**{ours / raw:.2f}** / {ours / into:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="uncompressed encodings only, into their own docs section")
    parser.add_argument("--only", default="", help="comma-separated encoding names: measure "
                        "only those, codec none, and print without writing the section")
    args = parser.parse_args()
    quick = args.quick
    only = [n for n in args.only.split(",") if n]
    if only:
        specs = [s for s in SPECS if s.name in only and s.codec == "none"]
    else:
        specs = [s for s in SPECS if s.codec == "none"] if quick else SPECS
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    patch = synthetic_activations(rng, (SHARD, GRID[0] * GRID[1], DIM))
    cls = synthetic_activations(rng, (SHARD, DIM))
    probe = synthetic_activations(rng, (4, GRID[0] * GRID[1], DIM))
    size_rows, read_rows, split_rows = [], [], []
    loads = []
    crc_rows = _crc_speeds()
    workdir = Path(tempfile.mkdtemp(prefix="bench_cache_io_"))
    try:
        for spec in specs:
            calib = fit_calibration(patch[:8]) if spec.has_scale else (None, None)
            encode_mb, dec_np, dec_torch = _cpu_speeds(spec, probe, calib)
            decoded = decode_tokens(*encode_tokens(probe, spec, *calib), spec, *calib)
            cos = _cosines(decoded, probe)
            path = workdir / f"{spec.name}-{spec.codec}"
            write_rate = _build(path, spec, patch, cls)
            token_dir = path / "datasets/ds/teachers/vitl"
            nbytes = sum(f.stat().st_size for f in (token_dir / "tokens" / "c").rglob("*")
                         if f.is_file())
            reads = _random_access(path, rng)
            loads.append(os.getloadavg()[0])
            label = [spec.name, spec.codec]
            us = {k: 1e6 / v for k, v in reads.items()}
            split_rows.append(label + [
                f"{us['raw_single']:.1f}", f"{us['record_single']:.1f}",
                f"{us['recordcrc_single']:.1f}", f"{us['unchecked_single']:.1f}",
                f"{us['ours_single']:.1f}",
                f"{us['recordcrc_single'] - us['record_single']:.1f}",
                f"{us['ours_single'] - us['recordcrc_single']:.1f}",
                f"{reads['recordcrc_single'] / reads['raw_single']:.2f}"])
            size_rows.append(label + [
                f"{nbytes / NUM_SAMPLES / 1e6:.3f}", f"{encode_mb:.0f}", f"{dec_np:.0f}",
                f"{dec_torch:.0f}", f"{write_rate:.1f}", f"{cos.mean():.6f}",
                f"{np.percentile(cos, 1):.6f}"])
            read_rows.append(label + [
                f"{reads['ours_single']:.0f}", f"{reads['raw_single']:.0f}",
                f"**{reads['ours_single'] / reads['raw_single']:.2f}**",
                f"{reads['unchecked_single'] / reads['raw_single']:.2f}",
                *_batch_cells(reads, 1), *_batch_cells(reads, 4), f"{reads['zarr']:.0f}"])
            print(size_rows[-1], read_rows[-1], flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    forced = os.environ.get("DUNE_CRC32C")
    crc_fixed = f"; DUNE_CRC32C={forced} fixed both" if forced else ""
    body = "\n\n".join([
        f"Machine: {machine_description()}; load average (1 min) while reading: "
        f"{min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores (other engineers' jobs "
        f"share them).",
        f"One sample = one ViT-L teacher at 448 px: patch [{GRID[0] * GRID[1]}, {DIM}] + cls "
        f"[{DIM}], synthetic activations with 4 outlier channels 50-200x the median (fp16 = "
        f"{FP16_SAMPLE_MB:.2f} MB). Store: {NUM_SAMPLES} samples, {SHARD} per shard, page cache "
        f"warm.",
        "Size, speed and fidelity. MB/s count fp16-equivalent bytes (2 per value) of one "
        "sample's patch tokens on one core (torch.set_num_threads(1)); encode includes the "
        "lossless codec, decode includes decompression. Writer = `CacheWriter.write_shard` "
        "(encode, statistics of decoded values, write), samples/s. Cosine per token against "
        "float32.",
        markdown_table(["encoding", "codec", "MB/sample", "encode MB/s", "decode MB/s (numpy)",
                        "decode MB/s (torch)", "writer samples/s", "mean cos", "p1 cos"],
                       size_rows),
        f"Random access, samples/s (a sample's record: patch, cls and, for int8, their scales, "
        f"one chunk). *ours* = `CacheReader.read_encoded` (shard index cached, direct "
        f"byte-range reads, every chunk's crc32c verified (with {CRC_IMPLEMENTATION} on the "
        f"calling thread, {CRC_THREADED} on reader threads), output as torch tensors); *raw* = "
        f"`os.pread` of exactly the same byte range (the record chunk with its 4-byte "
        f"checksum), nothing verified. *single* = one call per random "
        f"sample; *batch* = calls of {BATCH} random samples with 1 or 4 reader threads (raw: "
        f"the same split over 1 or 4 threads). *raw-into* = `os.preadv` of the same ranges into "
        f"one batch array, the least any batch reader must do: a batch no longer fits the CPU "
        f"caches, while plain `pread` keeps reusing one hot buffer. *no crc check* = ours with "
        f"`verify_checksums=False`, to show what the checksum pass costs. zarr = zarr-python "
        f"`array[i]` on the record array. Best chunk of {REPS} interleaved chunks of "
        f"{CHUNK} random samples per variant (variant order rotated every chunk; a chunk's "
        f"{CHUNK} records are larger than the L3 cache, so every read starts cold, as in "
        f"training on a large cache).",
        markdown_table(["encoding", "codec", "ours single", "raw single", "ratio",
                        "ratio, no crc check", "ours batch 1 thr", "raw / raw-into 1 thr",
                        "ratio to raw / raw-into", "ours batch 4 thr", "raw / raw-into 4 thr",
                        "ratio to raw / raw-into", "zarr array[i]"], read_rows),
        "Where a single verified read's time goes, microseconds per sample (best chunks of the "
        "run above). *read* = `os.preadv` of the record into one reused buffer, *+ crc* = the "
        "same plus the reader's crc32c pass over it: with nothing else, a verified read could "
        "reach *ceiling* = raw / (+ crc) of raw's rate. *checksum* = (+ crc) - read; *rest* = "
        "ours - (+ crc): Python, shard index lookup, output buffers and torch tensors (and "
        "decompression for zstd/blosc).",
        markdown_table(["encoding", "codec", "raw pread", "read", "+ crc", "ours, no crc check",
                        "ours", "checksum", "rest", "ceiling"], split_rows),
        f"crc32c implementations on this host, microseconds per MB on one core (best of 50 "
        f"interleaved rounds over one buffer; checksum.py measured them at import and chose "
        f"{CRC_IMPLEMENTATION} for the calling thread, {CRC_THREADED} for reader threads"
        f"{crc_fixed}).",
        markdown_table(["buffer MB"] + list(CRC_IMPLEMENTATIONS), crc_rows),
    ])
    print(body)
    # --quick writes its own section: the full run's tables (compressed codecs too) stay.
    if not only:
        write_section("bench_cache_io_quick" if quick else "bench_cache_io", body)


if __name__ == "__main__":
    main()
