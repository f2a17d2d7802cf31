"""Shard-aware epoch order (train/shard_sampling.py): the sampler's guarantees hold, and
consecutive positions read few shards."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_format.errors import ConfigError
from cache_format.serde import from_dict
from tests.test_trainer import tiny_cache, tiny_config
from train.config import DataConfig
from train.distributed import DistInfo
from train.image_order import ArrayGroups
from train.item_table import ItemTable
from train.run_data import open_run_data
from train.sampling import ViewEpochSampler
from train.shard_sampling import ShardWindowOrder

VIEWS = 2
PER_SHARD = 4  # images per shard (samples_per_shard = 8)


def table(sizes: tuple[int, ...] = (40, 12, 24), domains: tuple[int, ...] = (0, 1, 2),
          holes: bool = True) -> ItemTable:
    """Datasets of `sizes` images; with `holes`, some views unusable and some images without
    any usable view (as held-out or failed images are: absent from the table)."""
    rng = np.random.default_rng(0)
    usable = []
    for n in sizes:
        views = np.ones((n, VIEWS), dtype=bool)
        if holes:
            views &= rng.random((n, VIEWS)) > 0.2
            views[rng.choice(n, size=n // 8, replace=False)] = False
        usable.append(views)
    return ItemTable.build(usable, list(domains), VIEWS, max(domains) + 1)


def sampler(t: ItemTable, window: int, **kwargs) -> ViewEpochSampler:
    return ViewEpochSampler(t, order=ShardWindowOrder(t, PER_SHARD, window), **kwargs)


def images_of(t: ItemTable, sequence) -> list[tuple[int, int]]:
    return [(d, s // VIEWS) for d, s in map(t.locate, map(int, sequence))]


@pytest.mark.parametrize("window", [1, 3, 100])
def test_uniform_epoch_reads_every_image_once_and_is_deterministic(window: int) -> None:
    t = table()
    s = sampler(t, window, seed=4, mode="uniform")
    first = list(s)
    assert first == list(sampler(t, window, seed=4, mode="uniform"))
    all_images = sorted(images_of(t, range(len(t))))
    assert sorted(images_of(t, first)) == sorted(set(all_images))
    assert len(first) == t.num_images
    s.set_epoch(1)
    second = list(s)
    assert second != first
    assert sorted(images_of(t, second)) == sorted(set(all_images))
    # The view of an image is drawn among its usable ones: over epochs, every item is seen.
    seen = set()
    for epoch in range(30):
        s.set_epoch(epoch)
        seen.update(s)
    assert seen == set(range(len(t)))


def test_teacher_balanced_keeps_the_domains_round_robin_and_cycles_small_ones() -> None:
    t = table((40, 12, 24), holes=False)
    s = sampler(t, 2, seed=1, mode="teacher_balanced")
    sequence = list(s)
    assert len(sequence) == 3 * 40
    domains = [int(t.image_domain[int(np.searchsorted(t.image_first, i, side="right")) - 1])
               for i in sequence]
    assert domains == [0, 1, 2] * 40
    for d, size in enumerate((40, 12, 24)):
        counts = Counter(img for img, dd in zip(images_of(t, sequence), domains, strict=True)
                         if dd == d)
        # Every image of a domain is read before any is read again (whole passes).
        assert len(counts) == size and max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("mode", ["uniform", "teacher_balanced"])
@pytest.mark.parametrize("window", [1, 2])
def test_each_window_of_positions_touches_at_most_w_shards_per_domain(mode: str,
                                                                       window: int) -> None:
    """Full shards, a multiple of W per domain: a stream's positions [k W P, (k + 1) W P) are
    the images of one window, in every pass."""
    t = table((40, 16, 24), holes=False)
    s = sampler(t, window, seed=3, mode=mode, epoch_size=300)
    sequence = s.global_sequence(0)
    datasets, shards = s.order.locate_shards(sequence)
    streams = [slice(None)] if mode == "uniform" else [slice(k, None, 3) for k in range(3)]
    span = window * PER_SHARD
    for stream in streams:
        keys = list(zip(datasets[stream].tolist(), shards[stream].tolist(), strict=True))
        for start in range(0, len(keys), span):
            assert len(set(keys[start : start + span])) <= window
    # The shard of an index agrees with the item table's own (dataset, sample).
    expected = [(d, sample // (PER_SHARD * VIEWS)) for d, sample in map(t.locate, sequence[:50])]
    assert list(zip(datasets[:50].tolist(), shards[:50].tolist(), strict=True)) == expected


@pytest.mark.parametrize("mode", ["uniform", "teacher_balanced"])
def test_ranks_side_by_side_equal_one_process_with_the_global_batch(mode: str) -> None:
    t = table()
    world, local = 3, 2
    single = sampler(t, 2, seed=2, mode=mode, epoch_size=60, batch_size=local * world)
    ranks = [sampler(t, 2, seed=2, mode=mode, epoch_size=60, rank=r, world_size=world,
                     batch_size=local) for r in range(world)]
    for s in (single, *ranks):
        s.set_epoch(3)
    shares = [list(r) for r in ranks]
    steps = len(shares[0]) // local
    side_by_side = [i for k in range(steps) for share in shares
                    for i in share[k * local:(k + 1) * local]]
    assert side_by_side == list(single)


@pytest.mark.parametrize("mode", ["uniform", "teacher_balanced"])
@pytest.mark.parametrize(("before", "after"), [(2, 2), (2, 1)])
def test_resume_mid_epoch_gives_exactly_the_rest(mode: str, before: int, after: int) -> None:
    t = table()
    batch = 4
    saved = [sampler(t, 3, seed=5, mode=mode, rank=r, world_size=before,
                     batch_size=batch // before) for r in range(before)]
    for s in saved:
        s.set_epoch(2)
    sequence = saved[0].global_sequence(2).tolist()
    steps = 5
    state = saved[0].state_dict(consumed=steps * batch // before)
    resumed = [sampler(t, 3, seed=5, mode=mode, rank=r, world_size=after,
                       batch_size=batch // after) for r in range(after)]
    for r in resumed:
        r.load_state_dict(state)
        r.set_epoch(2)
    rest = [list(r) for r in resumed]
    local = batch // after
    read = [i for k in range(len(rest[0]) // local) for share in rest
            for i in share[k * local:(k + 1) * local]]
    assert read == sequence[steps * batch:]


def test_resume_with_another_window_or_order_is_refused() -> None:
    t = table()
    state = sampler(t, 2, seed=0, batch_size=2).state_dict(consumed=2)
    with pytest.raises(ConfigError, match="shard_window"):
        sampler(t, 4, seed=0, batch_size=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="shard_window"):
        ViewEpochSampler(t, seed=0, batch_size=2).load_state_dict(state)
    # A state saved before the field existed is image order (window 0).
    old = ViewEpochSampler(t, seed=0, batch_size=2).state_dict(consumed=2)
    del old["shard_window"]
    ViewEpochSampler(t, seed=0, batch_size=2).load_state_dict(old)
    with pytest.raises(ConfigError, match="shard_window"):
        sampler(t, 1, seed=0, batch_size=2).load_state_dict(old)


def test_shard_window_is_validated_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^data\.shard_window: expected 0 .* found -1"):
        DataConfig(shard_window=-1)
    with pytest.raises(ConfigError, match=r"^data\.shard_window: expected an integer"):
        from_dict(DataConfig, {"shard_window": 1.5}, where="data")
    assert DataConfig().shard_window == 0 and DataConfig(shard_window=8).shard_window == 8
    t = table()
    with pytest.raises(ConfigError, match="data.shard_window"):
        ShardWindowOrder(t, PER_SHARD, 0)
    with pytest.raises(ConfigError, match="images_per_shard"):
        ShardWindowOrder(t, 0, 1)


def test_shards_without_a_training_image_are_skipped_and_memory_is_per_shard() -> None:
    usable = np.ones((40, VIEWS), dtype=bool)
    usable[8:16] = False  # shards 2 and 3 of the dataset: held out or failed
    t = ItemTable.build([usable], [0], VIEWS, 1)
    order = ShardWindowOrder(t, PER_SHARD, 1)
    assert order.num_shards == 8 and order.shard_start.dtype == np.uint32
    assert order.shard_start.nbytes == 4 * (order.num_shards + 1)
    sequence = ViewEpochSampler(t, seed=0, mode="uniform", order=order).global_sequence(0)
    assert set(order.locate_shards(sequence)[1].tolist()) == {0, 1, 4, 5, 6, 7, 8, 9}


def test_the_item_table_keeps_only_exceptions_and_answers_as_an_explicit_one() -> None:
    """The implicit table against a per-image reference made here (failed views, held-out
    images, an empty dataset), the samplers' draws through it against the same draws through
    the explicit arrays (and iteration, pass by pass, against the materialized share), and, at
    2 views per image with 1% failed samples, statuses + table + what the sampler holds after
    an epoch well under 6 bytes per sample in every mode and order."""
    rng = np.random.default_rng(3)
    usable = [rng.random((n, 3)) > p for n, p in ((50, 0.3), (0, 0.0), (30, 0.0), (40, 0.6))]
    usable[2][[4, 9]] = False  # held out: absent with all their views
    t = ItemTable.build(usable, [1, 0, 1, 2], 3, 3)
    images = [(d, i) for d, u in enumerate(usable) for i in range(len(u)) if u[i].any()]
    items = [(d, i * 3 + v) for d, i in images for v in range(3) if usable[d][i, v]]
    counts = [int(usable[d][i].sum()) for d, i in images]
    assert [t.locate(k) for k in range(len(t))] == items
    assert t.image_count.tolist() == counts and t.image_first.tolist() == np.concatenate(
        [[0], np.cumsum(counts)[:-1]]).tolist()
    assert t.image_index.tolist() == [i for _, i in images]
    assert t.image_domain.tolist() == [[1, 0, 1, 2][d] for d, _ in images]
    assert t.nbytes < 8 * sum(0 < c < 3 for c in counts) + 600  # exceptions, not images
    explicit = ArrayGroups(t)  # materialized per-image arrays
    for mode in ("uniform", "teacher_balanced"):
        a = ViewEpochSampler(t, seed=1, mode=mode, epoch_size=77, world_size=2, batch_size=3)
        b = ViewEpochSampler(explicit, seed=1, mode=mode, epoch_size=77, world_size=2,
                             batch_size=3)
        assert np.array_equal(a.rank_sequence(1), b.rank_sequence(1))
        c = ViewEpochSampler(t, seed=1, mode=mode, epoch_size=400)  # more than the images
        assert c.by_pass and list(c) == c.rank_sequence(0).tolist() == list(
            ViewEpochSampler(explicit, seed=1, mode=mode, epoch_size=400))
    views, sizes = 2, (60_000, 25_000, 15_000)
    statuses = [rng.random((n, views)) > 0.01 for n in sizes]
    big = ItemTable.build(statuses, [0, 1, 2], views, 3)
    for mode in ("uniform", "teacher_balanced"):
        for order in (None, ShardWindowOrder(big, 32, 4)):
            s = ViewEpochSampler(big, seed=0, mode=mode, batch_size=256, order=order)
            assert len(list(s)) == s.samples_per_rank
            held = sum(sizes) * views + big.nbytes + s.held_nbytes + (
                order.shard_start.nbytes if order else 0)
            assert held / (sum(sizes) * views) < 3.6, (mode, order)


@pytest.fixture(scope="module")
def cache_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shard-sampling-caches")


def test_a_run_with_a_shard_window_samples_by_shards_of_its_cache(cache_base: Path,
                                                                  tmp_path: Path) -> None:
    root = tiny_cache(cache_base, "int8")
    cfg = tiny_config(root, tmp_path / "run", **{"data.shard_window": 2})
    ctx = open_run_data(cfg, DistInfo(rank=0, world_size=1, local_rank=0,
                                      device=torch.device("cpu")))
    order = ctx.sampler.order
    assert isinstance(order, ShardWindowOrder) and order.window == 2
    manifest = ctx.manifest
    assert order.images_per_shard == manifest.samples_per_shard // manifest.views_per_image
    assert ctx.sampler.state_dict()["shard_window"] == 2
    plain = open_run_data(tiny_config(root, tmp_path / "plain"),
                          DistInfo(rank=0, world_size=1, local_rank=0,
                                   device=torch.device("cpu")))
    assert plain.sampler.state_dict()["shard_window"] == 0
