"""Source fingerprints (issue 10, item 7): the build records a 64-bit content fingerprint of every
source image in its dataset's index rows; stage two checks it when it reads the image again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache_format import layout
from cache_format.errors import CacheMismatchError, CacheVersionError, ConfigError
from cache_format.manifest import ROOT_ATTR, DatasetFingerprint, manifest_attrs
from cache_format.reader import open_cache
from cache_format.source_fingerprint import ALGORITHM, _crc64_xz_slow, fingerprint
from cache_format.testing import build_tiny_cache
from cache_format.writer import CacheWriter
from precompute import plan
from precompute.config import load_build_config
from precompute.sources import open_source
from tests.build_fixtures import build_quiet, cache_digest, write_config
from tests.test_trainer import tiny_cache
from train.data import CacheTrainData
from train.run_data import say_unchecked
from train.view_replay import fingerprint_algorithm

#: One dataset (with bad files) and one teacher: the cheapest real build.
SMALL = {"teachers": ("dino",), "dataset_names": ("web",)}


@pytest.fixture(scope="module")
def cache_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fingerprint-caches")


def replace_with_other_content(path: Path) -> None:
    """Rewrite an image file with other pixels of the same size and format (what a careless
    re-export or a mixed-up download does): its views replay the same, its content differs."""
    with Image.open(path) as img:
        fmt, pixels = img.format, np.asarray(img.convert("RGB"))
    Image.fromarray(255 - pixels).save(path, format=fmt)


def test_crc64_xz_has_the_standard_check_value_and_the_slow_path_agrees() -> None:
    assert ALGORITHM == "crc64-xz"
    assert fingerprint(b"123456789") == 0x995DC9BBDF1939FA  # CRC-64/XZ's catalogued check
    data = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    assert _crc64_xz_slow(data) == fingerprint(data)
    assert fingerprint(data[:-1] + bytes([data[-1] ^ 1])) != fingerprint(data)


def test_the_build_records_every_ok_images_fingerprint(cache_base: Path) -> None:
    root = tiny_cache(cache_base)
    cfg = load_build_config(root / "cache.toml")
    with open_cache(root / "cache") as reader:
        assert reader.verify().ok
        for dataset in cfg.datasets:
            assert reader.manifest.datasets[dataset.name].source_fingerprint == ALGORITHM
            index = reader.index(dataset.name)
            rows = reader._group[f"{layout.dataset_path(dataset.name)}/{layout.INDEX_ROWS}"]
            assert rows.shape[1] == layout.index_row_nbytes(len(index.view_param_names), True)
            source = open_source(dataset)
            ok = np.flatnonzero(index.ok)
            params, prints = index.view_rows_of(ok)
            np.testing.assert_array_equal(params, index.view_params_of(ok))
            expected = [fingerprint(source.read_bytes(int(s) // index.views_per_image))
                        for s in ok]
            assert prints is not None and prints.tolist() == expected


def test_a_same_size_replacement_is_refused_naming_image_dataset_cache_and_fix(
        cache_base: Path, tmp_path: Path) -> None:
    root = tiny_cache(cache_base)
    images = tmp_path / "2d"
    shutil.copytree(root / "data" / "2d", images)
    data = CacheTrainData(root / "cache", roots={"web2d": str(images)}, heldout_images=0)
    assert data.fingerprint_datasets == data.dataset_names
    d = data.dataset_names.index("web2d")
    item = next(i for i in range(len(data)) if data.locate(i)[0] == d)
    image_index = data.locate(item)[1] // data.views_per_image
    key = data.reader.index("web2d").key_of(data.locate(item)[1])
    before = data[item]["image"]
    replace_with_other_content(images / key)
    with pytest.raises(CacheMismatchError) as err:
        data[item]
    text = f"{err.value} {err.value.hint}"
    for part in (str(images / key), "dataset web2d", str(root / "cache"),
                 "restore the original images", "rebuild dataset web2d",
                 "data.check_source_fingerprints = false"):
        assert part in text, part
    with pytest.raises(CacheMismatchError, match=str(images / key)):  # the batched path too
        data.__getitems__([item])
    # Checking off: the same item trains on the file as it is now (same view, other pixels).
    off = CacheTrainData(root / "cache", roots={"web2d": str(images)}, heldout_images=0,
                         check_source_fingerprints=False)
    assert off.fingerprint_datasets == ()
    after = off[item]["image"]
    assert after.shape == before.shape and not np.array_equal(after.numpy(), before.numpy())
    # Every other image of the dataset still passes.
    others = [i for i in range(len(data)) if data.locate(i)[0] == d
              and data.locate(i)[1] // data.views_per_image != image_index]
    data.__getitems__(others)


def test_a_cache_built_without_fingerprints_trains_unchecked(
        tmp_path: Path, images: dict, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """What the builder wrote before fingerprints existed: rows of 4P + 1 bytes, no algorithm.
    It verifies, resumes without fingerprints and trains; its images are not checked."""

    config = write_config(tmp_path / "cache.toml", tmp_path / "cache", images, **SMALL)
    monkeypatch.setattr(plan, "FINGERPRINT_ALGORITHM", "")
    build_quiet(config)
    monkeypatch.undo()
    with open_cache(tmp_path / "cache") as reader:
        assert {fp.source_fingerprint for fp in reader.manifest.datasets.values()} == {""}
        assert reader.index("web").view_rows_of([0])[1] is None
        assert reader.verify().ok
    # A resume by today's builder keeps the dataset's layout (no fingerprints half-way).
    digest = cache_digest(tmp_path / "cache")
    CacheWriter.open(tmp_path / "cache").forget_index_shard("web", 1)
    build_quiet(config)
    assert cache_digest(tmp_path / "cache") == digest
    web = tmp_path / "web"
    shutil.copytree(images["web"]["root"], web, symlinks=True)  # a dangling link is a bad file
    with open_cache(tmp_path / "cache") as reader:
        index = reader.index("web")
        key = index.key_of(int(np.flatnonzero(index.ok)[0]))
    replace_with_other_content(web / key)
    data = CacheTrainData(tmp_path / "cache", roots={"web": str(web)}, heldout_images=0)
    assert data.fingerprint_datasets == ()
    assert len(data.__getitems__(list(range(len(data))))) == len(data)
    capsys.readouterr()
    say_unchecked(True, str(tmp_path / "cache"), ["web"], data.fingerprint_datasets)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("info: ") and "web" in line and "no source fingerprints" in line
    say_unchecked(True, str(tmp_path / "cache"), ["web"], ["web"])  # all checked: quiet
    assert capsys.readouterr().out == ""


def test_the_fingerprints_are_the_same_after_a_resumed_build(
        tmp_path: Path, images: dict) -> None:

    config = write_config(tmp_path / "cache.toml", tmp_path / "cache", images, **SMALL)
    build_quiet(config)
    with open_cache(tmp_path / "cache") as reader:
        index = reader.index("web")
        before = index.view_rows_of(np.arange(index.num_samples))[1]
    digest = cache_digest(tmp_path / "cache")
    writer = CacheWriter.open(tmp_path / "cache")
    for shard in (0, 2):
        writer.forget_index_shard("web", shard)
    build_quiet(config)
    assert cache_digest(tmp_path / "cache") == digest  # the index rows came back bit for bit
    with open_cache(tmp_path / "cache") as reader:
        index = reader.index("web")
        after = index.view_rows_of(np.arange(index.num_samples))[1]
    assert before is not None and after is not None and before.any()
    np.testing.assert_array_equal(after, before)


def test_an_image_replaced_before_a_teacher_is_added_stops_the_build(
        tmp_path: Path, images: dict) -> None:
    """Adding a teacher later reads the images again: other content is refused, naming it."""

    build_quiet(write_config(tmp_path / "cache.toml", tmp_path / "cache", images, **SMALL))
    web = Path(images["web"]["root"])
    with open_cache(tmp_path / "cache") as reader:
        index = reader.index("web")
        key = index.key_of(int(np.flatnonzero(index.ok)[0]))
    original = (web / key).read_bytes()
    try:
        replace_with_other_content(web / key)
        with pytest.raises(CacheMismatchError, match=f"{web / key}: its content changed"):
            build_quiet(write_config(tmp_path / "cache.toml", tmp_path / "cache", images,
                                     dataset_names=("web",)))
    finally:
        (web / key).write_bytes(original)


def test_the_writer_takes_fingerprints_exactly_when_the_dataset_records_them(
        tmp_path: Path) -> None:
    build_tiny_cache(tmp_path / "c")  # its datasets record no fingerprints
    writer = CacheWriter.open(tmp_path / "c")
    params, status = writer.index_rows("ds", 0)
    with pytest.raises(ConfigError, match="records none"):
        writer.write_index_shard("ds", 0, params, status, np.zeros(status.size, np.uint64))


def test_an_algorithm_this_code_does_not_know_is_refused_not_taken_for_changed_images() -> None:
    fp = DatasetFingerprint(name="ds", source_kind="folder", root="/d", num_images=1,
                            keys_sha256="0" * 64, source_fingerprint="xxh3-64")
    with pytest.raises(CacheVersionError, match="xxh3-64") as err:
        fingerprint_algorithm(fp, "/cache")
    assert "data.check_source_fingerprints = false" in err.value.hint
    assert fingerprint_algorithm(DatasetFingerprint(
        name="ds", source_kind="folder", root="/d", num_images=1, keys_sha256="0" * 64),
        "/cache") == ""


def test_verify_checks_the_fingerprint_column_against_the_manifest(
        cache_base: Path, tmp_path: Path) -> None:
    """A manifest that no longer says the rows hold fingerprints (its checksum made to match):
    verify names the index_rows metadata, and the index refuses rows of the wrong width."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache(cache_base) / "cache", cache)
    meta = json.loads((cache / "zarr.json").read_text())
    stored = meta["attributes"][ROOT_ATTR]
    stored["datasets"]["web2d"]["source_fingerprint"] = ""
    meta["attributes"].update(manifest_attrs(stored))
    (cache / "zarr.json").write_text(json.dumps(meta))
    with open_cache(cache) as reader:
        report = reader.verify()
        assert not report.ok
        assert any("datasets/web2d/index_rows/zarr.json" in p for p in report.problems)
        with pytest.raises(CacheVersionError, match="no source fingerprint"):
            reader.index("web2d")
        reader.index("scenes3d").view_rows_of([0])  # the other datasets read as before
