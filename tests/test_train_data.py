"""The training dataset over a cache and its samplers.

A tiny cache is built in the test by stage one itself (`build_cache`, in-process): two
random-init teachers of width 32 (patch 14 with cls, patch 16 without), grid 2x2, two views per
image, a few generated images plus one file of every bad kind (skipped by the build).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from rich.console import Console
from torch.utils.data import DataLoader, get_worker_info

from cache_format.encodings import EncodingSpec
from cache_format.errors import CacheMismatchError, ConfigError
from cache_format.manifest import STATUS_OK
from cache_format.reader import open_cache
from cache_format.records import OpenSettings
from cache_format.writer import CacheWriter
from precompute.build import build_cache
from precompute.config import CacheBuildConfig, RuntimeConfig, SharingConfig
from precompute.dataset_keys import DatasetConfig
from precompute.render import render_view
from precompute.sources import open_source
from precompute.synthetic import make_image_folder
from precompute.teachers.config import TeacherConfig
from precompute.view_params import VIEW_PARAM_NAMES, ViewParams
from train.batch import Batch, collate_cached
from train.data import CacheTrainData, heldout_image_indices
from train.sampling import ViewEpochSampler
from train.shard_sampling import ShardWindowOrder

VIEWS = 2
GOOD = {"web": 6, "rooms": 5}  # generated images per dataset; "web" also holds the bad files


def build_tiny_cache(
    tmp: Path, encoding: str = "fp16", sharing: str = "all", grid: tuple[int, int] = (2, 2)
) -> CacheBuildConfig:
    """Build a cache under `tmp/cache` with stage one's own builder; return its config."""
    roots = {name: tmp / "images" / name for name in GOOD}
    make_image_folder(
        roots["web"], GOOD["web"], size_range=(24, 60), seed=1, subfolders=2, bad=True
    )
    make_image_folder(roots["rooms"], GOOD["rooms"], size_range=(24, 60), seed=2, subfolders=2)
    cfg = CacheBuildConfig(
        cache=str(tmp / "cache"),
        grid=grid,
        student_patch=14,
        views_per_image=VIEWS,
        seed=7,
        samples_per_shard=4,
        teachers=(
            TeacherConfig(name="dino", kind="test_vit_p14", init_seed=1),
            TeacherConfig(name="mast3r", kind="test_vit_p16", init_seed=2),
        ),
        datasets=(
            DatasetConfig(name="web", kind="folder", root=str(roots["web"]), domain="2d"),
            DatasetConfig(name="rooms", kind="folder", root=str(roots["rooms"]), domain="3d"),
        ),
        encoding=EncodingSpec(encoding, "none"),
        sharing=SharingConfig(strategy=sharing),
        runtime=RuntimeConfig(loader_workers=0, torch_threads=1, processes=False, device="cpu"),
    )
    threads = torch.get_num_threads()
    try:
        build_cache(cfg, console=Console(quiet=True))
    finally:
        torch.set_num_threads(threads)  # the in-process build pins torch's thread count
    return cfg


