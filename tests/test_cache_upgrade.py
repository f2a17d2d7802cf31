"""`dune-cache upgrade`: a version-1 cache written by the version-1 writer (a committed fixture,
see tests/fixtures/README.md) reads the same before and after, and no token shard changes."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cache_format import upgrade as upgrade_module
from cache_format.errors import CacheVersionError
from cache_format.manifest import FORMAT_VERSION
from cache_format.reader import open_cache
from cache_format.writer import CacheWriter
from precompute.cli import app
from precompute.replay_spec import replay_spec_from_build_config
from tests.fixtures.make_v1_cache import expected_arrays
from train.preflight import replay_spec

FIXTURES = Path(__file__).parent / "fixtures"
runner = CliRunner()


@pytest.fixture
def v1_cache(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURES / "cache_v1.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "cache_v1"


def _read_all(cache: Path) -> dict[str, np.ndarray]:
    """What the reader returns (the fixture script's own reading: keys, statuses, view
    parameters, decoded tokens, statistics means), from a cache that verifies."""
    out = expected_arrays(cache)
    with open_cache(cache) as reader:
        assert reader.verify().ok
    return out


def _token_files(cache: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime (ns) of every file of every `tokens` array (shards and metadata)."""
    return {str(p.relative_to(cache)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in cache.rglob("*") if p.is_file() and "/tokens/" in f"/{p.relative_to(cache)}"}


def _assert_same(found: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(found) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(found[name], value, err_msg=name)


def test_v1_fixture_reads_as_it_did_when_written(v1_cache: Path) -> None:
    with open_cache(v1_cache) as reader:
        assert reader.manifest.format_version == 1
    _assert_same(_read_all(v1_cache), dict(np.load(FIXTURES / "cache_v1_expected.npz")))


def test_upgrade_keeps_every_sample_and_never_touches_a_token_shard(v1_cache: Path) -> None:
    before, shards = _read_all(v1_cache), _token_files(v1_cache)
    assert any(name.endswith("/c/0/0") for name in shards)
    with pytest.raises(CacheVersionError, match="format version 1") as err:
        CacheWriter.open(v1_cache)
    assert "dune-cache upgrade" in err.value.hint
    result = runner.invoke(app, ["upgrade", str(v1_cache)])
    assert result.exit_code == 0, result.output
    assert f"1 -> {FORMAT_VERSION}" in result.output
    with open_cache(v1_cache) as reader:
        assert reader.manifest.format_version == FORMAT_VERSION
        assert all(reader.index_complete(d) for d in reader.datasets)
        assert all(reader.pair_complete(d, t) for d in reader.datasets
                   for t in reader.teachers_for(d))
    _assert_same(_read_all(v1_cache), before)
    assert _token_files(v1_cache) == shards
    # No version-1 array is left, and the packed layout has 2 objects per finished shard.
    names = {p.name for p in v1_cache.rglob("*") if p.is_dir()}
    assert not names & {"key", "view_params", "index_done", "done", "stats"}
    # The replay section training reads is derived from the stored build config.
    with open_cache(v1_cache) as reader:
        manifest = reader.manifest
    assert manifest.replay == replay_spec_from_build_config(manifest.build_config)
    assert replay_spec(manifest, str(v1_cache)) == manifest.replay
    again = runner.invoke(app, ["upgrade", str(v1_cache)])
    assert again.exit_code == 0 and "nothing to do" in again.output


def test_a_version_1_cache_is_refused_by_training_with_the_upgrade_hint(v1_cache: Path) -> None:
    with open_cache(v1_cache) as reader:
        with pytest.raises(CacheVersionError) as err:
            replay_spec(reader.manifest, str(v1_cache))
    assert "dune-cache upgrade" in f"{err.value} {err.value.hint}"


@pytest.mark.parametrize("stop_after", [1, 3, 5])
def test_an_interrupted_upgrade_finishes_when_run_again(v1_cache: Path, stop_after: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    before, shards = _read_all(v1_cache), _token_files(v1_cache)
    original, calls = upgrade_module._convert, []

    def killed(*args: object) -> bool:
        calls.append(1)
        if len(calls) > stop_after:
            raise KeyboardInterrupt  # as if the process died between two groups
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(upgrade_module, "_convert", killed)
    with pytest.raises(KeyboardInterrupt):
        upgrade_module.upgrade_cache(v1_cache)
    monkeypatch.undo()
    with open_cache(v1_cache) as reader:  # the version bump is the last write
        assert reader.manifest.format_version == 1
    upgrade_module.upgrade_cache(v1_cache)
    _assert_same(_read_all(v1_cache), before)
    assert _token_files(v1_cache) == shards


def test_a_group_killed_mid_conversion_is_converted_again(v1_cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    before = _read_all(v1_cache)
    original = upgrade_module._dataset

    def dies_after_writing(*args: object) -> None:
        original(*args)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # v2 arrays written, the group not yet marked converted

    monkeypatch.setattr(upgrade_module, "_dataset", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        upgrade_module.upgrade_cache(v1_cache)
    monkeypatch.undo()
    assert os.path.isdir(v1_cache / "datasets" / "rooms" / "key")  # still version 1 there
    upgrade_module.upgrade_cache(v1_cache)
    _assert_same(_read_all(v1_cache), before)


def test_an_upgraded_cache_trains_without_source_fingerprints(v1_cache: Path,
                                                              tmp_path: Path) -> None:
    """Version 1 stored no source fingerprints: after the upgrade its datasets record none, and
    training replays every view unchecked (the fixture's images, made again from their seeds)."""
    from tests.build_fixtures import make_images
    from train.data import CacheTrainData

    assert runner.invoke(app, ["upgrade", str(v1_cache)]).exit_code == 0
    with open_cache(v1_cache) as reader:
        assert {fp.source_fingerprint for fp in reader.manifest.datasets.values()} == {""}
    roots = {name: d["root"] for name, d in make_images(tmp_path / "images").items()}
    data = CacheTrainData(v1_cache, roots=roots, heldout_images=0)
    assert data.fingerprint_datasets == ()
    assert len(data.__getitems__(list(range(len(data))))) == len(data)
