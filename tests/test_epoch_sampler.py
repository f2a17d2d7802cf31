"""The epoch sampler alone (`train.sampling.ViewEpochSampler`) over fake image groups: one view
per image, domain balance, rank shards, padding, resume on another world size; the sampler over
a real cache is in test_train_data.py."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

from cache_format.errors import ConfigError
from train.sampling import ViewEpochSampler


# -- samplers over fake groups --------------------------------------------------------------------
@dataclass
class FakeGroups:
    """Images with 1-3 usable views each, in domains of different sizes."""

    image_first: np.ndarray
    image_count: np.ndarray
    image_domain: np.ndarray


def fake_groups(domain_sizes: tuple[int, ...] = (12, 3, 6)) -> FakeGroups:
    rng = np.random.default_rng(0)
    domains = np.repeat(np.arange(len(domain_sizes)), domain_sizes)
    counts = rng.integers(1, 4, size=len(domains))
    firsts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return FakeGroups(firsts.astype(np.int64), counts.astype(np.int64), domains.astype(np.int64))


def image_of(groups: FakeGroups, index: int) -> int:
    return int(np.searchsorted(groups.image_first, index, side="right")) - 1


def test_uniform_epoch_is_one_view_per_image_and_deterministic() -> None:
    groups = fake_groups()
    sampler = ViewEpochSampler(groups, seed=5, mode="uniform")
    first = list(sampler)
    assert len(first) == len(groups.image_first)
    assert sorted(image_of(groups, i) for i in first) == list(range(len(groups.image_first)))
    assert first == list(ViewEpochSampler(groups, seed=5, mode="uniform"))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    assert sorted(image_of(groups, i) for i in second) == list(range(len(groups.image_first)))
    # Over epochs, every usable view of every image is drawn.
    seen = set()
    for epoch in range(40):
        sampler.set_epoch(epoch)
        seen.update(sampler)
    assert seen == set(range(int(groups.image_count.sum())))


def test_teacher_balanced_gives_each_domain_an_equal_share() -> None:
    groups = fake_groups((12, 3, 6))
    sampler = ViewEpochSampler(groups, seed=1, mode="teacher_balanced")
    sequence = list(sampler)
    assert len(sequence) == 3 * 12
    domains = [int(groups.image_domain[image_of(groups, i)]) for i in sequence]
    assert domains == [0, 1, 2] * 12  # round-robin: any 3 consecutive hold each domain once
    for d, size in enumerate((12, 3, 6)):
        images = Counter(
            image_of(groups, i) for i, dd in zip(sequence, domains, strict=True) if dd == d
        )
        # The largest domain is read once; smaller ones are cycled, each image equally often.
        assert len(images) == size and set(images.values()) == {12 // size}
    limited = ViewEpochSampler(groups, seed=1, mode="teacher_balanced", epoch_size=9)
    assert Counter(int(groups.image_domain[image_of(groups, i)]) for i in limited) == {
        0: 3,
        1: 3,
        2: 3,
    }


@pytest.mark.parametrize("mode", ["uniform", "teacher_balanced"])
def test_rank_shards_are_disjoint_cover_the_epoch_and_match_one_process(mode: str) -> None:
    groups = fake_groups()
    world, local = 3, 2
    single = ViewEpochSampler(groups, seed=2, mode=mode, epoch_size=36, batch_size=local * world)
    ranks = [
        ViewEpochSampler(
            groups, seed=2, mode=mode, epoch_size=36, rank=r, world_size=world, batch_size=local
        )
        for r in range(world)
    ]
    for s in (single, *ranks):
        s.set_epoch(4)
    shares = [list(r) for r in ranks]
    assert all(len(s) == 12 for s in shares)
    # Positions are disjoint and together they are the whole epoch, step by step in rank order.
    full = list(single)
    steps = [sum((share[k * local : (k + 1) * local] for share in shares), []) for k in range(6)]
    assert sum(steps, []) == full
    assert Counter(sum(shares, [])) == Counter(full)


def test_teacher_balanced_ranks_each_see_every_domain_by_default() -> None:
    groups = fake_groups((12, 3, 6))
    for rank in range(3):
        share = list(
            ViewEpochSampler(groups, seed=0, mode="teacher_balanced", rank=rank, world_size=3)
        )
        domains = Counter(int(groups.image_domain[image_of(groups, i)]) for i in share)
        assert domains == {0: 4, 1: 4, 2: 4}


def test_epoch_is_padded_so_every_rank_takes_the_same_steps() -> None:
    groups = fake_groups()
    ranks = [
        ViewEpochSampler(groups, seed=0, epoch_size=10, rank=r, world_size=2, batch_size=4)
        for r in range(2)
    ]
    assert [len(r) for r in ranks] == [8, 8]
    assert ranks[0].samples_per_rank == 8 and ranks[0].padded_size == 16


@pytest.mark.parametrize("mode", ["uniform", "teacher_balanced"])
def test_resume_mid_epoch_gives_the_same_remaining_sequence(mode: str) -> None:
    groups = fake_groups()
    sampler = ViewEpochSampler(groups, seed=9, mode=mode, rank=1, world_size=2, batch_size=3)
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    consumed = [next(it) for _ in range(7)]
    assert consumed == full[:7]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["start_index"] == 7
    resumed = ViewEpochSampler(groups, seed=9, mode=mode, rank=1, world_size=2, batch_size=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the loop's usual call keeps the restored position
    assert len(resumed) == len(full) - 7
    assert list(resumed) == full[7:]
    assert list(resumed) == full  # a later pass over the same epoch starts at its beginning
    # With a DataLoader the loop passes what it consumed (the sampler runs ahead).
    explicit = sampler.state_dict(consumed=6)
    resumed.load_state_dict(explicit)
    assert list(resumed) == full[6:]
    resumed.load_state_dict(explicit)
    resumed.set_epoch(3)  # a new epoch starts at 0
    assert len(list(resumed)) == len(full)


def test_resume_with_other_settings_is_refused() -> None:
    groups = fake_groups()
    state = ViewEpochSampler(groups, seed=9).state_dict()
    with pytest.raises(ConfigError, match="seed"):
        ViewEpochSampler(groups, seed=10).load_state_dict(state)
    with pytest.raises(ConfigError, match="world_size"):
        ViewEpochSampler(groups, seed=9, world_size=2).load_state_dict(state)


def test_sampler_settings_are_checked() -> None:
    groups = fake_groups()
    with pytest.raises(ConfigError, match="mode"):
        ViewEpochSampler(groups, seed=0, mode="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rank"):
        ViewEpochSampler(groups, seed=0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="epoch_size"):
        ViewEpochSampler(groups, seed=0, epoch_size=0)


@pytest.mark.parametrize("mode", ["uniform", "teacher_balanced"])
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4)])
def test_resume_on_another_world_size_continues_the_global_order(
    mode: str, before: int, after: int
) -> None:
    """Same global batch, other number of processes: the samples read after the resume are
    exactly the rest of the epoch's global sequence (none repeated, none skipped)."""
    groups = fake_groups()
    global_batch = 4
    samplers = [ViewEpochSampler(groups, seed=5, mode=mode, rank=r, world_size=before,
                                 batch_size=global_batch // before) for r in range(before)]
    for s in samplers:
        s.set_epoch(1)
    sequence = samplers[0].global_sequence(1)
    steps = 3
    seen = []
    for step in range(steps):  # what the ranks read, put side by side in rank order
        for s in samplers:
            local = global_batch // before
            seen += s.rank_sequence(1)[step * local:(step + 1) * local].tolist()
    assert seen == sequence[: steps * global_batch].tolist()
    state = samplers[0].state_dict(consumed=steps * global_batch // before)
    resumed = [ViewEpochSampler(groups, seed=5, mode=mode, rank=r, world_size=after,
                                batch_size=global_batch // after) for r in range(after)]
    rest = [list(r) for r in resumed if r.load_state_dict(state) is None]
    local = global_batch // after
    for step in range(len(rest[0]) // local):
        for r in rest:
            seen += r[step * local:(step + 1) * local]
    assert seen == sequence.tolist()


def test_resume_on_another_global_batch_is_refused() -> None:
    groups = fake_groups()
    state = ViewEpochSampler(groups, seed=9, world_size=2, batch_size=2).state_dict(consumed=2)
    with pytest.raises(ConfigError, match="global batch"):
        ViewEpochSampler(groups, seed=9, world_size=1, batch_size=2).load_state_dict(state)
