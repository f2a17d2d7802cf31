"""The cache is the only contract between the stages: the replay section, the pre-flight, the
imports of a cached fit, and the memory a trainer holds per sample.

Caches are the tiny ones of tests/test_trainer.py (three random-init teachers standing in for
DINOv2 / MASt3R / Multi-HMR, datasets web2d (2d), scenes3d (3d), humans (human)).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache_format.errors import CacheMismatchError, CacheVersionError
from cache_format.reader import open_cache
from cache_format.replay import REPLAY_VERSION, ReplaySpec, ReplayViews
from cache_format.writer import CacheWriter
from precompute.replay_spec import replay_spec_from_build_config
from precompute.views import ViewConfig
from tests.build_fixtures import subprocess_env
from tests.test_trainer import tiny_cache, tiny_config
from train.data import CacheTrainData
from train.item_table import ItemTable
from train.preflight import preflight
from train.sampling import ViewEpochSampler
from train.shard_sampling import ShardWindowOrder
from train.trainer import Trainer


@pytest.fixture(scope="module")
def cache_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("contract-caches")


def _copy_cache(root: Path, tmp_path: Path) -> Path:
    """A copy of a tiny cache folder (configs, images and cache) to modify."""
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    return copy


# -- the replay section -------------------------------------------------------------------------
def test_replay_views_mirror_the_view_config() -> None:
    """Replaying builds a ViewConfig from the section's fields: the two lists must stay equal."""
    names = [f.name for f in dataclasses.fields(ReplayViews)]
    assert names == [f.name for f in dataclasses.fields(ViewConfig)]


def test_builder_stores_the_replay_of_its_build_config(cache_base: Path) -> None:
    manifest = open_cache(tiny_cache(cache_base) / "cache").manifest
    spec = manifest.replay
    assert spec is not None and spec.version == REPLAY_VERSION
    # What `dune-cache upgrade` will compute from an older cache's build_config is the same.
    assert replay_spec_from_build_config(manifest.build_config) == spec
    assert spec.seed == manifest.seed and spec.views_per_image == manifest.views_per_image
    assert spec.teacher_domains == {"dinov2": "2d", "mast3r": "3d", "multihmr": "human"}
    assert spec.generic_domains == ("2d",)  # own+generic's default: the first teacher's domain
    assert {d: s.domain for d, s in spec.datasets.items()} == {
        d: fp.domain for d, fp in manifest.datasets.items()}
    assert spec.datasets["scenes3d"].kind == "list" and spec.datasets["scenes3d"].list_file
    assert spec.datasets["humans"].hdf5_key == "images"
    assert spec.views == ReplayViews(**dataclasses.asdict(ViewConfig()))
    assert spec.datasets["web2d"].max_pixels == manifest.build_config["build"]["max_pixels"]


def test_replay_section_round_trips_and_refuses_newer_versions(cache_base: Path) -> None:
    spec = open_cache(tiny_cache(cache_base) / "cache").manifest.replay
    assert spec is not None
    stored = json.loads(json.dumps(spec.to_dict()))
    assert ReplaySpec.from_dict(stored) == spec
    with pytest.raises(CacheVersionError, match=f"version {REPLAY_VERSION + 1}") as info:
        ReplaySpec.from_dict({**stored, "version": REPLAY_VERSION + 1, "new_field": 1})
    assert "upgrade dune-distill" in info.value.hint
    with pytest.raises(CacheVersionError, match="no valid version"):
        ReplaySpec.from_dict({k: v for k, v in stored.items() if k != "version"})
    with pytest.raises(CacheVersionError, match="views"):
        ReplaySpec.from_dict({**stored, "views": {"mode": "augment"}})


def test_a_cache_without_replay_section_asks_for_dune_cache_upgrade(
    cache_base: Path, tmp_path: Path
) -> None:
    root = _copy_cache(tiny_cache(cache_base), tmp_path)
    cache = root / "cache"
    original = open_cache(cache).manifest.replay
    # The manifest as today's builder wrote it before the section existed: no "replay" key.
    zarr_json = cache / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    del meta["attributes"]["dune_cache"]["replay"]
    del meta["attributes"]["dune_cache_sha256"]  # caches of that time had no manifest checksum
    zarr_json.write_text(json.dumps(meta))
    old = open_cache(cache).manifest
    assert old.replay is None
    with pytest.raises(CacheVersionError, match="no replay section") as info:
        CacheTrainData(cache)
    assert f"dune-cache upgrade {cache}" in info.value.hint
    with pytest.raises(CacheVersionError, match="no replay section"):
        Trainer(tiny_config(root, tmp_path / "run"), progress="off")
    # The upgrade computes the section from the build_config that cache stored.
    assert replay_spec_from_build_config(old.build_config) == original


