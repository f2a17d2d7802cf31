"""Sample index benchmark: `SampleIndex.view_params_of` for batches of 256 random samples.

A cache holding only an index of 200k samples (100k images x 2 views, 64 samples per shard, so
3125 index-row chunks of 64 rows of 20 float32 + a status byte) is written with CacheWriter;
then, best of a few rounds, microseconds per call of `view_params_of(256 random samples)`:

- with a one-byte chunk cache: every touched chunk is read and checked (what a DUNE-scale run
  sees: 2 M chunks, random batches almost never hit a cached one);
- with the default 8 MiB chunk cache (about half of this small cache's chunks stay decoded);
- for reference, numpy fancy indexing of the whole in-memory array (what the old index did,
  holding [N, 20] float32 per process) and zarr-python's orthogonal selection of the same rows.

Also the time to load the statuses (all 3125 index-row chunks: the index is not finalized here,
so there is no consolidated status array). Prints only (no docs section).
Run: `.venv/bin/python tests/benchmarks/bench_cache_index.py`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr
from _report import machine_description, markdown_table

from cache_format.encodings import EncodingSpec
from cache_format.manifest import DatasetFingerprint, keys_sha256
from cache_format.reader import open_cache
from cache_format.testing import tiny_manifest
from cache_format.writer import CacheWriter

NUM_IMAGES, VIEWS, PER_SHARD, NUM_PARAMS = 100_000, 2, 64, 20
BATCH, CALLS, ROUNDS = 256, 200, 3


def build(path: Path) -> None:
    """An index-only cache of NUM_IMAGES x VIEWS samples."""
    manifest = replace(tiny_manifest(EncodingSpec("int8"), views_per_image=VIEWS,
                                     samples_per_shard=PER_SHARD),
                       view_param_names=tuple(f"p{i}" for i in range(NUM_PARAMS)))
    writer = CacheWriter.create(path, manifest)
    keys = [f"imagenet19k/n{i % 19000:08d}/img_{i:09d}.JPEG" for i in range(NUM_IMAGES)]
    writer.add_dataset(DatasetFingerprint(name="big", source_kind="list", root="/data",
                                          num_images=NUM_IMAGES, keys_sha256=keys_sha256(keys),
                                          domain="2d"), keys)
    rng = np.random.default_rng(0)
    n = writer.num_samples("big")
    params = rng.uniform(0, 500, (n, NUM_PARAMS)).astype(np.float32)
    status = np.ones(n, dtype=np.uint8)
    for shard in range(writer.num_shards("big")):
        start, stop = writer.shard_bounds("big", shard)
        writer.write_index_shard("big", shard, params[start:stop], status[start:stop])


def per_call_us(fn: Callable[[np.ndarray], object], batches: list[np.ndarray]) -> float:
    """Microseconds per call of `fn` over `batches`, best of ROUNDS."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for batch in batches:
            fn(batch)
        best = min(best, (time.perf_counter() - start) / len(batches))
    return best * 1e6


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache"
        start = time.perf_counter()
        build(path)
        print(f"built {NUM_IMAGES * VIEWS} samples in {time.perf_counter() - start:.1f} s")
        rng = np.random.default_rng(1)
        n = NUM_IMAGES * VIEWS
        batches = [rng.integers(0, n, BATCH) for _ in range(CALLS)]
        array = zarr.open_group(str(path), mode="r")["datasets/big/index_rows"]
        rows_whole = array[:]  # type: ignore[index]
        whole = np.ascontiguousarray(rows_whole[:, :-1]).view("<f4")  # the status byte is last
        rows = []
        with open_cache(path, sample_index_cache_bytes=1) as reader:
            index = reader.index("big")
            start = time.perf_counter()
            assert index.status.all()
            status_s = time.perf_counter() - start
            for batch in batches[:5]:
                np.testing.assert_array_equal(index.view_params_of(batch), whole[batch])
            rows.append(["SampleIndex, every chunk read (1-byte cache)",
                         per_call_us(index.view_params_of, batches)])
        with open_cache(path) as reader:
            index = reader.index("big")
            for batch in batches:  # warm the LRU
                index.view_params_of(batch)
            rows.append(["SampleIndex, default 8 MiB chunk cache",
                         per_call_us(index.view_params_of, batches)])
        rows.append(["whole array in memory, numpy fancy indexing",
                     per_call_us(lambda b: whole[b], batches)])
        rows.append(["zarr-python get_orthogonal_selection (index rows)",
                     per_call_us(lambda b: array.get_orthogonal_selection(  # type: ignore[union-attr]
                         (np.unique(b), slice(None))), batches[:10])])
        print(machine_description())
        print(f"view_params_of({BATCH} random samples of {n}), {n // PER_SHARD} chunks of "
              f"{PER_SHARD} x {NUM_PARAMS} float32; status load: {status_s * 1e3:.0f} ms "
              f"for {n // PER_SHARD} chunks")
        print(markdown_table(["read", "us per call"], [[r, f"{us:.0f}"] for r, us in rows]))


if __name__ == "__main__":
    main()
