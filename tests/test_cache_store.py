"""Writer + reader: round trips through the store, statistics, index, refusals, resume."""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import Crc32cCodec

from cache_format.encodings import EncodingSpec, decode_tokens, encode_tokens, fit_calibration
from cache_format.errors import (
    CacheMismatchError,
    CacheNotFoundError,
    CacheVersionError,
    ConfigError,
    InvalidTokensError,
)
from cache_format.manifest import FORMAT_VERSION, ROOT_ATTR
from cache_format.reader import open_cache
from cache_format.shard_encode import shard_object
from cache_format.stats import ChannelStats, merge_all
from cache_format.testing import (
    build_tiny_cache,
    tiny_dataset,
    tiny_manifest,
    tiny_teacher,
)
from cache_format.writer import CacheWriter

ALL_SPECS = [EncodingSpec(name, codec, 3) for name in ("fp16", "bf16", "int8")
             for codec in ("none", "zstd", "blosc")] + [EncodingSpec("int4"),
                                                        EncodingSpec("int4h", "blosc", 3)]


def _expected(spec: EncodingSpec, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """What a reader must return: the decoded encoding of x (calibration refitted as the
    test builder does), zeros / the calibration mean for invalid samples."""
    mean, std = fit_calibration(x)
    decoded = decode_tokens(*encode_tokens(x, spec, mean, std), spec, mean, std)
    filler = decode_tokens(*encode_tokens(mean[None], spec, mean, std), spec, mean, std)[0]
    decoded[~valid] = filler if spec.has_scale else 0
    return decoded


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"{s.name}-{s.codec}")
def test_round_trip_every_encoding(tmp_path: Path, spec: EncodingSpec) -> None:
    written = build_tiny_cache(tmp_path / "c", spec, datasets=[("ds", 5)])  # 10 samples, 3 shards
    pair = written[("ds", "t1")]
    with open_cache(tmp_path / "c", threads=2) as reader:
        order = np.array([9, 0, 3, 4, 9, 7])
        batch = reader.read_encoded("ds", order)
        for tok in ("patch", "cls"):
            enc = batch["t1"][tok]
            assert enc.values.dtype == {"fp16": torch.float16, "bf16": torch.uint16,
                                        "int8": torch.int8, "int4": torch.uint8,
                                        "int4h": torch.uint8}[spec.name]
            assert (enc.scale is not None) == spec.has_scale
            expected = _expected(spec, pair.tokens[tok], pair.valid)[order]
            np.testing.assert_array_equal(enc.decode().numpy(), expected)
        sample = reader.read_sample("ds", 4)["t1"]
        assert sample["patch"].shape == (16, 32) and sample["cls"].shape == (32,)
        blocks = list(reader.iter_shards("ds", "t1"))
        assert [(b.start, b.stop) for b in blocks] == [(0, 4), (4, 8), (8, 10)]
        scanned = torch.cat([b.tokens["patch"] for b in blocks]).numpy()
        np.testing.assert_array_equal(scanned, _expected(spec, pair.tokens["patch"], pair.valid))
        assert reader.verify().ok


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.sampled_from(ALL_SPECS), images=st.integers(1, 7), views=st.integers(1, 3),
       per_shard_images=st.integers(1, 3), dim=st.integers(1, 9), seed=st.integers(0, 99))
def test_store_round_trip_property(tmp_path_factory: pytest.TempPathFactory, spec: EncodingSpec,
                                  images: int, views: int, per_shard_images: int, dim: int,
                                  seed: int) -> None:
    path = tmp_path_factory.mktemp("prop") / "c"
    manifest = tiny_manifest(spec, grid=(2, 3), views_per_image=views,
                             samples_per_shard=views * per_shard_images)
    written = build_tiny_cache(path, teachers=[tiny_teacher(dim=dim)], seed=seed,
                               datasets=[("ds", images)], manifest=manifest, invalid=(0,))
    pair = written[("ds", "t1")]
    with open_cache(path) as reader:
        n = reader.num_samples("ds")
        assert n == images * views
        order = np.random.default_rng(seed).permutation(n)
        got = reader.read_encoded("ds", order)["t1"]
        for tok in ("patch", "cls"):
            np.testing.assert_array_equal(got[tok].decode().numpy(),
                                          _expected(spec, pair.tokens[tok], pair.valid)[order])


