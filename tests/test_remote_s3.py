"""Both stages against a real S3 API (moto's server on 127.0.0.1, tests/s3_server.py).

A small part of the tiny mix of tests/build_fixtures.py (the HDF5 dataset "rooms", read from the
bucket too, one teacher:
moto answers a request in 15-60 ms on the test machine and a build makes about 500 requests per
pair) is built into `s3://` by two in-process dask workers; it must be byte-identical to the same
build on local disk. `dune-cache info` and `verify` run on the URL, a damaged object is found,
and a short training run (with a DataLoader worker process, which reopens the bucket) reads
from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache_format.configfile import with_overrides
from cache_format.errors import BadImageError, ConfigError
from cache_format.files import FsspecFiles
from cache_format.reader import open_cache
from cache_format.shard_cache import CachedFiles, DiskShardCache
from precompute.cli import app
from precompute.config import load_build_config
from precompute.dataset_keys import DatasetConfig
from precompute.sources import open_source
from tests.build_fixtures import build_quiet, cache_digest, write_config
from tests.s3_server import S3Server
from train.config import TrainConfig
from train.demo import DemoSizes, train_config
from train.trainer import Trainer

runner = CliRunner()


@pytest.fixture(scope="module")
def s3_cache(s3_server: S3Server, images: dict,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The tiny mix built into the bucket by two dask workers, and the same build on disk."""
    root = tmp_path_factory.mktemp("s3-build")
    url = s3_server.url("cache")
    part = {"teachers": ("dino",), "dataset_names": ("rooms",)}
    # The HDF5 file of the images is read from the bucket too (and replayed from there when
    # training).
    remote_images = {**images, "rooms": {**images["rooms"], "root": s3_server.upload(
        Path(images["rooms"]["root"]), s3_server.url("images") + "/rooms.h5")}}
    build_quiet(load_build_config(write_config(root / "remote.toml", url, remote_images,
                                               **part)), workers=2)
    build_quiet(write_config(root / "local.toml", root / "local", images, **part))
    return url, root / "local"


def test_a_build_into_s3_from_dask_workers_equals_the_local_build(
        s3_server: S3Server, s3_cache: tuple[str, Path], tmp_path: Path) -> None:
    url, local = s3_cache
    copy = s3_server.download(url, tmp_path / "copy")
    remote_files, local_files = cache_digest(copy), cache_digest(local)
    # The root zarr.json differs only by the dataset root stored in the manifest (a URL).
    assert remote_files.pop("zarr.json") != local_files.pop("zarr.json")
    assert remote_files == local_files
    with open_cache(url) as remote, open_cache(local) as disk:
        samples = [0, 3, 7, 2, 5]
        got = remote.read_encoded("rooms", samples)
        want = disk.read_encoded("rooms", samples)
        for teacher, tokens in want.items():
            for name, enc in tokens.items():
                assert torch.equal(got[teacher][name].values, enc.values)


@pytest.mark.parametrize("kind", ["folder", "list"])
def test_image_folders_and_list_files_by_url_read_like_local_ones(
        s3_server: S3Server, images: dict, tmp_path: Path, kind: str) -> None:
    """The same keys, pixels and bad-image reasons from the bucket as from the local folder
    (the folder holds one file of every bad kind)."""
    folder = Path(images["web"]["root"])
    url = s3_server.upload(folder, s3_server.url("web"))
    local_cfg = {"name": "web", "kind": kind, "root": str(folder), "domain": "2d"}
    if kind == "list":
        keys = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() or p.is_symlink())
        (tmp_path / "list.txt").write_text("\n".join(reversed(keys)) + "\n")
        list_url = s3_server.upload(tmp_path / "list.txt", s3_server.url("lists") + "/web.txt")
        local_cfg["list_file"] = str(tmp_path / "list.txt")
    local = open_source(DatasetConfig(**local_cfg))
    remote_cfg = {**local_cfg, "root": url}
    if kind == "list":
        remote_cfg["list_file"] = list_url
    remote = open_source(DatasetConfig(**remote_cfg))
    # An object store has no dangling symlink: the folder's "unreadable" file is not uploaded
    # (listed, it is a missing object, which reads as unreadable like the local one).
    expected = [k for k in local.keys() if kind == "list" or k != "bad/unreadable.jpg"]
    assert remote.keys() == expected
    reasons = []
    for i, key in enumerate(remote.keys()):
        try:
            want = local.load(local.keys().index(key))
        except BadImageError as exc:
            with pytest.raises(BadImageError) as got:
                remote.load(i)
            assert got.value.reason == exc.reason and url in got.value.path
            reasons.append(exc.reason)
        else:
            assert torch.equal(remote.load(i), want)
    assert ("unreadable" in reasons) == (kind == "list")
    assert reasons, "the folder holds bad images"
    with pytest.raises(ConfigError, match="expected an existing folder"):
        open_source(DatasetConfig(**{**remote_cfg, "root": url + "-missing"}))


def test_info_and_verify_run_on_the_bucket_and_find_a_damaged_object(
        s3_server: S3Server, s3_cache: tuple[str, Path]) -> None:
    url, _ = s3_cache
    info = runner.invoke(app, ["info", url, "--json"])
    assert info.exit_code == 0, (info.output, info.exception)
    facts = json.loads(info.output)
    assert facts["complete"] and all(p["shards_done"] == p["shards"] for p in facts["pairs"])
    result = runner.invoke(app, ["verify", url])
    assert result.exit_code == 0, result.output

    # One flipped byte in a token shard object (put back afterwards: training reads it).
    fs = s3_server.filesystem()
    shard = next(p for p in fs.find(url.removeprefix("s3://"))
                 if "/rooms/teachers/dino/tokens/c/" in p)
    good = fs.cat_file(shard)
    data = bytearray(good)
    data[10] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    try:
        result = runner.invoke(app, ["verify", url])
    finally:
        fs.pipe_file(shard, good)
    assert result.exit_code == 1, result.output
    assert "dataset 'rooms', teacher 'dino'" in result.output


