"""Damage scenarios of issue 10 ("nothing silently wrong"), items 1-6: each does the damage,
checks which command refuses and what it names, and that the rest of the cache is intact."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cache_format import layout
from cache_format.completeness import require_complete
from cache_format.errors import CacheCorruptionError, CacheNotFoundError
from cache_format.reader import open_cache
from cache_format.testing import tiny_teacher
from cache_format.writer import CacheWriter
from precompute.cache_tools import cache_info
from precompute.cli import app
from tests.reliability.cachekit import (
    assert_rest_intact,
    edit_manifest,
    flip_byte,
    make_cache,
    snapshot,
)


@pytest.fixture
def cache(tmp_path: Path) -> tuple[Path, dict]:
    path = make_cache(tmp_path / "cache")
    return path, snapshot(path)


def _verify_cli(path: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["verify", str(path)])
    return result.exit_code, result.output


def test_deleted_token_shard_file(cache: tuple[Path, dict]) -> None:
    """Deleted token shard file: verify fails naming the file, the reader refuses it, info is not
    complete."""
    path, before = cache
    shard = path / "datasets/a/teachers/t1/tokens/c/1/0"
    shard.unlink()
    code, output = _verify_cli(path)
    assert code == 1 and "shard 1: shard file missing" in output
    with open_cache(path) as reader:
        with pytest.raises(CacheCorruptionError, match="shard file missing") as err:
            reader.read_encoded("a", [4], ["t1"])
        assert str(shard) in str(err.value)
        with pytest.raises(CacheCorruptionError, match="shard file missing"):
            list(reader.iter_shards("a", "t1"))
    assert cache_info(str(path))["complete"] is False
    assert_rest_intact(path, before, {("a", "t1")})


def test_ok_record_absent_from_shard_index(cache: tuple[Path, dict]) -> None:
    """A shard index that marks an ok sample's record absent: the reader refuses it, naming the
    shard file."""
    path, before = cache
    shard = path / "datasets/a/teachers/t2/tokens/c/0/0"
    data = bytearray(shard.read_bytes())
    sps = 4
    index_at = len(data) - (16 * sps + 4)
    data[index_at : index_at + 16] = b"\xff" * 16  # sample 0: "never stored"
    from cache_format.checksum import crc32c_value

    body = bytes(data[index_at : index_at + 16 * sps])
    data[-4:] = crc32c_value(body).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    with open_cache(path) as reader, pytest.raises(CacheCorruptionError, match="absent"):
        reader.read_encoded("a", [0], ["t2"])
    code, output = _verify_cli(path)
    assert code == 1 and "teacher 't2'" in output and "absent" in output
    assert_rest_intact(path, before, {("a", "t2")})


def test_deleted_status_chunk(cache: tuple[Path, dict]) -> None:
    """Deleted consolidated status chunk: the index refuses to load (what the trainer reads first),
    verify names the array."""
    path, before = cache
    chunk = path / "datasets/b/statuses/c/0"
    chunk.unlink()
    with open_cache(path) as reader, pytest.raises(CacheCorruptionError) as err:
        reader.index("b").status  # noqa: B018
    assert "'statuses'" in str(err.value) and str(chunk) in str(err.value)
    code, output = _verify_cli(path)
    assert code == 1 and "statuses" in output
    assert_rest_intact(path, before, {("b", "t1"), ("b", "t2")})


def test_deleted_view_params_chunk(cache: tuple[Path, dict]) -> None:
    """Deleted index rows (view parameters) chunk: reading its view parameters is refused naming the
    file; verify fails."""
    path, before = cache
    chunk = path / "datasets/a/index_rows/c/1/0"
    chunk.unlink()
    with open_cache(path) as reader:
        with pytest.raises(CacheCorruptionError, match="chunk file missing") as err:
            reader.index("a").view_params_of([5])
        assert "'index_rows'" in str(err.value)
    code, output = _verify_cli(path)
    assert code == 1 and "index_rows" in output
    assert_rest_intact(path, before, set())  # tokens and statuses are untouched


@pytest.mark.parametrize("array", ["summary", "patch_calib_mean", "cls_calib_std"])
def test_flipped_byte_in_statistics_or_calibration(cache: tuple[Path, dict], array: str) -> None:
    """Flipped byte in a statistics or calibration chunk: verify names the array; the reader raises
    one CacheCorruptionError naming it."""
    path, before = cache
    flip_byte(path / f"datasets/a/teachers/t1/{array}/c/0", 7)
    code, output = _verify_cli(path)
    assert code == 1 and f"'{array}'" in output
    with open_cache(path) as reader, pytest.raises(CacheCorruptionError) as err:
        if array == "summary":
            reader.stats("t1", "patch")
        else:
            reader.read_encoded("a", [0], ["t1"])
    assert f"'{array}'" in str(err.value) and "\n" not in str(err.value)
    assert_rest_intact(path, before, {("a", "t1")})


def test_deleted_calibration_chunk(cache: tuple[Path, dict]) -> None:
    """Deleted calibration chunk: not read as zeros; verify and the reader name it."""
    path, before = cache
    (path / "datasets/b/teachers/t2/patch_calib_std/c/0").unlink()
    code, output = _verify_cli(path)
    assert code == 1 and "patch_calib_std" in output
    with open_cache(path) as reader, pytest.raises(CacheCorruptionError, match="missing"):
        reader.calibration("b", "t2", "patch")
    assert_rest_intact(path, before, {("b", "t2")})


def test_add_teacher_died_on_a_full_disk(cache: tuple[Path, dict],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full inside add_teacher: info says not complete, verify fails, the trainer's check
    refuses naming the pair."""
    path, before = cache
    writer = CacheWriter.open(path)
    writer.set_planned({"t3": ["a"]})

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(layout, "create_teacher_arrays", full)
    with pytest.raises(OSError):
        calibration = {tok: (np.zeros(8, np.float32), np.ones(8, np.float32))
                       for tok in ("cls", "patch")}
        writer.add_teacher("a", tiny_teacher("t3", dim=8), calibration)
    monkeypatch.undo()
    assert cache_info(str(path))["complete"] is False
    code, output = _verify_cli(path)
    assert code == 1 and "a/t3" in output
    with open_cache(path) as reader, pytest.raises(CacheNotFoundError, match="a/t3"):
        require_complete(reader)
    assert_rest_intact(path, before, set())


