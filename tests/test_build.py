"""`build_cache` in process: determinism, fidelity to the teachers, bad images, resume rules.

The tiny mix and teachers are described in tests/build_fixtures.py. Builds here run on a local
dask cluster in threads mode (fast to start); tests/test_build_dask.py covers worker processes,
several workers, a real external scheduler and a SIGKILLed build.
"""

from __future__ import annotations

import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_format.errors import (
    BadImageError,
    CacheMismatchError,
    CacheNotFoundError,
    ConfigError,
    DuneError,
)
from cache_format.manifest import STATUS_OK, status_code
from cache_format.reader import open_cache
from cache_format.testing import build_tiny_cache
from cache_format.writer import CacheWriter
from precompute import dataset_keys
from precompute import plan as plan_module
from precompute.build import _open_writer
from precompute.config import CacheBuildConfig, SharingConfig, load_build_config
from precompute.dataset_keys import DatasetConfig
from precompute.decode import DEFAULT_MAX_PIXELS
from precompute.plan import make_plan
from precompute.render import normalize, render_view, resize_for_teacher
from precompute.sources import FileSource, open_source
from precompute.synthetic import BAD_FILE_NAMES, BAD_KINDS
from precompute.teachers.config import TeacherConfig
from precompute.teachers.loaded import load_teacher
from precompute.units import (
    CalibrationViews,
    UnitSettings,
    _ImageProbe,
    _ReplayedViews,
    run_index_unit,
    shard_images,
)
from precompute.view_params import ViewParams
from tests.build_fixtures import (
    VIEWS,
    build_quiet,
    cache_digest,
    file_hashes,
    write_config,
)


@pytest.fixture(scope="module")
def baseline(reference_build: Path) -> Path:
    """The reference int8 build (one worker, threads, no loader processes), shared with
    test_build_dask.py through tests/conftest.py."""
    return reference_build


def test_building_twice_gives_identical_bytes(baseline: Path, tmp_path: Path) -> None:
    cache = baseline / "cache"
    first = file_hashes(cache)
    cfg = load_build_config(baseline / "cache.toml")
    # Rebuild the very same path from scratch: every file must come back bit for bit.
    shutil.move(cache, tmp_path / "kept")
    try:
        build_quiet(cfg)
        assert file_hashes(cache) == first
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.move(tmp_path / "kept", cache)
    # A rerun over the complete cache is a no-op that touches nothing.
    summary = build_quiet(cfg)
    assert summary.pairs == {} and file_hashes(cache) == first


def _replayed_tokens(cfg_path: Path, cache: str, dataset: str, teacher: str,
                     samples: np.ndarray) -> dict[str, torch.Tensor]:
    """A direct forward of the teacher on the views replayed from the cache's index."""
    cfg = load_build_config(cfg_path)
    model = load_teacher(cfg.teacher(teacher))
    index = open_cache(cache).index(dataset)
    source = open_source(cfg.dataset(dataset), cfg.build.max_pixels)
    student = (cfg.grid[0] * cfg.student_patch, cfg.grid[1] * cfg.student_patch)
    views = [render_view(source.load(int(s) // VIEWS),
                         ViewParams.from_array(index.view_params[s]), student) for s in samples]
    x = normalize(resize_for_teacher(torch.stack(views), model.input_size(cfg.grid)),
                  model.mean, model.std)
    return model.forward_tokens(x)


@pytest.mark.parametrize("encoding", ["int8", "fp16"])
def test_cached_tokens_equal_a_direct_forward_on_the_replayed_view(
    encoding: str, baseline: Path, images: dict, tmp_path: Path
) -> None:
    if encoding == "int8":
        cfg_path, cache = baseline / "cache.toml", str(baseline / "cache")
    else:
        cache = str(tmp_path / "cache")
        cfg_path = write_config(tmp_path / "cache.toml", cache, images, encoding="fp16")
        build_quiet(cfg_path)
    reader = open_cache(cache)
    for dataset in reader.datasets:
        ok = np.flatnonzero(reader.index(dataset).ok)
        assert ok.size > 0
        for teacher in reader.teachers_for(dataset):
            fresh = _replayed_tokens(cfg_path, cache, dataset, teacher, ok)
            cached = reader.read_encoded(dataset, ok, [teacher])[teacher]
            assert set(fresh) == set(cached)
            for tok, x in fresh.items():
                y = cached[tok].decode()
                if encoding == "fp16":  # lossless up to fp16 rounding
                    torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-3)
                cos = torch.nn.functional.cosine_similarity(
                    x.reshape(-1, x.shape[-1]), y.reshape(-1, x.shape[-1]), dim=-1)
                assert float(cos.min()) >= 0.9995, (dataset, teacher, tok, float(cos.min()))