# -- the pre-flight -----------------------------------------------------------------------------
def test_preflight_names_every_problem_at_once(cache_base: Path, tmp_path: Path) -> None:
    root = tiny_cache(cache_base)
    cfg = tiny_config(root, tmp_path / "run", **{
        "student.img_size": 42, "data.teachers": ["dinov2", "nope"],
        "data.expect_checkpoint_sha256": {"mast3r": "0" * 64}, "data.roots": {"gone": "/x"}})
    manifest = open_cache(cfg.data.cache).manifest
    with pytest.raises(CacheMismatchError) as info:
        preflight(cfg, manifest, cfg.data.cache, student_patch=14)
    message = str(info.value)
    assert "grid (2, 2)" in message and "grid (3, 3)" in message
    assert "teacher 'nope' is not in the cache" in message
    assert "teacher 'mast3r' was cached from a checkpoint" in message and "0" * 64 in message
    assert "data.roots: ['gone']" in message
    assert message.count("\n  - ") == 4
    with pytest.raises(CacheMismatchError, match="teacher 'nope'"):  # before step 0
        Trainer(cfg, progress="off")


def test_check_against_names_every_differing_field(cache_base: Path) -> None:
    manifest = open_cache(tiny_cache(cache_base) / "cache").manifest
    with pytest.raises(CacheMismatchError) as info:
        manifest.check_against(grid=(3, 3), views_per_image=5,
                               teachers={"mast3r": {"dim": 1, "patch_size": 2}})
    message = str(info.value)
    for field in ("grid", "views_per_image", "teachers.mast3r.dim", "teachers.mast3r.patch_size"):
        assert f"field {field}:" in message


def test_domains_dropping_cannot_serve_fail_before_step_zero(
    cache_base: Path, tmp_path: Path
) -> None:
    root = tiny_cache(cache_base, "int8", sharing="own")
    # own_data without the teacher of the humans' domain: those images would train nothing.
    cfg = tiny_config(root, tmp_path / "a", **{"dropping.strategy": "own_data",
                                               "data.teachers": ["dinov2", "mast3r"]})
    with pytest.raises(CacheMismatchError, match=r"'own_data'.*\{'humans': 'human'\}"):
        Trainer(cfg, progress="off")
    # own+generic_data needs one generic domain; a cache declaring two is refused by name.
    copy = _copy_cache(root, tmp_path)
    spec = open_cache(copy / "cache").manifest.replay
    assert spec is not None
    CacheWriter.open(copy / "cache").set_replay(
        dataclasses.replace(spec, generic_domains=("2d", "3d")))
    generic = tiny_config(copy, tmp_path / "b", **{"dropping.strategy": "own+generic_data"})
    with pytest.raises(CacheMismatchError, match=r"several generic domains \['2d', '3d'\]"):
        Trainer(generic, progress="off")
    # Strategies that do not read domains accept both.
    manifest = open_cache(copy / "cache").manifest
    for fine in (dataclasses.replace(generic, dropping=dataclasses.replace(
            generic.dropping, strategy="lowest_loss")),
                 dataclasses.replace(cfg, dropping=dataclasses.replace(
                     cfg.dropping, strategy="none"))):
        preflight(fine, manifest, str(copy / "cache"), student_patch=14)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- what a cached fit imports ------------------------------------------------------------------