def test_edited_manifest_checkpoint_sha256(cache: tuple[Path, dict]) -> None:
    """Edited manifest (a teacher's checkpoint_sha256): every open refuses naming the manifest, the
    build included."""
    path, _ = cache

    def edit(manifest: dict) -> None:
        manifest["teachers"]["t1"]["checkpoint_sha256"] = "9" * 64

    edit_manifest(path, edit)
    with pytest.raises(CacheCorruptionError, match="manifest"):
        open_cache(path)
    with pytest.raises(CacheCorruptionError, match="manifest"):
        CacheWriter.open(path)  # what the build opens
    code, output = _verify_cli(path)
    assert code == 1


def test_manifest_edit_undone_restores_the_cache(cache: tuple[Path, dict]) -> None:
    """Manifest edited and edited back: the checksum holds again and everything reads as before."""
    path, before = cache
    original = json.loads((path / "zarr.json").read_text())
    edit_manifest(path, lambda m: m.update(seed=99))
    with pytest.raises(CacheCorruptionError):
        open_cache(path)
    (path / "zarr.json").write_text(json.dumps(original))
    assert open_cache(path).verify().ok
    assert_rest_intact(path, before, set())


def test_edited_array_metadata(cache: tuple[Path, dict]) -> None:
    """Edited zarr.json of an array (fill value): verify names the file."""
    path, _ = cache
    meta_path = path / "datasets/a/teachers/t1/shard_meta/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["fill_value"] = 1.0
    meta_path.write_text(json.dumps(meta))
    code, output = _verify_cli(path)
    assert code == 1 and "shard_meta/zarr.json" in output


def test_summary_counts_disagree(cache: tuple[Path, dict]) -> None:
    """A pair summary whose ok count disagrees with the index: the trainer's check refuses."""
    path, _ = cache
    with open_cache(path) as reader:
        rows = reader.pair_meta("a", "t2").summary()
    assert rows is not None
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    fixed = np.array(rows)
    fixed[1] -= 1
    group["datasets/a/teachers/t2/summary"][:] = fixed  # type: ignore[index]
    with open_cache(path) as reader, pytest.raises(CacheCorruptionError, match="a/t2"):
        require_complete(reader)