def test_every_bad_image_kind_is_skipped_with_its_reason(baseline: Path) -> None:
    reader = open_cache(baseline / "cache")
    index = reader.index("web")
    reason_of = {f"bad/{BAD_FILE_NAMES[kind]}": reason for kind, reason in BAD_KINDS.items()}
    seen = set()
    for image, key in enumerate(index.keys):
        status = index.status[image * VIEWS:(image + 1) * VIEWS]
        expected = status_code(reason_of[key]) if key in reason_of else STATUS_OK
        assert (status == expected).all(), (key, status)
        seen.add(key)
    assert set(reason_of) <= seen
    # Skipped samples carry no tokens and count nowhere in the statistics.
    stats = reader.stats("dino", "cls", ["web"])
    assert stats.count == int(index.ok.sum())


def test_strict_stops_at_the_first_bad_image_and_keeps_what_was_written(
    baseline: Path, images: dict, tmp_path: Path
) -> None:
    cfg_path = write_config(tmp_path / "cache.toml", tmp_path / "cache", images)
    with pytest.raises(BadImageError) as info:
        build_quiet(cfg_path, strict=True)
    assert "/bad/" in info.value.path and info.value.reason in BAD_KINDS.values()
    assert "--strict" in str(info.value) and info.value.path in str(info.value)
    # "rooms" (no bad image) was indexed first and stays written; web's first shard holds the
    # first bad files ("bad/..." sort first) and has no index; no teacher ran.
    reader = open_cache(tmp_path / "cache")
    assert not reader.manifest.assignment
    assert reader.index_done("rooms").all()
    assert not reader.index_done("web")[0]
    # Without --strict the same command finishes the cache: identical to the baseline.
    build_quiet(cfg_path)
    assert cache_digest(tmp_path / "cache") == cache_digest(baseline / "cache")


