"""Concurrent writer processes, corruption detection, and reading with plain zarr only."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from cache_format import checksum, fastread
from cache_format.encodings import EncodingSpec
from cache_format.errors import CacheCorruptionError, ConfigError
from cache_format.reader import open_cache
from cache_format.testing import build_tiny_cache, tiny_dataset, tiny_manifest, tiny_teacher
from cache_format.writer import CacheWriter

NUM_IMAGES = 32  # 64 samples = 16 shards of 4


def _shard_tokens(shard: int, n: int) -> dict[str, np.ndarray]:
    """Deterministic tokens of one shard, so the parent knows what each child wrote."""
    rng = np.random.default_rng(1000 + shard)
    return {"patch": rng.normal(size=(n, 16, 32)).astype(np.float32),
            "cls": rng.normal(size=(n, 32)).astype(np.float32)}


def _writer_process(path: str, shards: list[int], barrier: mp.synchronize.Barrier) -> None:
    writer = CacheWriter.open(path)
    barrier.wait(timeout=60)  # start writing at the same moment as the other process
    for shard in shards:
        start, stop = writer.shard_bounds("ds", shard)
        writer.write_shard("ds", "t1", shard, _shard_tokens(shard, stop - start),
                           np.ones(stop - start, bool))


def test_two_writer_processes_write_different_shards_of_one_array(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    writer = CacheWriter.create(path, tiny_manifest(EncodingSpec("fp16", "zstd", 3)))
    fingerprint, keys = tiny_dataset("ds", NUM_IMAGES)
    writer.add_dataset(fingerprint, keys)
    writer.add_teacher("ds", tiny_teacher())
    shards = list(range(writer.num_shards("ds")))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer_process, args=(path, shards[i::2], barrier))
             for i in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    stats = writer.finalize_stats("ds", "t1")
    assert stats["patch"].count == 2 * NUM_IMAGES * 16
    with open_cache(path) as reader:
        assert reader.verify().ok
        got = reader.read_encoded("ds", np.arange(2 * NUM_IMAGES))["t1"]
        for tok in ("patch", "cls"):
            expected = np.concatenate([_shard_tokens(s, 4)[tok] for s in shards])
            np.testing.assert_array_equal(got[tok].decode().numpy(),
                                          expected.astype(np.float16).astype(np.float32))


def _chunk_span(shard_file: Path, local: int, chunks_per_shard: int) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk `local`, parsed by hand from the shard index at the
    end of the file: chunks_per_shard little-endian uint64 pairs, then a 4-byte crc32c."""
    raw = shard_file.read_bytes()
    index = np.frombuffer(raw[-(16 * chunks_per_shard + 4):-4], dtype="<u8").reshape(-1, 2)
    return int(index[local, 0]), int(index[local, 1])


@pytest.mark.parametrize(("codec", "where"), [("none", 0.01), ("none", 0.5), ("none", 0.999),
                                               ("zstd", 0.5)])
def test_flipped_byte_is_detected_naming_sample_and_file(tmp_path: Path, codec: str,
                                                         where: float) -> None:
    """A flipped byte anywhere in a record (int8 scales first, then patch, then cls values) is
    caught by single-sample reads, batch reads, shard scans and verify()."""
    path = tmp_path / "c"
    build_tiny_cache(path, EncodingSpec("int8", codec, 3), invalid=())
    shard_file = path / "datasets/ds/teachers/t1/tokens/c/1/0"  # samples 4..7
    offset, nbytes = _chunk_span(shard_file, 2, 4)  # sample 6
    data = bytearray(shard_file.read_bytes())
    data[offset + int((nbytes - 4) * where)] ^= 0x10
    shard_file.write_bytes(bytes(data))
    with open_cache(path) as reader:
        reader.read_encoded("ds", [0, 5, 7, 9])  # other samples still read fine
        reader.read_encoded("ds", [5])
        for batch in ([1, 6], [6]):
            with pytest.raises(CacheCorruptionError) as info:
                reader.read_encoded("ds", batch)
            message = str(info.value)
            assert "dataset 'ds', teacher 't1', array 'tokens', sample 6" in message
            assert str(shard_file) in message and "checksum" in message
        with pytest.raises(CacheCorruptionError, match="sample 6"):
            list(reader.iter_shards("ds", "t1"))
        report = reader.verify()
        assert not report.ok and any("sample 6" in p for p in report.problems)
    with open_cache(path, verify_checksums=False) as reader:  # the opt-out really skips it
        reader.read_encoded("ds", [6] if codec == "none" else [5])