def test_statistics_are_exact_over_decoded_ok_samples(tmp_path: Path) -> None:
    spec = EncodingSpec("int8")
    written = build_tiny_cache(tmp_path / "c", spec, datasets=[("a", 5), ("b", 3)])
    with open_cache(tmp_path / "c") as reader:
        for tok in ("patch", "cls"):
            per_dataset = []
            for dataset in ("a", "b"):
                pair = written[(dataset, "t1")]
                decoded = _expected(spec, pair.tokens[tok], pair.valid)[pair.valid]
                per_dataset.append(ChannelStats.of(decoded))
                one = reader.stats("t1", tok, datasets=[dataset])
                assert one.count == per_dataset[-1].count
                np.testing.assert_allclose(one.mean, per_dataset[-1].mean, rtol=1e-9, atol=1e-9)
            both = reader.stats("t1", tok)
            direct = merge_all(per_dataset, 32)
            assert both.count == direct.count == (9 + 5) * (16 if tok == "patch" else 1)
            np.testing.assert_allclose(both.mean, direct.mean, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(both.std, direct.std, rtol=1e-9, atol=1e-9)


def test_index_keys_status_and_listing(tmp_path: Path) -> None:
    build_tiny_cache(tmp_path / "c", teachers=[tiny_teacher("t1"), tiny_teacher(
        "t2", dim=8, token_types=("patch",))], datasets=[("ds", 5)], invalid=(3, 8))
    with open_cache(tmp_path / "c") as reader:
        assert reader.datasets == ("ds",) and reader.teachers == ("t1", "t2")
        assert reader.teachers_for("ds") == ("t1", "t2") and reader.datasets_for("t2") == ("ds",)
        index = reader.index("ds")
        _, keys = tiny_dataset("ds", 5)
        assert list(index.keys) == keys and index.key_of(7) == keys[3]
        assert index.ok.tolist() == [i not in (3, 8) for i in range(10)]
        assert index.view_params.shape == (10, 5)
        only_t2 = reader.read_encoded("ds", [1, 2], teachers=["t2"])
        assert list(only_t2) == ["t2"] and list(only_t2["t2"]) == ["patch"]
        with pytest.raises(CacheNotFoundError, match="no dataset 'nope'"):
            reader.read_encoded("nope", [0])
        with pytest.raises(ConfigError, match=r"\[0, 10\)"):
            reader.read_encoded("ds", [10])


def test_nan_or_inf_in_a_valid_row_is_refused_and_nothing_written(tmp_path: Path) -> None:
    writer = CacheWriter.create(tmp_path / "c", tiny_manifest(EncodingSpec("fp16")))
    fingerprint, keys = tiny_dataset("ds", 4)
    writer.add_dataset(fingerprint, keys)
    writer.add_teacher("ds", tiny_teacher(token_types=("patch",)))
    x = np.ones((4, 16, 32), np.float32)
    x[2, 5, 7] = np.inf
    x[3, 0, 0] = np.nan
    valid = np.array([True, True, True, False])  # the NaN row is not valid: ignored
    with pytest.raises(InvalidTokensError, match=r"ds/t1 shard 0: patch tokens of sample\(s\) "
                       r"\[2\] hold NaN or Inf"):
        writer.write_shard("ds", "t1", 0, {"patch": x}, valid)
    assert not writer.shard_done("ds", "t1", 0)
    assert not (tmp_path / "c/datasets/ds/teachers/t1/patch/c").exists()
    valid[2] = False
    writer.write_shard("ds", "t1", 0, {"patch": x}, valid)
    assert writer.shard_done("ds", "t1", 0)


def test_resume_rewrites_a_partial_shard_and_skips_done_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c"
    writer = CacheWriter.create(path, tiny_manifest(EncodingSpec("int8", "zstd", 3)))
    fingerprint, keys = tiny_dataset("ds", 6)
    writer.add_dataset(fingerprint, keys)
    rng = np.random.default_rng(0)
    x = {"patch": rng.normal(size=(12, 16, 32)).astype(np.float32),
         "cls": rng.normal(size=(12, 32)).astype(np.float32)}
    writer.add_teacher("ds", tiny_teacher(), {t: fit_calibration(v) for t, v in x.items()})
    valid = np.ones(12, bool)

    def write(w: CacheWriter, shard: int) -> None:
        a, b = w.shard_bounds("ds", shard)
        w.write_shard("ds", "t1", shard, {t: v[a:b] for t, v in x.items()}, valid[a:b])

    write(writer, 0)
    # Shard 1 "crashes" after its token records were written, before the statistics/done mark.
    original = CacheWriter._write_whole_shard
    calls = []

    def crash_after_data(self: CacheWriter, array_path: str, *args: object) -> None:
        original(self, array_path, *args)
        calls.append(array_path)
        raise KeyboardInterrupt

    monkeypatch.setattr(CacheWriter, "_write_whole_shard", crash_after_data)
    with pytest.raises(KeyboardInterrupt):
        write(writer, 1)
    monkeypatch.undo()
    assert calls == ["datasets/ds/teachers/t1/tokens"]
    # A torn earlier attempt of shard 2: garbage where a shard file would be.
    torn = path / "datasets/ds/teachers/t1/tokens/c/2/0"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"garbage from a crashed writer")
    with open_cache(path) as reader:
        with pytest.raises(CacheNotFoundError, match="shard 1 .* never completely written"):
            reader.read_encoded("ds", [5])

    resumed = CacheWriter.open(path)
    todo = [s for s in range(resumed.num_shards("ds")) if not resumed.shard_done("ds", "t1", s)]
    assert todo == [1, 2]
    done_file = path / "datasets/ds/teachers/t1/tokens/c/0/0"
    before = hashlib.sha256(done_file.read_bytes()).hexdigest()
    for shard in todo:
        write(resumed, shard)
    assert hashlib.sha256(done_file.read_bytes()).hexdigest() == before
    stats = resumed.finalize_stats("ds", "t1")
    with open_cache(path) as reader:
        got = reader.read_encoded("ds", np.arange(12))["t1"]["patch"].decode().numpy()
        mean, std = reader.calibration("ds", "t1", "patch")
        spec = reader.encoding
        expected = decode_tokens(*encode_tokens(x["patch"], spec, mean.numpy(), std.numpy()),
                                 spec, mean.numpy(), std.numpy())
        np.testing.assert_array_equal(got, expected)
        assert reader.stats("t1", "patch").count == stats["patch"].count == 12 * 16
        assert reader.verify().ok


