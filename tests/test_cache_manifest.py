"""Manifest: dict round trip, version refusal, mismatch messages; per-channel statistics."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_format.encodings import EncodingSpec
from cache_format.errors import CacheMismatchError, CacheVersionError, ConfigError
from cache_format.manifest import (
    FORMAT_VERSION,
    STATUS_CODES,
    Manifest,
    keys_sha256,
    status_code,
    status_name,
)
from cache_format.stats import ChannelStats, merge, merge_all
from cache_format.testing import tiny_dataset, tiny_manifest, tiny_teacher


def _full_manifest() -> Manifest:
    dataset, _ = tiny_dataset()
    teacher = tiny_teacher()
    return replace(tiny_manifest(EncodingSpec("bf16", "zstd", 5)), teachers={"t1": teacher},
                   datasets={"ds": dataset}, assignment={"t1": ("ds",)})


def test_manifest_round_trips_through_json() -> None:
    manifest = _full_manifest()
    stored = json.loads(json.dumps(manifest.to_dict()))
    assert Manifest.from_dict(stored) == manifest
    assert stored["status_codes"] == STATUS_CODES and stored["format_version"] == FORMAT_VERSION


def test_newer_format_version_is_refused_with_upgrade_hint() -> None:
    stored = _full_manifest().to_dict()
    stored["format_version"] = FORMAT_VERSION + 1
    stored["a_field_from_the_future"] = 1
    with pytest.raises(CacheVersionError, match=f"format version {FORMAT_VERSION + 1}") as info:
        Manifest.from_dict(stored)
    assert "upgrade dune-distill" in info.value.hint
    with pytest.raises(CacheVersionError, match="no format_version"):
        Manifest.from_dict({"grid": [2, 2]})


def test_check_against_names_the_differing_field() -> None:
    manifest = _full_manifest()
    manifest.check_against(grid=(4, 4), teachers=[tiny_teacher()], encoding=manifest.encoding)
    with pytest.raises(CacheMismatchError, match=r"grid: expected \[32, 32\], found \[4, 4\]"):
        manifest.check_against(grid=(32, 32))
    other = replace(tiny_teacher(), checkpoint_sha256="f" * 64)
    with pytest.raises(CacheMismatchError, match="teachers.t1.checkpoint_sha256") as info:
        manifest.check_against(teachers={"t1": other})
    assert "f" * 64 in str(info.value) and "0" * 64 in str(info.value)
    with pytest.raises(CacheMismatchError, match="teachers.t9: expected present"):
        manifest.check_against(teachers=[tiny_teacher("t9")])
    with pytest.raises(CacheMismatchError, match="encoding.name"):
        manifest.check_against(encoding=EncodingSpec("int8", "zstd", 5))
    with pytest.raises(ConfigError, match="not a manifest field"):
        manifest.check_against(gird=(4, 4))


def test_manifest_checks_name_the_field() -> None:
    with pytest.raises(ConfigError, match="samples_per_shard"):
        tiny_manifest(samples_per_shard=5)  # views_per_image is 2
    with pytest.raises(ConfigError, match="assignment"):
        replace(tiny_manifest(), assignment={"t1": ("ds",)})
    with pytest.raises(ConfigError, match="teacher name"):
        tiny_teacher("timm:vit/small")
    with pytest.raises(ConfigError, match="token_types"):
        tiny_teacher(token_types=("cls",))


def test_status_helpers_and_keys_hash() -> None:
    assert status_name(1) == "ok" and status_code("truncated") == 3
    assert all(status_code(status_name(int(c))) == int(c) for c in STATUS_CODES)
    with pytest.raises(ConfigError, match="unknown"):
        status_code("bogus")
    # NUL-separated: splitting a key differently changes the hash.
    assert keys_sha256(["ab", "c"]) != keys_sha256(["a", "bc"])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.lists(st.integers(0, 60), max_size=5), st.integers(0, 2**31 - 1))
def test_chan_merge_equals_one_pass(n: int, cuts: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 3)) * [1.0, 1e3, 1e-3] + [5.0, -1e4, 0.0]).astype(np.float32)
    bounds = sorted({0, n, *(c % (n + 1) for c in cuts)})
    parts = [ChannelStats.of(x[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    merged = merge_all(parts[::-1], 3)
    direct = x.astype(np.float64)
    assert merged.count == n
    np.testing.assert_allclose(merged.mean, direct.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.std, direct.std(0), rtol=1e-9, atol=1e-12)
    assert merge(ChannelStats.empty(3), merged) is merged