def test_opening_a_pair_asks_each_object_once_without_size_checks(
        s3_server: S3Server, s3_cache: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """What a run reads of a pair at start (root, sample index, statuses, completeness,
    calibration, record layout) costs GETs and one listing of the pair's group, no HEAD: zarr's
    store reads a whole object without s3fs's size probe, the pair's arrays open from one
    listing, the token array's zarr.json is not read a third time. A missing cache is still one
    GET answered 404: absence is read, not assumed. (Before: 41 requests to open, 18 of them
    HEADs; 53 with the first read.)"""
    import s3fs

    from cache_format.errors import CacheNotFoundError

    sent: list[tuple[str, str]] = []
    call = s3fs.S3FileSystem._call_s3

    async def counted(self, method: str, *args: object, **kwargs: object) -> object:
        sent.append((method, str(kwargs.get("Key") or kwargs.get("Prefix"))))
        return await call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    s3fs.S3FileSystem.clear_instance_cache()  # no listing cached by an earlier test's client
    url, _ = s3_cache
    with open_cache(url) as reader:
        reader.status_counts("rooms")
        assert reader.pair_complete("rooms", "dino")
        assert reader.calibration("rooms", "dino", "patch") is not None
        methods = [m for m, _ in sent]
        assert "head_object" not in methods, [s for s in sent if s[0] == "head_object"]
        assert methods.count("list_objects_v2") == 1, sent
        opened = len(sent)
        # the first read: the token array's layout (its zarr.json, once), then the shard's
        # index (a size request and a ranged GET: fastread.py) and the sample's record
        reader.read_encoded("rooms", [0], ["dino"])
    assert (opened, len(sent)) == (21, 30), sent
    sent.clear()
    with pytest.raises(CacheNotFoundError):
        open_cache(s3_server.url("nothing"))
    assert [m for m, _ in sent] == ["get_object"]


@pytest.mark.parametrize("shard_cache", [False, True], ids=["direct", "shard-cache"])
def test_training_reads_the_cache_from_the_bucket(
        s3_cache: tuple[str, Path], tmp_path: Path, shard_cache: bool) -> None:
    """Directly, and through the local shard cache with prefetch (the DataLoader worker reopens
    the bucket with the same shard cache folder)."""
    url, _ = s3_cache
    sizes = DemoSizes(grid=2, views_per_image=2, student_dim=32, student_depth=1,
                      student_heads=2, batch_size=4, steps_per_epoch=3, epochs=1,
                      heldout_images=2, num_workers=1, log_every=1, eval_every=3,
                      checkpoint_every=3)
    data = train_config(sizes)
    shards = tmp_path / "shards"
    cfg = with_overrides(TrainConfig.from_dict(data),
                         {"out_dir": str(tmp_path / "run"), "data.cache": url,
                          "data.sampling": "uniform",
                          **({"data.shard_cache_dir": str(shards),
                              "data.shard_cache_bytes": 1 << 30,
                              "data.prefetch_shards": 2} if shard_cache else {})})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = Trainer(cfg, progress="off").fit()
    finally:
        torch.set_num_threads(threads)
    losses = [r["loss"] for r in summary["rows"] if r["kind"] == "train"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    if shard_cache:  # both token shards of rooms/dino were read through the local cache
        copies = [p for p in shards.rglob("*") if p.is_file() and "/tokens/c/" in p.as_posix()]
        assert len(copies) == 2
        # and the view rows of both shards traveled with them (one chunk per index shard)
        rows = [p for p in shards.rglob("*") if p.is_file() and "/index_rows/c/" in p.as_posix()]
        assert len(rows) == 2


def test_a_shard_cache_fill_is_one_get_streamed_to_disk(s3_server: S3Server,
                                                        tmp_path: Path) -> None:
    """An object larger than s3fs's block size (which s3fs would fetch as parallel ranged
    GETs) is filled with one GET, byte for byte; a missing one costs one request and leaves
    nothing; an empty one is copied (an object store refuses a range of an empty object)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, default_block_size=1 << 16)
    root = s3_server.url("fill").removeprefix("s3://")
    data = np.random.default_rng(0).integers(0, 256, 1 << 18, dtype=np.uint8).tobytes()
    fs.pipe_file(f"{root}/obj", data)
    fs.pipe_file(f"{root}/empty", b"")
    sent: list[str] = []  # every HTTP request the client sends, retries included
    fs.s3.meta.events.register("before-send.s3",
                               lambda request, **_: sent.append(request.method))
    files = CachedFiles(FsspecFiles(fs, root), DiskShardCache(str(tmp_path), 1 << 30, "ns"))
    assert files.fill("obj") and sent == ["GET"]
    assert Path(files.cache.path("obj")).read_bytes() == data
    assert not files.fill("missing") and files.fill("empty") and sent == ["GET"] * 3
    assert sorted(os.listdir(files.cache.root)) == [".locks", "empty", "obj"]
    assert files.cache.usage() == len(data)
