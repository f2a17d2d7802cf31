"""A trainer checks an HDF5 source against its cache once: unlisted sources, remembered checks."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from cache_format.errors import CacheMismatchError
from cache_format.manifest import DatasetFingerprint
from cache_format.replay import ReplayDataset
from precompute import dataset_keys
from precompute.dataset_keys import DatasetConfig
from precompute.sources import HDF5Source, open_source
from precompute.synthetic import make_hdf5_dataset
from train import source_checks
from train.view_replay import open_replay_source


@pytest.mark.parametrize(("with_keys", "max_images"), [(True, None), (False, 4)])
def test_an_unlisted_hdf5_source_reads_like_the_listed_one(
    tmp_path: Path, with_keys: bool, max_images: int | None
) -> None:
    make_hdf5_dataset(tmp_path / "a.h5", 6, (8, 16), seed=0, with_keys=with_keys)
    cfg = DatasetConfig(name="a", kind="hdf5", root=str(tmp_path / "a.h5"), hdf5_key="images",
                        domain="d", max_images=max_images)
    listed = open_source(cfg)
    unlisted = HDF5Source.unlisted(cfg, listed.keys_sha256)
    assert unlisted._keys is None  # the point: no key list held
    assert len(unlisted) == len(listed) and unlisted.keys() == listed.keys()
    assert unlisted.describe() == listed.describe()
    assert [unlisted.key(i) for i in range(len(listed))] == listed.keys()
    assert np.array_equal(unlisted.load(3).numpy(), listed.load(3).numpy())
    assert unlisted.slice(1, 3).keys() == listed.keys()[1:3]
    with pytest.raises(IndexError):
        unlisted.key(len(listed))


def _rewrite_keys(path: Path, keys: list[str]) -> None:
    """Rewrite the image keys in place, keeping the file's inode and modification time."""
    before = os.stat(path)
    time.sleep(0.02)  # past the file system's timestamp granularity
    with h5py.File(path, "r+") as f:
        f["images_keys"][...] = np.array(keys, dtype=object)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_passed_check_is_remembered_and_a_changed_listing_is_still_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(source_checks.CHECKS_ENV, str(tmp_path / "checks"))
    path = tmp_path / "rooms.h5"
    keys = make_hdf5_dataset(path, 5, (8, 16), seed=1)
    cfg = DatasetConfig(name="rooms", kind="hdf5", root=str(path), hdf5_key="images",
                        domain="3d")
    fingerprint = DatasetFingerprint(**open_source(cfg).describe())  # type: ignore[arg-type]
    spec = SimpleNamespace(datasets={"rooms": ReplayDataset(
        kind="hdf5", root=str(path), domain="3d", max_pixels=10**6, unusual_modes="skip",
        hdf5_key="images")})
    first = open_replay_source(spec, fingerprint, "cache")  # type: ignore[arg-type]
    assert first._keys is None and first.keys() == keys  # checked, then no key list held
    assert len(list((tmp_path / "checks").iterdir())) == 1

    listings: list[str] = []
    real_keys = dataset_keys.hdf5_keys
    monkeypatch.setattr(dataset_keys, "hdf5_keys",
                        lambda c: listings.append(c.root) or real_keys(c))
    again = open_replay_source(spec, fingerprint, "cache")  # type: ignore[arg-type]
    assert listings == [] and again.keys() == keys  # remembered: not listed again
    first.close()  # h5py refuses to write a file this process has open
    again.close()

    _rewrite_keys(path, keys[::-1])  # the same names in another order
    with pytest.raises(CacheMismatchError, match="not the ones the cache"):
        open_replay_source(spec, fingerprint, "cache")  # type: ignore[arg-type]
    assert listings == [str(path)]  # the changed file was listed and refused

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(source_checks.CHECKS_ENV, str(tmp_path / "a-file" / "checks"))
    _rewrite_keys(path, keys)
    assert open_replay_source(spec, fingerprint, "cache").keys() == keys  # type: ignore[arg-type]
