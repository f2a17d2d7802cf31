"""Teacher targets: decoded from the cache on the device, or computed live, and their parity."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cache_format.errors import CacheMismatchError, ConfigError
from cache_format.reader import open_cache
from precompute.config import CacheBuildConfig
from tests.test_train_data import build_tiny_cache
from train.batch import Batch, collate_cached
from train.data import CacheTrainData
from train.targets import CachedTargets, OnlineTargets


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CacheBuildConfig]:
    return {
        encoding: build_tiny_cache(tmp_path_factory.mktemp(encoding), encoding=encoding)
        for encoding in ("fp16", "int8", "bf16")
    }


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> CacheBuildConfig:
    return build_tiny_cache(tmp_path_factory.mktemp("own"), encoding="int8", sharing="own")


def whole_batch(cache: str, **kwargs: object) -> tuple[CacheTrainData, Batch]:
    data = CacheTrainData(cache, heldout_images=0, **kwargs)  # type: ignore[arg-type]
    return data, collate_cached([data[i] for i in range(len(data))])


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1)


def test_cached_fp16_targets_equal_online_targets_within_1e_3(
    caches: dict[str, CacheBuildConfig],
) -> None:
    data, batch = whole_batch(caches["fp16"].cache)
    cached = CachedTargets(data.reader, device="cpu")
    online = OnlineTargets(data.reader.manifest, device="cpu")
    got, ref = cached(batch), online(batch)
    assert cached.teacher_names == online.teacher_names == ("dino", "mast3r")
    assert cached.dims == online.dims == {"dino": 32, "mast3r": 32}
    assert (
        cached.token_types == online.token_types == {"dino": ("cls", "patch"), "mast3r": ("patch",)}
    )
    assert set(got) == set(ref) == {"dino", "mast3r"}
    for teacher in got:
        assert set(got[teacher]) == set(ref[teacher])
        for tok, value in got[teacher].items():
            assert value.dtype == torch.float32
            n = len(batch)
            assert value.shape == ((n, 4, 32) if tok == "patch" else (n, 32))
            # fp16 keeps 11 significant bits: the error is at most 2^-11 of each value.
            error = (value - ref[teacher][tok]).abs().max()
            assert error <= 1e-3 * max(1.0, float(ref[teacher][tok].abs().max()))
            torch.testing.assert_close(value, ref[teacher][tok], atol=1e-3, rtol=2**-11)
    assert got.presence.all() and ref.presence.all()


@pytest.mark.parametrize("encoding,floor", [("int8", 0.999), ("bf16", 0.9999)])
def test_lossy_encodings_stay_close_to_online(
    caches: dict[str, CacheBuildConfig], encoding: str, floor: float
) -> None:
    data, batch = whole_batch(caches[encoding].cache)
    got = CachedTargets(data.reader)(batch)
    ref = OnlineTargets(data.reader.manifest)(batch)
    for teacher in got:
        for tok in got[teacher]:
            assert cosine(got[teacher][tok], ref[teacher][tok]).min() >= floor


def test_cached_targets_decode_what_the_reader_decodes(caches: dict[str, CacheBuildConfig]) -> None:
    data, batch = whole_batch(caches["int8"].cache)
    got = CachedTargets(data.reader)(batch)
    reader = open_cache(caches["int8"].cache)
    for row in (0, len(batch) - 1):
        name = batch.dataset_names[int(batch.dataset[row])]
        sample = reader.read_sample(name, int(batch.sample[row]))
        for teacher, toks in sample.items():
            for tok, value in toks.items():
                torch.testing.assert_close(got[teacher][tok][row], value, atol=1e-6, rtol=1e-6)


def test_absent_teacher_rows_are_zero_and_not_present(own_cache: CacheBuildConfig) -> None:
    data, batch = whole_batch(own_cache.cache)
    cached = CachedTargets(data.reader)(batch)
    online = OnlineTargets(data.reader.manifest)(batch)
    web = batch.dataset == data.dataset_names.index("web")
    assert cached.present("dino").tolist() == web.tolist()
    assert cached.present("mast3r").tolist() == (~web).tolist()
    for targets in (cached, online):
        assert torch.equal(targets.presence, batch.presence)
        assert (targets["dino"]["patch"][~web] == 0).all()
        assert (targets["mast3r"]["patch"][web] == 0).all()
        assert (targets["dino"]["patch"][web] != 0).any()
    for teacher, mask in (("dino", web), ("mast3r", ~web)):
        for tok in cached[teacher]:
            assert cosine(cached[teacher][tok][mask], online[teacher][tok][mask]).min() >= 0.999


def test_online_teacher_with_other_weights_is_refused(caches: dict[str, CacheBuildConfig]) -> None:
    manifest = open_cache(caches["fp16"].cache).manifest
    build = CacheBuildConfig.from_dict(manifest.build_config)
    reseeded = dataclasses.replace(
        build, teachers=(dataclasses.replace(build.teachers[0], init_seed=99), build.teachers[1])
    )
    other = dataclasses.replace(manifest, build_config=reseeded.to_dict())
    with pytest.raises(CacheMismatchError, match=r"'dino': checkpoint_sha256"):
        OnlineTargets(other, ["dino"])
    # A teacher the cache fingerprinted differently (another checkpoint) is refused too.
    fp = dataclasses.replace(manifest.teachers["mast3r"], checkpoint_sha256="0" * 64)
    tampered = dataclasses.replace(manifest, teachers={**manifest.teachers, "mast3r": fp})
    with pytest.raises(CacheMismatchError, match="mast3r"):
        OnlineTargets(tampered, ["mast3r"])
    OnlineTargets(manifest, ["mast3r"])  # the cache's own teacher loads


def test_targets_refuse_a_batch_with_another_teacher_order(
    caches: dict[str, CacheBuildConfig],
) -> None:
    data, batch = whole_batch(caches["fp16"].cache, teachers=["mast3r", "dino"])
    with pytest.raises(ConfigError, match="same teacher list"):
        CachedTargets(data.reader, ["dino", "mast3r"])(batch)
    swapped = CachedTargets(data.reader, ["mast3r", "dino"])(batch)
    assert list(swapped) == ["mast3r", "dino"]
    with pytest.raises(CacheMismatchError, match="nope"):
        CachedTargets(data.reader, ["nope"])


def test_online_runs_need_no_tokens(caches: dict[str, CacheBuildConfig], tmp_path: Path) -> None:
    data, batch = whole_batch(caches["fp16"].cache, read_tokens=False)
    assert batch.tokens == {} and batch.presence.all()
    full_data, full = whole_batch(caches["fp16"].cache)
    online = OnlineTargets(data.reader.manifest)
    a, b = online(batch), online(full)
    for teacher in a:
        for tok in a[teacher]:
            torch.testing.assert_close(a[teacher][tok], b[teacher][tok])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_batches_decode_on_the_gpu(caches: dict[str, CacheBuildConfig]) -> None:
    data, batch = whole_batch(caches["int8"].cache)
    pinned = batch.pin_memory()
    assert pinned.images.is_pinned() and pinned.tokens["dino"]["patch"].values.is_pinned()
    gpu = pinned.to("cuda", non_blocking=True)
    got = CachedTargets(data.reader, device="cuda")(gpu)
    ref = CachedTargets(data.reader)(batch)
    online = OnlineTargets(data.reader.manifest, device="cuda")(gpu)  # bf16 autocast
    for teacher in ref:
        for tok, value in ref[teacher].items():
            assert got[teacher][tok].device.type == "cuda"
            torch.testing.assert_close(got[teacher][tok].cpu(), value, atol=1e-5, rtol=1e-5)
            assert cosine(online[teacher][tok].cpu(), value).min() >= 0.99
