"""The on-demand sample index (cache_format/sample_index.py, plainread.py).

Every value it reads is compared with zarr-python's whole-array read of the same array; damaged
chunks must be named; the index must pickle, work in forked DataLoader workers and hold far less
memory than the whole arrays it replaces.
"""

from __future__ import annotations

import gc
import os
import pickle
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from cache_format.encodings import EncodingSpec
from cache_format.errors import CacheCorruptionError, ConfigError
from cache_format.manifest import DatasetFingerprint, keys_sha256, status_code
from cache_format.reader import open_cache
from cache_format.records import OpenSettings
from cache_format.sample_index import SampleIndex
from cache_format.testing import tiny_manifest
from cache_format.writer import CacheWriter

#: (name, images, views per image, samples per shard, index shards never written, index shards
#: whose view parameters are all zero, so that zarr stores no chunk for them).
CASES = [
    ("partial", 5, 2, 4, (), ()),  # N = 10: the last chunk holds 2 of 4 rows
    ("gaps", 7, 3, 6, (1,), (2,)),  # N = 21: a missing shard, a zero shard, a 3-row last chunk
    ("small", 3, 1, 8, (), ()),  # N = 3 < one chunk
    ("exact", 6, 2, 4, (), ()),  # N = 12: whole chunks only
]


def make_keys(name: str, num_images: int) -> list[str]:
    """Short (inline in numpy's StringDType), long and non-ASCII keys."""
    return [f"k{i}" if i % 3 == 0 else f"{name}/dossier-é/ünï_{i:06d}.jpg"
            for i in range(num_images)]


def build_index_cache(path: str | Path, name: str, num_images: int, views: int, per_shard: int,
                      skipped: tuple[int, ...] = (), zeros: tuple[int, ...] = (), *,
                      num_params: int = 5, seed: int = 0) -> None:
    """A cache holding only a dataset's index (no teacher), written by CacheWriter."""
    manifest = replace(tiny_manifest(EncodingSpec("fp16"), views_per_image=views,
                                     samples_per_shard=per_shard),
                       view_param_names=tuple(f"p{i}" for i in range(num_params)))
    writer = CacheWriter.create(path, manifest)
    keys = make_keys(name, num_images)
    writer.add_dataset(DatasetFingerprint(name=name, source_kind="list", root="/data",
                                          num_images=num_images, keys_sha256=keys_sha256(keys),
                                          domain="2d"), keys)
    rng = np.random.default_rng(seed)
    n = writer.num_samples(name)
    params = rng.normal(size=(n, num_params)).astype(np.float32)
    status = rng.choice([1, 1, 1, status_code("truncated")], size=n).astype(np.uint8)
    for shard in range(writer.num_shards(name)):
        if shard in skipped:
            continue
        start, stop = writer.shard_bounds(name, shard)
        if shard in zeros:
            params[start:stop] = 0
        writer.write_index_shard(name, shard, params[start:stop], status[start:stop])