def usable_images(cache: str) -> set[tuple[str, int]]:
    """(dataset, image) pairs with at least one ok view in the cache."""
    reader = open_cache(cache)
    return {
        (name, int(s) // VIEWS)
        for name in reader.datasets
        for s in np.flatnonzero(reader.index(name).status == STATUS_OK)
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> CacheBuildConfig:
    return build_tiny_cache(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_own(tmp_path_factory: pytest.TempPathFactory) -> CacheBuildConfig:
    return build_tiny_cache(tmp_path_factory.mktemp("own"), encoding="int8", sharing="own")


# -- the dataset ------------------------------------------------------------------------------
def test_items_replay_the_stored_views_and_carry_encoded_tokens(tiny: CacheBuildConfig) -> None:
    data = CacheTrainData(tiny.cache, split="train", heldout_images=0)
    reader = open_cache(tiny.cache)
    assert data.img_size == (28, 28)
    assert data.teacher_names == ("dino", "mast3r") and data.dataset_names == ("web", "rooms")
    reader_ok = {
        (name, int(s))
        for name in reader.datasets
        for s in np.flatnonzero(reader.index(name).status == STATUS_OK)
    }
    # Exactly the ok samples: the bad files' samples were skipped by the build.
    assert {(data.dataset_names[d], s) for d, s in map(data.locate, range(len(data)))} == reader_ok
    assert len(data) == (GOOD["web"] + GOOD["rooms"]) * VIEWS
    sources = {d.name: open_source(d) for d in tiny.datasets}
    for item in range(len(data)):
        got = data[item]
        name = data.dataset_names[got["dataset"]]
        s = got["sample"]
        stored = reader.index(name).view_params_of([s])[0]
        expected = render_view(
            sources[name].load(s // VIEWS), ViewParams.from_array(stored), (28, 28)
        )
        assert got["image"].dtype == torch.float32 and got["image"].shape == (3, 28, 28)
        assert torch.equal(got["image"], expected)
        assert got["domain"] == data.domain_names.index({"web": "2d", "rooms": "3d"}[name])
        enc = reader.read_encoded(name, [s])
        assert set(got["tokens"]) == {"dino", "mast3r"}
        assert set(got["tokens"]["dino"]) == {"cls", "patch"}
        assert set(got["tokens"]["mast3r"]) == {"patch"}
        for teacher, toks in got["tokens"].items():
            for tok, (values, scale) in toks.items():
                assert isinstance(values, np.ndarray) and values.dtype == np.float16
                assert scale is None
                np.testing.assert_array_equal(values, enc[teacher][tok].values[0].numpy())


def test_int8_items_keep_int8_values_and_scales(tiny_own: CacheBuildConfig) -> None:
    data = CacheTrainData(tiny_own.cache, heldout_images=0)
    values, scale = data[0]["tokens"]["dino"]["patch"]
    assert values.dtype == np.int8 and values.shape == (4, 32)
    assert scale is not None and scale.dtype == np.float32 and scale.shape == (4,)


def test_a_tampered_view_row_is_detected(tiny: CacheBuildConfig, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny.cache, cache)
    data = CacheTrainData(cache, heldout_images=0)
    d, sample = data.locate(5)
    name = data.dataset_names[d]
    reader = open_cache(cache)
    params = reader.index(name).view_params  # the whole array, a fresh copy
    status = reader.index(name).status
    prints = reader.index(name).source_fingerprints_of(np.arange(status.size))
    column = VIEW_PARAM_NAMES.index("crop_left")
    row = params[sample]
    # Move the crop box by one pixel, staying a valid box, so only the replay check can tell.
    row[column] += 1 if row[column] + row[VIEW_PARAM_NAMES.index("crop_w")] < row[1] else -1
    writer = CacheWriter.open(cache)
    shard = sample // 4
    writer.write_index_shard(
        name, shard, params[shard * 4 : shard * 4 + 4], status[shard * 4 : shard * 4 + 4],
        prints[shard * 4 : shard * 4 + 4],
    )
    tampered = CacheTrainData(cache, heldout_images=0)
    with pytest.raises(CacheMismatchError, match=f"dataset {name}, sample {sample}.*crop_left"):
        tampered[5]
    for other in (4, 6, len(tampered) - 1):  # the other rows still replay
        assert torch.equal(tampered[other]["image"], data[other]["image"])


def test_heldout_and_train_are_disjoint_complete_and_stable(tiny: CacheBuildConfig) -> None:
    train = CacheTrainData(tiny.cache, split="train", heldout_images=2)
    held = CacheTrainData(tiny.cache, split="heldout", heldout_images=2)

    def images(data: CacheTrainData) -> set[tuple[str, int]]:
        return {(data.dataset_names[d], s // VIEWS) for d, s in map(data.locate, range(len(data)))}

    usable = usable_images(tiny.cache)
    assert not images(train) & images(held)
    assert images(train) | images(held) == usable
    reader = open_cache(tiny.cache)
    chosen = {
        (name, int(i))
        for name in ("web", "rooms")
        for i in heldout_image_indices(reader.manifest.datasets[name].num_images, 2, 7, name)
    }
    assert images(held) == chosen & usable and Counter(d for d, _ in chosen) == {
        "web": 2,
        "rooms": 2,
    }
    # Every usable view of a held-out image is held out (both views are ok here).
    assert len(held) == len(images(held)) * VIEWS
    # Stable: again, and with another selection of teachers / datasets.
    assert images(CacheTrainData(tiny.cache, split="heldout", heldout_images=2)) == images(held)
    only_rooms = CacheTrainData(
        tiny.cache, ["mast3r"], ["rooms"], split="heldout", heldout_images=2
    )
    assert images(only_rooms) == {x for x in images(held) if x[0] == "rooms"}
    # At most half of a dataset is held out.
    assert len(heldout_image_indices(5, 100, seed=7, dataset="rooms")) == 2


def test_grid_or_patch_mismatch_is_refused_naming_both_grids(tiny: CacheBuildConfig) -> None:
    with pytest.raises(CacheMismatchError, match=r"grid 2x2 .*28x28 px.*grid 4x4"):
        CacheTrainData(tiny.cache, img_size=56)
    with pytest.raises(CacheMismatchError, match=r"patch 16, i.e. the grid 1x1"):
        CacheTrainData(tiny.cache, img_size=28, student_patch=16)
    assert CacheTrainData(tiny.cache, img_size=28, student_patch=14, heldout_images=0).img_size == (
        28,
        28,
    )


def test_selection_errors_and_subsets(tiny: CacheBuildConfig) -> None:
    with pytest.raises(CacheMismatchError, match="nope"):
        CacheTrainData(tiny.cache, teachers=["nope"])
    with pytest.raises(ConfigError, match="split"):
        CacheTrainData(tiny.cache, split="val")
    data = CacheTrainData(tiny.cache, teachers=["mast3r"], datasets=["rooms"], heldout_images=0)
    assert len(data) == 5 * VIEWS
    item = data[0]
    assert set(item["tokens"]) == {"mast3r"} and item["presence"].tolist() == [True]


def test_moved_images_need_roots_and_a_different_list_is_refused(
    tiny: CacheBuildConfig, tmp_path: Path
) -> None:
    moved = tmp_path / "moved_rooms"
    shutil.copytree(tiny.dataset("rooms").root, moved)
    data = CacheTrainData(tiny.cache, roots={"rooms": str(moved)}, heldout_images=0)
    reference = CacheTrainData(tiny.cache, heldout_images=0)
    assert torch.equal(data[len(data) - 1]["image"], reference[len(data) - 1]["image"])
    other = tmp_path / "other"
    make_image_folder(other, 5, size_range=(24, 60), seed=99, subfolders=1)
    with pytest.raises(CacheMismatchError, match="not the ones the cache") as err:
        CacheTrainData(tiny.cache, roots={"rooms": str(other)})
    assert "roots.rooms" in err.value.hint
    with pytest.raises(ConfigError, match="not datasets of the cache"):
        CacheTrainData(tiny.cache, roots={"nope": str(other)})


def test_absent_teacher_is_absent_from_items_and_false_in_presence(
    tiny_own: CacheBuildConfig,
) -> None:
    data = CacheTrainData(tiny_own.cache, heldout_images=0)
    rooms = data.dataset_names.index("rooms")
    items = [data[i] for i in range(len(data))]
    for item in items:
        expected = {"web": {"dino"}, "rooms": {"mast3r"}}[data.dataset_names[item["dataset"]]]
        assert set(item["tokens"]) == expected
    batch = collate_cached(items[:3] + items[-3:])
    assert batch.presence.tolist() == [[True, False]] * 3 + [[False, True]] * 3
    assert batch.rows["dino"].tolist() == [0, 1, 2] and batch.rows["mast3r"].tolist() == [3, 4, 5]
    assert batch.tokens["dino"]["patch"].values.shape == (3, 4, 32)
    assert batch.tokens["mast3r"]["patch"].values.dtype == torch.int8
    assert batch.dataset.tolist() == [0, 0, 0, rooms, rooms, rooms]
    assert batch.domains == ("2d",) * 3 + ("3d",) * 3


def test_collate_and_dataloader_workers_give_the_same_batches(tiny: CacheBuildConfig) -> None:
    data = CacheTrainData(tiny.cache, heldout_images=0)
    sampler = ViewEpochSampler(data, seed=3, mode="uniform", batch_size=4)

    def batches(workers: int) -> list[Batch]:
        loader = DataLoader(
            data,
            batch_size=4,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_cached,
            drop_last=True,
        )
        return list(loader)

    serial, parallel = batches(0), batches(1)
    assert len(serial) == len(parallel) == len(sampler) // 4
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.sample, b.sample)
        assert a.images.shape == (4, 3, 28, 28) and a.presence.all()
        for teacher in a.tokens:
            for tok in a.tokens[teacher]:
                assert torch.equal(a.tokens[teacher][tok].values, b.tokens[teacher][tok].values)
    moved = serial[0].to("cpu")
    assert moved.teacher_names == ("dino", "mast3r") and torch.equal(moved.images, serial[0].images)
    # The batched path (__getitems__) equals item-by-item access.
    indices = list(sampler)[:4]
    one_by_one = collate_cached([data[i] for i in indices])
    assert torch.equal(one_by_one.images, serial[0].images)


def _worker_probe(items: list[dict]) -> tuple[int, OpenSettings, dict, dict, Batch]:
    """collate_fn run in a worker: how the worker's own reader (and index) opened the cache."""
    data = get_worker_info().dataset  # type: ignore[union-attr]
    reader = data._reader()
    index_files = reader.index("web")._files  # opened by the view rows the items just read
    return (os.getpid(), reader.settings, reader._fast.files.fs.storage_options,
            index_files.fs.storage_options, collate_cached(items))


def test_storage_options_reach_dataloader_workers(tiny: CacheBuildConfig) -> None:
    """A cache opened with fsspec storage options is reopened with the same options (and the
    parent's other open settings) in every DataLoader worker.

    What this proves: each worker's reader, its byte-range reader and its sample index open the
    cache through an fsspec filesystem built with exactly those options (fsspec records them on
    the filesystem; before the fix the workers' filesystems had none), and the batches read there
    equal the parent's. What it does not prove: that a real object store accepts them
    (memory:// ignores options, and its store is shared with forked workers).
    """
    path = f"dune-test-options-{uuid.uuid4().hex}"
    url = f"memory://{path}/cache"
    fs = fsspec.filesystem("memory")
    fs.put(tiny.cache, f"{path}/cache", recursive=True)
    options = {"dune_probe": "token-123"}
    try:
        reader = open_cache(url, storage_options=options, threads=2, verify_checksums=False)
        data = CacheTrainData(reader, heldout_images=0)
        loader = DataLoader(data, batch_size=4, num_workers=2, multiprocessing_context="fork",
                            collate_fn=_worker_probe)
        results = list(loader)
        pids = {pid for pid, *_ in results}
        assert len(pids) == 2 and os.getpid() not in pids
        for _, settings, fs_options, index_options, _ in results:
            assert settings == reader.settings and settings.storage_options == options
            assert settings.threads == 2 and not settings.verify_checksums
            assert fs_options["dune_probe"] == "token-123"
            assert index_options["dune_probe"] == "token-123"
        served = [b for *_, b in results]
        assert torch.equal(torch.cat([b.sample for b in served]),
                           torch.tensor([data[i]["sample"] for i in range(len(data))]))
        local = collate_cached([data[i] for i in range(4)])
        assert torch.equal(served[0].images, local.images)
        for teacher, toks in local.tokens.items():
            for tok, enc in toks.items():
                assert torch.equal(served[0].tokens[teacher][tok].values, enc.values)
    finally:
        fs.rm(path, recursive=True)


# -- samplers over the real dataset (the sampler alone: test_epoch_sampler.py) --------------
def test_sampler_over_the_real_dataset_draws_one_view_per_image(tiny: CacheBuildConfig) -> None:
    data = CacheTrainData(tiny.cache, split="train", heldout_images=1)
    for mode in ("uniform", "teacher_balanced"):
        sequence = list(ViewEpochSampler(data, seed=0, mode=mode))  # type: ignore[arg-type]
        images = [(d, s // VIEWS) for d, s in map(data.locate, sequence)]
        domains = [{"web": "2d", "rooms": "3d"}[data.dataset_names[d]] for d, _ in images]
        per_domain = Counter(int(x) for x in data.image_domain)
        if mode == "uniform":
            assert sorted(images) == sorted(set(images)) and len(images) == data.num_images
        else:
            assert len(sequence) == 2 * max(per_domain.values())
            assert domains[0::2] == [domains[0]] * len(domains[0::2])
            assert set(domains[:2]) == {"2d", "3d"}


def test_shard_order_over_the_real_dataset_reads_its_training_images_by_shard(
    tiny: CacheBuildConfig,
) -> None:
    """Held-out images stay out, every training image is read once, and the shard of each
    index is the cache's (sample // samples_per_shard)."""
    data = CacheTrainData(tiny.cache, split="train", heldout_images=1)
    heldout = CacheTrainData(tiny.cache, split="heldout", heldout_images=1)
    order = ShardWindowOrder(data.items, data.manifest.images_per_shard, window=1)
    sequence = ViewEpochSampler(data, seed=0, mode="uniform", order=order).global_sequence(0)
    located = [data.locate(int(i)) for i in sequence]
    images = [(d, s // VIEWS) for d, s in located]
    assert sorted(images) == sorted(set(images)) and len(images) == data.num_images
    held = {(d, s // VIEWS) for d, s in map(heldout.locate, range(len(heldout)))}
    assert held and not held & set(images)
    datasets, shards = order.locate_shards(sequence)
    expected = [(d, s // tiny.samples_per_shard) for d, s in located]
    assert list(zip(datasets.tolist(), shards.tolist(), strict=True)) == expected
    # Window 1: the positions of one shard are consecutive.
    runs = [key for k, key in enumerate(expected) if k == 0 or key != expected[k - 1]]
    assert len(runs) == len(set(runs)) == order.num_shards