def test_finalize_refuses_missing_shards(tmp_path: Path) -> None:
    writer = CacheWriter.create(tmp_path / "c", tiny_manifest(EncodingSpec("bf16")))
    fingerprint, keys = tiny_dataset("ds", 4)
    writer.add_dataset(fingerprint, keys)
    writer.add_teacher("ds", tiny_teacher(token_types=("patch",)))
    writer.write_shard("ds", "t1", 1, {"patch": np.ones((4, 16, 32), np.float32)},
                       np.ones(4, bool))
    with pytest.raises(CacheNotFoundError, match=r"1 shard\(s\) without a done mark"):
        writer.finalize_stats("ds", "t1")
    partial = writer.finalize_stats("ds", "t1", allow_incomplete=True)
    assert partial["patch"].count == 4 * 16
    report = open_cache(tmp_path / "c").verify()
    assert report.ok and report.missing == ("ds/t1 shard 0",)


def test_adding_a_teacher_and_a_dataset_touches_nothing_existing(tmp_path: Path) -> None:
    path = tmp_path / "c"
    build_tiny_cache(path, EncodingSpec("int8"))
    root_meta = path / "zarr.json"
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file() and p != root_meta}
    writer = CacheWriter.open(path)
    writer.add_teacher("ds", tiny_teacher("t2", dim=8),
                       {"patch": (np.zeros(8, np.float32), np.ones(8, np.float32)),
                        "cls": (np.zeros(8, np.float32), np.ones(8, np.float32))})
    fingerprint, keys = tiny_dataset("ds2", 3)
    writer.add_dataset(fingerprint, keys)
    writer.add_teacher("ds2", tiny_teacher(), {t: (np.zeros(32, np.float32),
                                                   np.ones(32, np.float32))
                                               for t in ("patch", "cls")})
    assert {p: p.read_bytes() for p in before} == before
    with open_cache(path) as reader:
        assert reader.teachers_for("ds") == ("t1", "t2")
        assert reader.manifest.assignment == {"t1": ("ds", "ds2"), "t2": ("ds",)}
    # Idempotent re-adds; a conflicting fingerprint is refused by name.
    writer.add_dataset(fingerprint, keys)
    writer.add_teacher("ds", tiny_teacher())
    bad = tiny_teacher("t2", dim=16)
    with pytest.raises(CacheMismatchError, match="teachers.t2.dim: expected 16, found 8"):
        writer.add_teacher("ds2", bad, None)