def test_an_index_unit_records_bad_images_and_raises_only_under_strict(
    images: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_build_config(write_config(tmp_path / "cache.toml", tmp_path / "cache", images,
                                         teachers=("dino",), dataset_names=("web",)))
    plan = make_plan(cfg)
    _open_writer(plan)  # the cache and web's empty index
    # Units never list a dataset: they get the slice of their shard's images from the driver.
    monkeypatch.setattr(dataset_keys, "list_folder", lambda root: pytest.fail("listed"))
    shard0 = shard_images(plan.datasets["web"].source, VIEWS, 0, cfg.samples_per_shard)
    assert shard0.keys()[0].startswith("bad/")  # bad files sort first
    strict = UnitSettings(cfg, "cpu", 1, strict=True)
    with pytest.raises(BadImageError) as info:
        run_index_unit(strict, shard0, 0)
    # What dask sends back from a worker process: the error with its reason and path.
    sent = pickle.loads(pickle.dumps(info.value))
    assert (str(sent), sent.reason, sent.path) == (str(info.value), info.value.reason,
                                                   info.value.path)
    assert str(sent).startswith("--strict: dataset web: ") and "/bad/" in sent.path
    assert sent.reason in BAD_KINDS.values()
    assert not CacheWriter.open(cfg.cache).index_shard_done("web", 0)
    # Without strict the same unit completes, every bad image recorded with its reason.
    result = run_index_unit(replace(strict, strict=False), shard0, 0)
    reasons = [BAD_KINDS[k] for k in sorted(BAD_KINDS, key=lambda k: BAD_FILE_NAMES[k])][:2]
    assert result.samples == 0 and result.skipped == {r: VIEWS for r in reasons}
    assert CacheWriter.open(cfg.cache).index_shard_done("web", 0)


def test_a_unit_ships_its_own_images_not_the_dataset(tmp_path: Path) -> None:
    keys = [f"n{i // 1300:08d}/n{i // 1300:08d}_{i:06d}.JPEG" for i in range(100_000)]
    cfg = DatasetConfig(name="inet", kind="folder", root=str(tmp_path), domain="2d")
    source = FileSource(cfg, keys, DEFAULT_MAX_PIXELS, "skip")
    settings = UnitSettings(_mix("all"), "cpu", 1)
    images = shard_images(source, 4, 64 * 900, 64 * 901)  # shard 900: 16 images
    assert images.keys() == keys[14_400:14_416]
    calibration = CalibrationViews(shard_images(source, 4, 0, 256), np.arange(256),
                                   np.zeros((256, 20), dtype=np.float32))
    # The old design's decoding dataset held the whole source (2.6 MB pickled, sent to every
    # spawned decoding process of every unit) and each worker listed the dataset itself.
    assert len(pickle.dumps(_ImageProbe(source, range(16)))) > 2_000_000
    for shipped in (
        (settings, images, 900),  # an index unit's arguments
        (settings, "dino", images, 900),  # a teacher unit's
        _ImageProbe(images, range(images.first, images.stop)),  # to decoding processes
        _ReplayedViews(images, 4, range(images.first * 4, images.stop * 4),
                       np.zeros((64, 20), dtype=np.float32), (28, 28), (28, 28), (0.5,) * 3,
                       (0.5,) * 3),
    ):
        assert len(pickle.dumps(shipped)) < 16_000, type(shipped)  # the shard: 16 images
    # A prepare unit's: K = 256 samples, their view rows and the slice of their 64 images.
    assert len(pickle.dumps((settings, "dino", "inet", calibration))) < 32_000


def test_set_build_config_rewrites_only_the_manifest(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    build_tiny_cache(cache)
    before = file_hashes(cache)
    writer = CacheWriter.open(cache)
    old_manifest = writer.manifest
    config = {"seed": 1, "grid": (2, 2), "datasets": [{"name": "ds", "root": "/data/ds"}]}
    writer.set_build_config(config)
    config["seed"] = 2  # the writer stored a copy
    expected = {"seed": 1, "grid": [2, 2], "datasets": [{"name": "ds", "root": "/data/ds"}]}
    after = file_hashes(cache)
    assert set(after) == set(before)
    assert [path for path in before if after[path] != before[path]] == ["zarr.json"]
    assert writer.manifest == replace(old_manifest, build_config=expected)
    assert CacheWriter.open(cache).manifest == writer.manifest
    assert open_cache(cache).manifest.build_config == expected
    for bad, message in (
        ({"cache": Path("/c")}, r"build_config\.cache: expected a JSON value .* PosixPath"),
        ({"views": {"scale": [0.4, float("nan")]}}, r"build_config\.views\.scale\[1\]: nan"),
        ({"matrix": {1: ["ds"]}}, r"build_config\.matrix: key 1 has type int, expected str"),
        ({"seed": np.int64(3)}, r"build_config\.seed: .* found int64"),
        ([("seed", 1)], "build_config: expected a dict, found list"),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            writer.set_build_config(bad)  # type: ignore[arg-type]
        assert str(cache) in str(info.value)
    assert file_hashes(cache) == after and writer.manifest.build_config == expected


def test_adding_a_teacher_and_a_dataset_leaves_existing_arrays_untouched(
    baseline: Path, images: dict, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    small = write_config(tmp_path / "small.toml", cache, images, teachers=("dino",),
                         dataset_names=("web",))
    build_quiet(small)
    before = file_hashes(cache)
    full = write_config(tmp_path / "full.toml", cache, images)
    plan = make_plan(load_build_config(full))
    assert [(p.teacher, p.dataset, p.in_cache) for p in plan.pairs] == [
        ("dino", "rooms", False), ("dino", "web", True),
        ("mast3r", "rooms", False), ("mast3r", "web", False)]
    summary = build_quiet(full)
    assert set(summary.pairs) == {("dino", "rooms"), ("mast3r", "web"), ("mast3r", "rooms")}
    after = file_hashes(cache)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert changed == ["zarr.json"]  # only the manifest (new teachers and datasets) changed
    # Built in two steps or in one, the arrays are the same, and the manifest's build config
    # describes the whole cache (the trainer finds the new dataset's root there).
    digest, reference = file_hashes(cache), file_hashes(baseline / "cache")
    del digest["zarr.json"], reference["zarr.json"]
    assert digest == reference
    stored = open_cache(cache).manifest.build_config
    expected = open_cache(baseline / "cache").manifest.build_config
    assert {k: v for k, v in stored.items() if k != "cache"} == {
        k: v for k, v in expected.items() if k != "cache"}


def test_config_change_is_refused_naming_every_field(baseline: Path, images: dict,
                                                      tmp_path: Path) -> None:
    before = file_hashes(baseline / "cache")
    changed = write_config(tmp_path / "changed.toml", baseline / "cache", images, seed=4,
                           grid=(4, 4), teachers=("dino",))
    with pytest.raises(CacheMismatchError) as info:
        build_quiet(changed)
    message = str(info.value)
    for field in ("seed: cache has 3, config has 4", "grid: cache has [2, 2]",
                  "teachers[mast3r]: in the cache, missing"):
        assert field in message
    assert file_hashes(baseline / "cache") == before


def test_a_build_that_does_not_fit_is_refused_before_it_starts(
    images: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(plan_module, "free_space", lambda path: 1000)
    cfg_path = write_config(tmp_path / "cache.toml", tmp_path / "cache", images)
    with pytest.raises(DuneError, match="only 0.00 GB are free"):
        build_quiet(cfg_path)
    assert not (tmp_path / "cache").exists()


def test_a_folder_that_is_not_a_cache_is_refused(images: dict, tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    cfg_path = write_config(tmp_path / "cache.toml", tmp_path / "cache", images)
    with pytest.raises(CacheNotFoundError, match="exists but is not a dune-distill cache"):
        build_quiet(cfg_path)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["notes.txt"]


def test_unknown_fields_and_bad_values_are_config_errors(images: dict, tmp_path: Path) -> None:
    good = write_config(tmp_path / "cache.toml", tmp_path / "cache", images).read_text()
    path = tmp_path / "bad.toml"
    for text, expected in (
        ("sed = 1\n" + good, "unknown field(s) sed"),
        (good.replace("batch_size = 3", "batch_sise = 3"), "build: unknown field(s) batch_sise"),
        (good.replace("samples_per_shard = 4", "samples_per_shard = 5"),
         "samples_per_shard: expected a multiple of views_per_image (2)"),
        (good.replace('strategy = "all"', 'strategy = "some"'), "sharing.strategy: expected"),
        (good.replace('name = "dino"', 'name = "mast3r"'), "the name(s) ['mast3r'] appear"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_build_config(path)
        assert expected in str(info.value) and str(path) in str(info.value)


def _mix(strategy: str, **sharing: object) -> CacheBuildConfig:
    """Three teachers (2d, 3d, human) and four datasets, without images (config only)."""
    teachers = tuple(
        TeacherConfig(name=name, kind="test_vit_p14", domain=domain)
        for name, domain in (("dino", "2d"), ("mast3r", "3d"), ("hmr", "human")))
    datasets = tuple(
        DatasetConfig(name=name, kind="folder", root=f"/data/{name}", domain=domain)
        for name, domain in (("inet", "2d"), ("gldv2", "2d"), ("mega", "3d"), ("bedlam", "human")))
    return CacheBuildConfig(cache="/tmp/c", grid=(2, 2), teachers=teachers, datasets=datasets,
                            sharing=SharingConfig(strategy=strategy, **sharing))  # type: ignore[arg-type]


def test_sharing_strategies_give_the_documented_assignments() -> None:
    everything = ("inet", "gldv2", "mega", "bedlam")
    assert _mix("all").assignment() == {t: everything for t in ("dino", "mast3r", "hmr")}
    assert _mix("own").assignment() == {
        "dino": ("inet", "gldv2"), "mast3r": ("mega",), "hmr": ("bedlam",)}
    # Generic = the first teacher's domain unless declared.
    assert _mix("own+generic").assignment() == {
        "dino": ("inet", "gldv2"), "mast3r": ("inet", "gldv2", "mega"),
        "hmr": ("inet", "gldv2", "bedlam")}
    assert _mix("own+generic", generic_domains=("3d",)).assignment() == {
        "dino": ("inet", "gldv2", "mega"), "mast3r": ("mega",), "hmr": ("mega", "bedlam")}
    matrix = {"dino": ("mega", "inet"), "mast3r": ("mega",), "hmr": ("bedlam", "gldv2")}
    assert _mix("matrix", matrix=matrix).assignment() == {
        "dino": ("inet", "mega"), "mast3r": ("mega",), "hmr": ("gldv2", "bedlam")}


def test_sharing_errors_name_the_teacher_or_dataset() -> None:
    with pytest.raises(ConfigError, match=r"dataset\(s\) \['gldv2'\] get no teacher"):
        _mix("matrix", matrix={"dino": ("inet",), "mast3r": ("mega",), "hmr": ("bedlam",)})
    with pytest.raises(ConfigError, match=r"teacher\(s\) \['hmr'\] get no dataset"):
        _mix("matrix", matrix={"dino": ("inet", "gldv2", "mega", "bedlam"), "mast3r": ("mega",)})
    with pytest.raises(ConfigError, match=r"sharing.matrix: unknown teacher\(s\) \['vggt'\]"):
        _mix("matrix", matrix={"vggt": ("inet",)})
    with pytest.raises(ConfigError, match="only used by strategy 'own\\+generic'"):
        _mix("all", generic_domains=("2d",))
