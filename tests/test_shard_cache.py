"""The local shard cache of remote caches (cache_format/shard_cache.py) and its prefetcher
(train/shard_prefetch.py): same bytes as direct reads, one fetch per shard across readers and
processes, bounded by LRU eviction, a damaged copy fetched again, settings carried to workers.

The remote store is an in-memory fsspec filesystem that counts the requests for token shard
objects (the S3 server is not needed to test the cache's logic)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from cache_format.encodings import EncodingSpec
from cache_format.errors import CacheCorruptionError, ConfigError, RemoteReadError
from cache_format.files import FsspecFiles, RetryPolicy
from cache_format.reader import open_cache
from cache_format.records import OpenSettings
from cache_format.shard_cache import CachedFiles, DiskShardCache
from cache_format.testing import build_tiny_cache
from train.config import DataConfig
from train.shard_prefetch import ShardPrefetchSampler

TOKENS = "/tokens/c/"
ROWS = "/index_rows/c/"
SAMPLES = 10 * 2  # tiny_manifest: 2 views per image, 4 samples per shard -> 5 shards


class CountingFileSystem(MemoryFileSystem):
    """A memory filesystem counting the requests for token shard objects and view-row chunks
    that an object store would answer: every whole or ranged read (`cat_file`), every open for
    reading (a streamed copy, `get_file`, reads one opened object: one GET) and every size or
    existence check (`info`: a HEAD)."""

    protocol = "dunetestcount"
    token_reads = 0
    row_reads = 0  # of view-row chunks

    @classmethod
    def _count(cls, path: str) -> None:
        if TOKENS in path:
            cls.token_reads += 1
        if ROWS in path:
            cls.row_reads += 1

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: object) -> bytes:
        self._count(path)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def info(self, path: str, **kwargs: object) -> dict:
        self._count(path)
        return super().info(path, **kwargs)

    def _open(self, path: str, mode: str = "rb", **kwargs: object) -> object:
        if "r" in mode:
            self._count(path)
        return super()._open(path, mode, **kwargs)


@pytest.fixture(scope="module")
def remote() -> str:
    import fsspec

    fsspec.register_implementation(CountingFileSystem.protocol, CountingFileSystem, clobber=True)
    url = f"{CountingFileSystem.protocol}://shard-cache-test"
    build_tiny_cache(url, EncodingSpec("int8"), datasets=(("ds", 10),), invalid=())
    return url


def _writes(data: bytes | None) -> Callable[[str], int | None]:
    """A fill's fetch that writes `data` to the temporary file (None: no such object)."""
    def fetch(tmp: str) -> int | None:
        return None if data is None else Path(tmp).write_bytes(data)

    return fetch


def _tokens(reader: object, samples: list[int]) -> np.ndarray:
    return reader.read_encoded("ds", samples)["t1"]["patch"].values.numpy().copy()  # type: ignore[attr-defined]


def _copies(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and TOKENS.strip("/") in
                  p.as_posix())


def test_reads_through_the_cache_equal_direct_reads_and_fetch_each_shard_once(
        remote: str, tmp_path: Path) -> None:
    samples = list(range(SAMPLES))[::-1]
    with open_cache(remote) as direct:
        want = _tokens(direct, samples)
    CountingFileSystem.token_reads = 0
    with open_cache(remote, shard_cache_dir=tmp_path, shard_cache_bytes=1 << 30) as cached:
        np.testing.assert_array_equal(_tokens(cached, samples), want)
        np.testing.assert_array_equal(_tokens(cached, samples[:7]), want[:7])
        # A worker reopens the cache with the same settings, hence the same folder.
        worker = pickle.loads(pickle.dumps(cached))
    assert CountingFileSystem.token_reads == 5  # one whole-object request per shard
    assert len(_copies(tmp_path)) == 5
    with worker:
        assert worker.settings.shard_cache_dir == str(tmp_path)
        np.testing.assert_array_equal(_tokens(worker, samples), want)
    assert CountingFileSystem.token_reads == 5  # all local now


