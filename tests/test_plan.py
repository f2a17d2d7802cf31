"""The plan's size estimate against the bytes a tiny build actually writes.

With codec none the estimate counts every chunk the build stores (records, shard indexes, done
marks, statistics, calibration, the dataset index), so on a dataset whose images are all ok it
must match the files on disk; zarr.json documents are left out of both sides (they do not grow
with the data). On a dataset with skipped images it is an upper bound.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from precompute.config import load_build_config
from precompute.plan import make_plan
from tests.build_fixtures import build_quiet, write_config


def _data_bytes(path: Path, *, without: Path | None = None) -> int:
    """Bytes of every file under `path` except zarr.json documents (and the `without` tree)."""
    total = 0
    for root, _, names in os.walk(path):
        if without is not None and Path(root).is_relative_to(without):
            continue
        total += sum(os.path.getsize(os.path.join(root, n)) for n in names if n != "zarr.json")
    return total


def _close(estimate: int, actual: int) -> bool:
    return abs(estimate - actual) <= 0.02 * actual


@pytest.mark.parametrize("encoding", ["int8", "fp16", "bf16", "int4h"])
def test_the_size_estimate_matches_the_bytes_written(images: dict, tmp_path: Path,
                                                     encoding: str) -> None:
    cache = tmp_path / "cache"
    config = load_build_config(write_config(tmp_path / "cache.toml", cache, images,
                                            encoding=encoding))
    plan = make_plan(config)
    build_quiet(config)
    # "rooms": every image ok, so the estimate is exact; dino stores cls + patch (and int8
    # scales), mast3r patch only.
    rooms = cache / "datasets" / "rooms"
    for pair in plan.pairs_of("dino") + plan.pairs_of("mast3r"):
        written = _data_bytes(rooms.parent / pair.dataset / "teachers" / pair.teacher)
        if pair.dataset == "rooms":
            assert _close(pair.total_bytes, written), (pair.teacher, pair.total_bytes, written)
        else:  # web: skipped images store no record
            assert pair.total_bytes > written
    index = plan.datasets["rooms"].index_size.nbytes(0, plan.datasets["rooms"].num_shards)
    written = _data_bytes(rooms, without=rooms / "teachers")
    assert _close(index, written), (index, written)
    assert plan.total_bytes >= _data_bytes(cache)
    # Before anything is written, the remaining bytes are the whole estimate.
    assert plan.todo_bytes == plan.total_bytes


def test_a_resumed_plan_counts_only_what_is_left(images: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    small = write_config(tmp_path / "small.toml", cache, images, teachers=("dino",),
                         dataset_names=("rooms",))
    build_quiet(small)
    full = make_plan(load_build_config(write_config(tmp_path / "full.toml", cache, images,
                                                    dataset_names=("rooms",))))
    done = full.pairs_of("dino")[0]
    assert done.done and done.in_cache
    new = full.pairs_of("mast3r")[0]
    assert full.todo_bytes == new.total_bytes  # the index and dino's pair are written
    assert full.total_bytes == new.total_bytes + done.total_bytes + full.datasets[
        "rooms"].index_size.nbytes(0, full.datasets["rooms"].num_shards)