def test_reader_refuses_mismatch_and_newer_version(tmp_path: Path) -> None:
    path = tmp_path / "c"
    build_tiny_cache(path)
    with open_cache(path) as reader:
        reader.check(grid=(4, 4), teachers=[tiny_teacher()])
        with pytest.raises(CacheMismatchError, match="teachers.t1.input_size"):
            reader.check(teachers=[tiny_teacher().__class__(
                **{**tiny_teacher().__dict__, "input_size": (448, 448)})])
    with pytest.raises(CacheMismatchError, match="grid"):
        CacheWriter.create(path, tiny_manifest(grid=(8, 8)), exist_ok=True)
    with pytest.raises(ConfigError, match="already exists"):
        CacheWriter.create(path, tiny_manifest())
    group = zarr.open_group(path, mode="r+")
    group.attrs[ROOT_ATTR] = {**group.attrs[ROOT_ATTR], "format_version": FORMAT_VERSION + 1}
    with pytest.raises(CacheVersionError, match="upgrade dune-distill"):
        try:
            open_cache(path)
        except CacheVersionError as exc:  # the hint carries the instruction
            raise CacheVersionError(f"{exc} {exc.hint}") from exc
    with pytest.raises(CacheNotFoundError):
        open_cache(tmp_path / "missing")


@pytest.mark.parametrize("codec", ["none", "blosc"])
def test_remote_fsspec_url_round_trip(codec: str) -> None:
    spec = EncodingSpec("int8", codec, 3)
    url = f"memory://dune-test-cache-{codec}"
    written = build_tiny_cache(url, spec)
    pair = written[("ds", "t1")]
    with open_cache(url) as reader:
        expected = _expected(spec, pair.tokens["patch"], pair.valid)
        got = reader.read_encoded("ds", [8, 1])["t1"]["patch"].decode().numpy()
        np.testing.assert_array_equal(got, expected[[8, 1]])
        for sample in (8, 1):  # one sample: the record-buffer path
            got = reader.read_encoded("ds", [sample])["t1"]["patch"].decode().numpy()
            np.testing.assert_array_equal(got[0], expected[sample])
        assert reader.verify().ok


@pytest.mark.parametrize("spec", [EncodingSpec("int8"), EncodingSpec("bf16"),
                                  EncodingSpec("fp16", "zstd"), EncodingSpec("int4h")],
                         ids=lambda s: s.name)
def test_single_sample_reads_equal_batch_reads(tmp_path: Path, spec: EncodingSpec) -> None:
    """One-sample reads (fields as views of one record buffer) and batch reads (one dense
    array per field) return the same tensors, also for samples without tokens (zeros)."""
    build_tiny_cache(tmp_path / "c", spec, datasets=[("ds", 5)])  # sample 3 is invalid
    with open_cache(tmp_path / "c", threads=2) as reader:
        batch = reader.read_encoded("ds", np.arange(10))["t1"]
        for sample in range(10):
            one = reader.read_encoded("ds", [sample])["t1"]
            for tok, enc in batch.items():
                assert one[tok].values.is_contiguous() and enc.values.is_contiguous()
                assert one[tok].values.shape == (1, *enc.values.shape[1:])
                assert torch.equal(one[tok].values[0], enc.values[sample])
                if enc.scale is not None:
                    assert torch.equal(one[tok].scale[0], enc.scale[sample])