def zarr_arrays(path: str | Path, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """What zarr-python reads: keys, view parameters, statuses (whole arrays)."""
    group = zarr.open_group(str(path), mode="r")[f"datasets/{name}"]
    text = group["key_utf8"][:].tobytes()  # type: ignore[index]
    offsets = group["key_offsets"][:].tolist()  # type: ignore[index]
    keys = [text[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    rows = group["index_rows"][:]  # type: ignore[index]
    params = np.ascontiguousarray(rows[:, :-1]).view("<f4")
    return keys, params, rows[:, -1]


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("index")
    for name, *shape in CASES:
        build_index_cache(root / name, name, *shape)  # type: ignore[arg-type]
    return {name: root / name for name, *_ in CASES}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_on_demand_values_equal_zarr_whole_array_reads(caches: dict[str, Path],
                                                       data: st.DataObject) -> None:
    name = data.draw(st.sampled_from([c[0] for c in CASES]))
    # A one-byte LRU evicts on every read: both the cached and the uncached path are compared.
    budget = data.draw(st.sampled_from([1, 1 << 20]))
    keys, params, status = zarr_arrays(caches[name], name)
    n = len(status)
    samples = data.draw(st.lists(st.integers(0, n - 1), max_size=3 * n))
    samples.append(n - 1)  # always the last (partial) chunk
    images = data.draw(st.lists(st.integers(0, len(keys) - 1), max_size=2 * len(keys)))
    with open_cache(caches[name], sample_index_cache_bytes=budget) as reader:
        index = reader.index(name)
        assert index.num_samples == n and index.num_images == len(keys)
        got = index.view_params_of(samples)
        assert got.dtype == np.float32 and got.shape == (len(samples), 5)
        np.testing.assert_array_equal(got, params[samples])
        np.testing.assert_array_equal(index.view_params_of(np.asarray(samples[:1])),
                                      params[samples[:1]])
        assert index.keys_of(images) == [keys[i] for i in images]
        assert [index.key_of(s) for s in samples] == [keys[s // index.views_per_image]
                                                      for s in samples]
        np.testing.assert_array_equal(index.status, status)
        np.testing.assert_array_equal(index.ok, status == 1)


def test_whole_array_loads_and_the_fill_value_of_unwritten_chunks(caches: dict[str, Path]
                                                                  ) -> None:
    for name, *_ in CASES:
        keys, params, status = zarr_arrays(caches[name], name)
        with open_cache(caches[name]) as reader:
            index = reader.index(name)
            assert index.keys.tolist() == keys
            np.testing.assert_array_equal(index.view_params, params)
            assert index.view_params_of([]).shape == (0, 5) and index.keys_of([]) == []
    # "gaps": shard 1 was never written (no files: fill 0), shard 2 is all-zero parameters
    # (its rows are stored: they hold its statuses).
    files = caches["gaps"] / "datasets" / "gaps"
    assert not (files / "index_rows/c/1/0").exists() and not (files / "index_meta/c/1/0").exists()
    assert (files / "index_rows/c/2/0").exists() and (files / "index_meta/c/2/0").exists()
    with open_cache(caches["gaps"]) as reader:
        index = reader.index("gaps")
        assert not index.view_params_of(range(6, 18)).any()
        assert not index.status[6:12].any() and index.status[12:18].all()


def test_bad_indices_are_refused(caches: dict[str, Path]) -> None:
    with open_cache(caches["partial"]) as reader:
        index = reader.index("partial")
        with pytest.raises(ConfigError, match=r"sample indices must be in \[0, 10\), found 0..10"):
            index.view_params_of([0, 10])
        with pytest.raises(ConfigError, match=r"image indices must be in \[0, 5\)"):
            index.keys_of([-1])
        with pytest.raises(ConfigError, match="integers"):
            index.view_params_of(np.array([0.5]))


@pytest.mark.parametrize(("array", "file", "read"), [
    ("index_rows", "index_rows/c/1/0", lambda index: index.view_params_of([0, 5])),
    ("key_utf8", "key_utf8/c/0", lambda index: index.key_of(4)),
    ("key_offsets", "key_offsets/c/0", lambda index: index.key_of(4)),
    ("index_rows", "index_rows/c/2/0", lambda index: index.status),
])
def test_a_damaged_chunk_is_detected_naming_dataset_array_chunk_and_file(
        tmp_path: Path, array: str, file: str, read: Callable[[SampleIndex], object]) -> None:
    cache = tmp_path / "c"
    build_index_cache(cache, *CASES[0][:4])  # type: ignore[arg-type]
    path = cache / "datasets" / "partial" / file
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x04  # inside the encoded bytes, before the crc32c
    path.write_bytes(bytes(data))
    chunk = file.split("/")[2]
    with open_cache(cache) as reader:
        with pytest.raises(CacheCorruptionError,
                           match=rf"dataset 'partial', array '{array}', chunk {chunk} .*checksum "
                           rf"mismatch in chunk file {path}") as err:
            read(reader.index("partial"))
        assert "dune-cache verify" in err.value.hint
        report = reader.verify()
        assert not report.ok and any(f"array '{array}', chunk {chunk}" in p and str(path) in p
                                     for p in report.problems)
    path.write_bytes(bytes(data[:-7]))  # truncated
    with open_cache(cache) as reader, pytest.raises(
            CacheCorruptionError, match=r"chunk file of \d+ bytes|checksum mismatch"):
        read(reader.index("partial"))


class IndexProbe(Dataset):
    """Reads an index inside DataLoader workers: (pid, key, view row, status) per sample."""

    def __init__(self, index: SampleIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return self.index.num_samples

    def __getitem__(self, sample: int) -> tuple[int, str, np.ndarray, int]:
        return (os.getpid(), self.index.key_of(sample),
                self.index.view_params_of([sample])[0], int(self.index.status[sample]))


def test_the_index_pickles_and_works_in_forked_dataloader_workers(
        caches: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys, params, status = zarr_arrays(caches["gaps"], "gaps")
    monkeypatch.chdir(caches["gaps"].parent)
    reader = open_cache("gaps", threads=2)  # a relative path
    parent = reader.index("gaps")
    parent.view_params_of(range(len(status)))  # warm LRU and open files are inherited by a fork
    monkeypatch.chdir(tmp_path)  # the copy must not depend on the working directory
    copy = pickle.loads(pickle.dumps(parent))
    assert Path(copy.location).resolve() == caches["gaps"].resolve() and copy.threads == 2
    for index in (copy, parent):
        loader = DataLoader(IndexProbe(index), batch_size=4, num_workers=2,
                            multiprocessing_context="fork", collate_fn=list)
        rows = [row for batch in loader for row in batch]
        assert {pid for pid, *_ in rows} - {os.getpid()} and os.getpid() not in {
            pid for pid, *_ in rows}
        assert len({pid for pid, *_ in rows}) == 2
        assert [key for _, key, _, _ in rows] == [keys[s // 3] for s in range(len(status))]
        np.testing.assert_array_equal(np.stack([row for _, _, row, _ in rows]), params)
        assert [s for *_, s in rows] == status.tolist()
    # The reader pickles as how it was opened (a spawned worker reopens it the same way).
    again = pickle.loads(pickle.dumps(reader))
    assert again.settings == reader.settings == OpenSettings(threads=2)
    np.testing.assert_array_equal(again.index("gaps").view_params_of([20]), params[[20]])
    reader.close()


def test_a_200k_sample_index_holds_far_less_than_its_whole_arrays(tmp_path: Path) -> None:
    num_images, views, num_params = 100_000, 2, 20  # 200k samples, 2 key chunks of 65536
    build_index_cache(tmp_path / "big", "big", num_images, views, 4096, num_params=num_params)
    keys, params, status = zarr_arrays(tmp_path / "big", "big")
    # What the old index held: an object array of the keys, view parameters and statuses.
    whole = (8 * len(keys) + sum(sys.getsizeof(k) for k in keys) + params.nbytes
             + status.nbytes)
    budget = 1 << 20
    reader = open_cache(tmp_path / "big", sample_index_cache_bytes=budget)
    rng = np.random.default_rng(0)
    gc.collect()
    tracemalloc.start()
    try:
        index = reader.index("big")
        assert index.status.nbytes == 200_000
        for batch in np.array_split(rng.permutation(len(status)), 40):
            np.testing.assert_array_equal(index.view_params_of(batch), params[batch])
        images = rng.permutation(num_images)  # both key chunks, each decoded once
        assert index.keys_of(images) == [keys[i] for i in images]
        del images, batch
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    cached = index._cache.chunks()
    print(f"whole arrays {whole / 1e6:.1f} MB, index holds {held / 1e6:.2f} MB "
          f"({len(cached)} cached chunks, {index._cache.nbytes / 1e6:.2f} MB by its estimate)")
    assert whole > 20e6
    assert held < whole / 5
    # The LRU keeps its budget (the newest chunk, a 65536-key chunk here, may exceed it alone)
    # and no Python object per key or sample: decoded keys are numpy StringDType arrays.
    assert index._cache.nbytes <= budget or len(cached) == 1
    assert all(chunk.dtype != object for chunk in cached)
    reader.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds through /proc")
def test_reading_many_index_chunks_keeps_no_file_open(tmp_path: Path) -> None:
    """The index arrays are one small file per shard (millions at DUNE scale): loading
    statuses, reading view rows and verifying must not keep them open (a per-index fd cache
    once ran a process into EMFILE after a few datasets), nor may a reader dropped without
    close() leak its fds."""
    build_index_cache(tmp_path / "c", "ds", num_images=600, views=1, per_shard=2)  # 300 chunks
    before = _open_fds()
    reader = open_cache(tmp_path / "c")
    index = reader.index("ds")
    assert index.ok.size == 600
    index.view_params_of(np.arange(0, 600, 3))
    index.keys_of(np.arange(600))
    assert not index.verify()
    assert _open_fds() - before < 16  # zarr's own metadata reads and at most a few fds
    del reader, index
    gc.collect()
    assert _open_fds() - before <= 1