_BLOCKED_FIT = r"""
import importlib.abc, json, sys

BLOCKED = ("precompute.config", "precompute.build", "precompute.units", "precompute.plan",
           "precompute.teachers", "dask", "distributed")


class BlockStageOne(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == b or fullname.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{fullname} is blocked: a cached fit must not import it")
        return None


sys.meta_path.insert(0, BlockStageOne())
from train.config import TrainConfig
from train.trainer import Trainer

data = json.load(open(sys.argv[1]))
summary = Trainer(TrainConfig.from_dict(data), progress="off").fit()
losses = [r["loss"] for r in summary["rows"] if r.get("kind") == "train"]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("precompute", "dask", "distributed"))
try:  # online mode needs the teachers: with them blocked, building it must fail on the import
    Trainer(TrainConfig.from_dict({**data, "online": True, "out_dir": data["out_dir"] + "-online"}),
            progress="off")
    online = "built"
except ImportError as exc:
    online = str(exc)
print(json.dumps({"losses": losses, "loaded": loaded, "online": online}))
"""


def test_cached_fit_imports_no_builder_teacher_or_dask(cache_base: Path, tmp_path: Path) -> None:
    root = tiny_cache(cache_base)
    cfg = tiny_config(root, tmp_path / "run", max_steps=3, eval_every=2, **{
        "data.num_workers": 1})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.to_dict()))
    result = subprocess.run([sys.executable, "-c", _BLOCKED_FIT, str(config)], env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["losses"]) == 3 and all(np.isfinite(report["losses"]))
    # Only the view-replay code of stage one was imported.
    assert set(report["loaded"]) <= {"precompute", "precompute.views", "precompute.view_params",
                                     "precompute.render", "precompute.sources",
                                     "precompute.dataset_keys",  # the sources' key listing
                                     "precompute.url_files",  # the sources' reads by URL
                                     "precompute.decode"}, report["loaded"]
    assert "precompute.teachers is blocked" in report["online"]


# -- memory per sample --------------------------------------------------------------------------
def _arrays_nbytes(obj: Any, skip: tuple[Any, ...], seen: set[int] | None = None) -> int:
    """Bytes of every numpy array reachable through `obj`'s attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen or any(obj is s for s in skip):
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_arrays_nbytes(v, skip, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_arrays_nbytes(v, skip, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _arrays_nbytes(vars(obj), skip, seen)
    if dataclasses.is_dataclass(obj):
        return sum(_arrays_nbytes(getattr(obj, f.name), skip, seen)
                   for f in dataclasses.fields(obj))
    return 0


def test_a_trainer_holds_at_most_6_bytes_per_sample() -> None:
    """DUNE's shape: 6 views per image, three domains of unequal size, 1% unusable samples.
    Counted: the statuses the reader keeps (1 byte per sample), the item table, and the
    sampler's state after drawing an epoch (one process: the largest share), in image order
    and in shard order."""
    rng = np.random.default_rng(0)
    views = 6
    images = {"web": 120_000, "rooms": 50_000, "people": 30_000}
    statuses = {d: (rng.random(n * views) > 0.01).astype(np.uint8) for d, n in images.items()}
    table = ItemTable.build([s.reshape(-1, views) == 1 for s in statuses.values()], [0, 1, 2],
                            views, 3)
    samples = sum(n * views for n in images.values())
    held = sum(s.nbytes for s in statuses.values()) + table.nbytes
    orders = [None, ShardWindowOrder(table, images_per_shard=64, window=8)]
    for mode, order in itertools.product(("uniform", "teacher_balanced"), orders):
        sampler = ViewEpochSampler(table, seed=0, mode=mode, batch_size=256,  # type: ignore[arg-type]
                                   order=order)
        sequence = sampler.rank_sequence(0)
        assert sequence.dtype == np.uint32 and len(sequence) == sampler.padded_size
        state = _arrays_nbytes(sampler, skip=(table,))
        per_sample = (held + state) / samples
        assert per_sample <= 6.0, (mode, per_sample)
        d, sample = table.locate(int(sequence[-1]))
        assert 0 <= sample < list(images.values())[d] * views


def test_the_dataset_holds_no_per_sample_array_beyond_its_item_table(cache_base: Path) -> None:
    data = CacheTrainData(tiny_cache(cache_base) / "cache", heldout_images=0)
    held = _arrays_nbytes(data, skip=(data.reader, data._sources))
    assert held <= data.items.nbytes + 512  # + the per-dataset offsets and presence
    assert data.image_first.dtype == np.uint32 and data.image_count.dtype == np.uint8
    assert [data.locate(i) for i in range(len(data))] == sorted(
        data.locate(i) for i in range(len(data)))