def test_a_damaged_local_copy_is_fetched_again(remote: str, tmp_path: Path) -> None:
    with open_cache(remote) as direct:
        want = _tokens(direct, list(range(SAMPLES)))
        want_rows = direct.index("ds").view_params_of([0, 1])
    with open_cache(remote, shard_cache_dir=tmp_path, shard_cache_bytes=1 << 30) as cached:
        _tokens(cached, list(range(SAMPLES)))
    first, second = _copies(tmp_path)[:2]
    data = bytearray(first.read_bytes())
    data[20] ^= 0xFF  # a chunk's payload: its crc32c no longer matches
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:-10])  # truncated: the index checksum fails
    with open_cache(remote, shard_cache_dir=tmp_path, shard_cache_bytes=1 << 30) as cached:
        cached.index("ds").view_params_of([0])  # a local copy of view-row chunk 0
    rows = next(p for p in tmp_path.rglob("*") if p.is_file() and ROWS in p.as_posix())
    damaged = bytearray(rows.read_bytes())
    damaged[3] ^= 0xFF
    rows.write_bytes(bytes(damaged))
    CountingFileSystem.token_reads = CountingFileSystem.row_reads = 0
    with open_cache(remote, shard_cache_dir=tmp_path, shard_cache_bytes=1 << 30) as cached:
        np.testing.assert_array_equal(_tokens(cached, list(range(SAMPLES))), want)
        np.testing.assert_array_equal(cached.index("ds").view_params_of([0, 1]), want_rows)
    assert CountingFileSystem.token_reads == 2
    assert CountingFileSystem.row_reads == 1  # the damaged view-row copy, fetched again
    namespace = next(tmp_path.iterdir())
    for copy in (first, second):  # the copies were replaced by fresh ones
        key = f"{remote}/{copy.relative_to(namespace).as_posix()}"
        assert copy.read_bytes() == bytes(CountingFileSystem.store[key].getbuffer())


def test_damage_the_fresh_copy_still_has_is_reported(remote: str, tmp_path: Path) -> None:
    key = f"{remote}/datasets/ds/teachers/t1/tokens/c/0/0"
    good = bytes(CountingFileSystem.store[key].getbuffer())
    data = bytearray(good)
    data[20] ^= 0xFF
    CountingFileSystem().pipe_file(key, bytes(data))
    try:
        with open_cache(remote, shard_cache_dir=tmp_path, shard_cache_bytes=1 << 30) as cached, \
                pytest.raises(CacheCorruptionError, match="sample 0: chunk checksum mismatch in "
                              "shard file .*shard-cache-test/datasets/ds/teachers/t1/tokens/c/0"):
            _tokens(cached, list(range(SAMPLES)))
    finally:  # the module's other tests read the same object
        CountingFileSystem().pipe_file(key, good)


def test_the_cache_stays_under_its_bound_evicting_the_least_recently_used(
        tmp_path: Path) -> None:
    cache = DiskShardCache(str(tmp_path), max_bytes=250, namespace="ns")
    for key in ("a/c/0", "b/c/0"):
        assert cache.fill(key, _writes(b"x" * 100))
    os.utime(cache.path("b/c/0"), (time.time() - 100, time.time() - 100))  # b: long unused
    reader = os.open(cache.path("b/c/0"), os.O_RDONLY)  # another process reads b
    try:
        assert cache.fill("c/c/0", _writes(b"y" * 100))
        assert not os.path.exists(cache.path("b/c/0"))
        assert os.path.exists(cache.path("a/c/0")) and cache.usage() == 200
        assert os.pread(reader, 100, 0) == b"x" * 100  # an open file survives its unlink
    finally:
        os.close(reader)
    assert not cache.fill("missing/c/0", _writes(None))


class ChunkedFileSystem(MemoryFileSystem):
    """A memory filesystem whose objects are read in `blocksize` chunks (fsspec's generic
    `get_file` copy) and whose next opens for reading fail after the first chunk with the
    queued errors (a connection dropped mid-body)."""

    protocol = "dunetestchunks"
    blocksize = 1 << 18
    failures: list[BaseException] = []
    opens = 0

    def _open(self, path: str, mode: str = "rb", **kwargs: object) -> object:
        stored = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            return stored
        type(self).opens += 1
        failure = self.failures.pop(0) if self.failures else None
        chunks = 0

        class Body:  # the stored object, read chunk by chunk
            size = stored.size

            def __enter__(self) -> Body:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def read(self, n: int) -> bytes:
                nonlocal chunks
                chunks += 1
                if failure is not None and chunks == 2:
                    raise failure
                return stored.read(n)

        return Body()