def test_checksum_functions_agree_and_the_google_fallback_detects_damage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every installed crc32c (checksum.IMPLEMENTATIONS: fastcrc's SIMD folding, google's
    wrapper, and the reader's measured choices) equals zarr's (google_crc32c on bytes), piece
    by piece, at awkward lengths and on every buffer type the readers pass; an unknown
    DUNE_CRC32C is refused; and a reader on the google fallback still catches damage."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, n, dtype=np.uint8) for n in (100_003, 40_000))
    whole = google_crc32c.value(np.concatenate([a, b]).tobytes())
    impls = [(i.name, i.value, i.extend) for i in checksum.IMPLEMENTATIONS.values()]
    impls += [("reader", fastread._crc_value, fastread._crc_extend),
              ("reader threads", fastread._crc_value_threaded, fastread._crc_extend_threaded)]
    assert {"google", "fastcrc"} <= set(checksum.IMPLEMENTATIONS)
    for name, value, extend in impls:
        assert extend(value(a), b) == whole, name
        for n in (0, 1, 7, 63, 64, 65, 255, 4099):  # around the SIMD block sizes
            piece = a[:n]
            expected = google_crc32c.value(piece.tobytes())
            for buffer in (piece, piece.tobytes(), bytearray(piece), memoryview(piece)):
                assert value(buffer) == expected, (name, n, type(buffer))
            assert extend(whole, piece) == google_crc32c.extend(whole, piece.tobytes()), name
    assert checksum.choose("google")[0].name == "google"
    with pytest.raises(ConfigError, match="DUNE_CRC32C='sse9'"):
        checksum.choose("sse9")
    path = tmp_path / "c"
    build_tiny_cache(path, EncodingSpec("fp16"), invalid=())
    shard_file = path / "datasets/ds/teachers/t1/tokens/c/0/0"
    offset, nbytes = _chunk_span(shard_file, 1, 4)  # sample 1
    data = bytearray(shard_file.read_bytes())
    data[offset + 7] ^= 0x01
    shard_file.write_bytes(bytes(data))
    for name in ("_crc_value", "_crc_value_threaded"):
        monkeypatch.setattr(fastread, name, google_crc32c.value)
    for name in ("_crc_extend", "_crc_extend_threaded"):
        monkeypatch.setattr(fastread, name, google_crc32c.extend)
    with open_cache(path) as reader:
        reader.read_encoded("ds", [0, 2])
        for batch in ([1], [0, 1]):
            with pytest.raises(CacheCorruptionError, match="sample 1: chunk checksum mismatch"):
                reader.read_encoded("ds", batch)


def test_damaged_shard_index_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "c"
    build_tiny_cache(path, EncodingSpec("fp16"), invalid=())
    shard_file = path / "datasets/ds/teachers/t1/tokens/c/0/0"
    data = bytearray(shard_file.read_bytes())
    data[-10] ^= 0x01  # inside the index, before its crc32c
    shard_file.write_bytes(bytes(data))
    with open_cache(path) as reader, pytest.raises(
            CacheCorruptionError, match=f"array 'tokens', shard 0: shard index checksum mismatch "
                                        f"in shard file {shard_file}"):
        reader.read_encoded("ds", [2])
    shard_file.write_bytes(bytes(data[: len(data) // 3]))  # truncated file
    with open_cache(path) as reader, pytest.raises(CacheCorruptionError, match="tokens"):
        reader.read_encoded("ds", [2])


@pytest.mark.parametrize("spec", [EncodingSpec("int8", "blosc", 5), EncodingSpec("bf16", "zstd"),
                                  EncodingSpec("fp16")], ids=lambda s: s.name)
def test_plain_zarr_reads_and_decodes_a_sample_by_hand(tmp_path: Path, spec: EncodingSpec) -> None:
    """Exactly what docs/cache-format.md tells someone who has only zarr-python and numpy."""
    path = tmp_path / "c"
    build_tiny_cache(path, spec)
    root = zarr.open_group(path, mode="r")
    manifest = root.attrs["dune_cache"]
    views = manifest["views_per_image"]
    sample = 7
    dataset = root["datasets/ds"]
    offsets = dataset["key_offsets"][sample // views : sample // views + 2]
    key = dataset["key_utf8"][offsets[0] : offsets[1]].tobytes().decode("utf-8")
    assert key == "ds/img_0003.jpg" and dataset["statuses"][sample] == 1
    assert dataset["index_rows"][sample, -1] == 1  # the status byte after the view parameters
    pair = root["datasets/ds/teachers/t1"]
    record = pair["tokens"][sample]  # uint8 [R]: the sample's record
    fields = {f["name"]: f for f in pair["tokens"].attrs["dune_record"]["fields"]}

    def field(name: str) -> np.ndarray:
        f = fields[name]
        dtype = np.dtype(f["dtype"])
        size = dtype.itemsize * int(np.prod(f["shape"]))
        return record[f["offset"] : f["offset"] + size].view(dtype).reshape(f["shape"])

    by_hand = {}
    for tok in manifest["teachers"]["t1"]["token_types"]:
        stored = field(tok)  # [gh*gw, D] or [D]
        if manifest["encoding"]["name"] == "fp16":
            x = stored.astype(np.float32)
        elif manifest["encoding"]["name"] == "bf16":
            x = (stored.astype(np.uint32) << 16).view(np.float32)
        else:
            scale = field(f"{tok}_scale")  # [gh*gw] or []
            mean, std = pair[f"{tok}_calib_mean"][:], pair[f"{tok}_calib_std"][:]
            x = stored.astype(np.float32) * scale[..., None] * std + mean
        by_hand[tok] = x
    with open_cache(path) as reader:
        ours = reader.read_sample("ds", sample)["t1"]
    for tok, x in by_hand.items():
        np.testing.assert_array_equal(ours[tok].numpy(), x)
    assert by_hand["patch"].shape == (manifest["grid"][0] * manifest["grid"][1], 32)