def test_recycled_buffers_never_overwrite_what_a_caller_holds(tmp_path: Path) -> None:
    """Output arrays are recycled only when no tensor, tensor view or numpy view of them is
    alive: a kept view must still show its own sample after more reads."""
    build_tiny_cache(tmp_path / "c", EncodingSpec("int8"), datasets=[("ds", 5)], invalid=())
    with open_cache(tmp_path / "c", threads=1) as reader:
        def values(sample: int) -> torch.Tensor:
            return reader.read_encoded("ds", [sample])["t1"]["patch"].values

        expected = {s: values(s).clone() for s in (1, 2, 3)}
        expected_scale = {1: reader.read_encoded("ds", [1])["t1"]["patch"].scale.clone()}
        torch_view = values(1)[0, 2:]  # only a torch view of the tensor survives
        numpy_view = values(2).numpy()[0]  # only a numpy view survives
        scale = reader.read_encoded("ds", [3])["t1"]["patch"].scale  # another field survives
        for sample in (4, 5, 6, 8, 9, 4, 5, 6):
            values(sample)
        assert torch.equal(torch_view, expected[1][0, 2:])
        assert np.array_equal(numpy_view, expected[2][0].numpy())
        again = reader.read_encoded("ds", [3])["t1"]["patch"]
        assert torch.equal(again.values, expected[3]) and torch.equal(again.scale, scale)
        assert again.scale.data_ptr() != scale.data_ptr()  # the held set was not reused
    with open_cache(tmp_path / "c", threads=1) as reader:
        # A one-sample read's tensors themselves are reused once nobody holds them, but never
        # one changed in place or moved to shared memory (readplan.SampleSlot).
        first = id(values(1))
        assert id(values(2)) == first
        held = values(1)
        assert id(values(2)) != first and torch.equal(held, expected[1])
        held.add_(0)  # in place: its slot is out of reuse for good
        moved = values(2).share_memory_()  # the second slot's data now lives elsewhere
        del held, moved
        for sample in (3, 1):
            assert torch.equal(values(sample), expected[sample])
            assert id(values(sample)) != first
        # A field whose `.data` was replaced no longer watches the record, and a kept view of
        # another field hides that from the storage's use count: only its data pointer tells.
        patch = reader.read_encoded("ds", [1])["t1"]["patch"]
        scale_view = patch.scale[:, :2]
        patch.values.data = torch.zeros_like(patch.values)
        del patch
        assert torch.equal(values(2), expected[2])
        assert torch.equal(scale_view, expected_scale[1][:, :2])
        # Slots that can never be reused leave the pool: after more of them than the pool
        # keeps per plan, a one-sample read's objects are kept and reused again.
        for sample in (1, 2, 4, 5, 6):
            values(sample).add_(1)
        kept = weakref.ref(reader.read_encoded("ds", [1])["t1"]["patch"])
        assert kept() is not None
        assert reader.read_encoded("ds", [2])["t1"]["patch"] is kept()


def test_fsspec_configuration_reaches_every_filesystem_the_cache_opens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and endpoints of a remote cache come from fsspec's own configuration
    (FSSPEC_<PROTOCOL>_<OPTION> variables or config files, docs/cache-format.md), never from
    our config files, which the manifest and run folders store. Every filesystem the writer,
    zarr and our byte reader open gets them."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    seen: list[dict] = []

    class RecordingFileSystem(MemoryFileSystem):
        protocol = "dunetest"
        cachable = False  # one instance per open, so every open is recorded

        def __init__(self, *args: object, **options: object) -> None:
            seen.append(dict(options))
            super().__init__(*args, **options)

    fsspec.register_implementation("dunetest", RecordingFileSystem, clobber=True)
    monkeypatch.setitem(fsspec.config.conf, "dunetest", {"endpoint_marker": "from-config"})
    url = "dunetest://fsspec-config-cache"
    build_tiny_cache(url, EncodingSpec("int8"))
    with open_cache(url) as reader:
        assert reader.read_encoded("ds", [1])["t1"]["patch"].values.shape[0] == 1
        assert reader.index("ds").view_params_of([0, 4]).shape[0] == 2
    assert len(seen) >= 3  # writer / zarr, the reader's zarr group, its byte reader, the index
    assert all(options.get("endpoint_marker") == "from-config" for options in seen)


@pytest.mark.parametrize(("rows", "zero_rows"), [(8, ()), (8, (0, 5)), (5, (2,)), (3, (0, 1, 2))])
def test_a_directly_written_shard_object_is_byte_identical_to_zarrs(
        tmp_path: Path, rows: int, zero_rows: tuple[int, ...]) -> None:
    rng = np.random.default_rng(rows)
    records = rng.integers(1, 255, (rows, 37), dtype=np.uint8)
    records[list(zero_rows)] = 0  # samples that were not computed: zarr stores no chunk
    array = zarr.create_array(str(tmp_path / "a"), shape=(11, 37), dtype="uint8",
                              chunks=(1, 37), shards=(8, 37), compressors=[Crc32cCodec()],
                              fill_value=0)
    start = 8 if rows <= 3 else 0  # the last, partial shard (rows 8..10) or the first one
    array[start : start + rows] = records
    shard_file = tmp_path / "a" / "c" / str(start // 8) / "0"
    ours = shard_object(records, 8)
    if len(zero_rows) == rows:
        assert ours is None and not shard_file.exists()
    else:
        assert ours == shard_file.read_bytes()