def test_a_fill_streams_the_object_to_disk_and_a_failed_copy_leaves_nothing(
        tmp_path: Path) -> None:
    """A fill of an object 16 chunks long holds a few chunks in memory, copies it byte for
    byte in one request; a copy that fails mid-body is retried from byte 0, and one that fails
    for good (or is interrupted) leaves no temporary file and counts no bytes."""
    fs = ChunkedFileSystem()
    data = np.random.default_rng(0).integers(0, 256, 16 << 18, dtype=np.uint8).tobytes()
    fs.pipe_file("/chunks/obj", data)
    no_wait = RetryPolicy(attempts=2, first_delay_s=0.0, max_delay_s=0.0)
    cache = DiskShardCache(str(tmp_path), max_bytes=1 << 30, namespace="ns")
    ChunkedFileSystem.opens, ChunkedFileSystem.failures = 0, []
    for failures in ([KeyboardInterrupt()], [ConnectionResetError("reset")] * 2):
        ChunkedFileSystem.failures = failures
        files = CachedFiles(FsspecFiles(fs, "/chunks", no_wait), cache)
        with pytest.raises((KeyboardInterrupt, RemoteReadError)):
            files.fill("obj")
        assert not ChunkedFileSystem.failures  # every failure was met
        assert os.listdir(cache.root) == [".locks"]  # no temporary file, no copy
        assert cache._count(lambda n: n) == 0
    assert ChunkedFileSystem.opens == 3
    ChunkedFileSystem.failures = [ConnectionResetError("reset")]  # once, then the retry
    tracemalloc.start()
    try:
        assert files.fill("obj")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The chunk being read, the one before it, and the failed attempt's last chunk (its
    # traceback is kept for the error message until the retry returns).
    assert peak < 4 * ChunkedFileSystem.blocksize <= len(data) / 4, peak
    assert ChunkedFileSystem.opens == 5  # the failed attempt and its retry
    assert Path(cache.path("obj")).read_bytes() == data
    assert cache._count(lambda n: n) == len(data) and cache.usage() == len(data)
    assert not files.fill("missing") and sorted(os.listdir(cache.root)) == [".locks", "obj"]


def _fill_slowly(directory: str, log: str) -> None:
    def fetch(tmp: str) -> int:
        with open(log, "a") as out:
            out.write("fetch\n")
        time.sleep(0.2)
        return Path(tmp).write_bytes(b"z" * 1000)

    DiskShardCache(directory, 1 << 20, "ns").fill("d/tokens/c/3/0/0", fetch)


def test_concurrent_fills_from_processes_fetch_once(tmp_path: Path) -> None:
    log = tmp_path / "fetches.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_fill_slowly, args=(str(tmp_path / "c"), str(log)))
             for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert log.read_text() == "fetch\n"
    cache = DiskShardCache(str(tmp_path / "c"), 1 << 20, "ns")
    assert Path(cache.path("d/tokens/c/3/0/0")).read_bytes() == b"z" * 1000
    assert cache.usage() == 1000  # no temporary file left behind


def test_prefetch_fills_the_shards_ahead_of_the_reads(remote: str, tmp_path: Path) -> None:
    class Items:
        def __init__(self) -> None:
            self.reader = open_cache(remote, shard_cache_dir=tmp_path, shard_cache_bytes=1 << 30)

        def shard_of(self, item: int) -> tuple[int, int]:
            return 0, item // 4

        def fill_shard_cache(self, dataset: int, shard: int) -> None:
            self.reader.index("ds").fill_shard_cache(shard * 4, shard * 4 + 4)
            self.reader.fill_shard_cache("ds", shard, ["t1"])

    items = Items()
    order = [17, 16, 3, 2, 1, 9, 8, 12]  # shards 4, 0, 2, 3
    sampler = ShardPrefetchSampler(order, items, shards_ahead=2)  # type: ignore[arg-type]
    assert list(sampler) == order
    sampler.close()
    assert sampler.fetched == 4 and len(_copies(tmp_path)) == 4
    CountingFileSystem.token_reads = CountingFileSystem.row_reads = 0
    with open_cache(remote, shard_cache_dir=tmp_path, shard_cache_bytes=1 << 30) as worker:
        _tokens(worker, order)
        rows = worker.index("ds").view_params_of(order)
    assert CountingFileSystem.token_reads == 0
    assert CountingFileSystem.row_reads == 0  # the view rows traveled with their shards
    with open_cache(remote) as direct:
        np.testing.assert_array_equal(rows, direct.index("ds").view_params_of(order))
    items.reader.close()


def test_settings_are_refused_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match="shard_cache_bytes: expected >= 1"):
        OpenSettings(shard_cache_dir="/tmp/x", shard_cache_bytes=0)
    with pytest.raises(ConfigError, match="data.shard_cache_bytes: expected >= 1"):
        DataConfig(shard_cache_dir="/tmp/x")
    with pytest.raises(ConfigError, match="data.prefetch_shards: expected 0, or >= 1 with "
                       "data.shard_cache_dir"):
        DataConfig(prefetch_shards=4)
    assert DataConfig(shard_cache_dir="/tmp/x", shard_cache_bytes=10,
                      prefetch_shards=4).prefetch_shards == 4
