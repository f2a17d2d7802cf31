"""int8 out-of-range values are recorded per pair, shown by info and checked by verify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from cache_format.encodings import EncodingSpec, fit_calibration
from cache_format.manifest import STATUS_OK
from cache_format.reader import open_cache
from cache_format.testing import (
    build_tiny_cache,
    synthetic_activations,
    tiny_dataset,
    tiny_manifest,
    tiny_teacher,
)
from cache_format.writer import CacheWriter
from precompute.cache_tools import cache_info
from precompute.cli import app


def _write_with_a_dead_calibration_channel(path: Path) -> None:
    """One int8 pair whose calibration saw channel 3 constant; the tokens vary there."""
    manifest = tiny_manifest(EncodingSpec("int8"))
    teacher = tiny_teacher(dim=32)
    writer = CacheWriter.create(path, manifest)
    fingerprint, keys = tiny_dataset("ds", 4)
    writer.add_dataset(fingerprint, keys)
    n = writer.num_samples("ds")
    rng = np.random.default_rng(0)
    status = np.full(n, STATUS_OK, np.uint8)
    params = np.zeros((n, len(manifest.view_param_names)), np.float32)
    for shard in range(writer.num_shards("ds")):
        start, stop = writer.shard_bounds("ds", shard)
        writer.write_index_shard("ds", shard, params[start:stop], status[start:stop])
    writer.finalize_index("ds")
    tokens = {"patch": synthetic_activations(rng, (n, manifest.num_tokens, 32))}
    if teacher.has_cls:
        tokens["cls"] = synthetic_activations(rng, (n, 32))
    calibration = {}
    for tok, x in tokens.items():
        calib_x = x.copy()
        calib_x[..., 3] = 1.0
        calibration[tok] = fit_calibration(calib_x)
    writer.add_teacher("ds", teacher, calibration)
    for shard in range(writer.num_shards("ds")):
        start, stop = writer.shard_bounds("ds", shard)
        writer.write_shard("ds", teacher.name, shard,
                           {tok: x[start:stop] for tok, x in tokens.items()},
                           np.ones(stop - start, bool))
    writer.finalize_stats("ds", teacher.name)


def test_a_fitting_calibration_records_zero_and_verifies(tmp_path: Path) -> None:
    build_tiny_cache(tmp_path / "c", EncodingSpec("int8"))
    pairs = cache_info(str(tmp_path / "c"))["pairs"]
    assert pairs and all(set(p["out_of_range"].values()) == {0.0} for p in pairs)
    with open_cache(tmp_path / "c") as reader:
        assert reader.verify().problems == ()


def test_fp16_pairs_have_no_out_of_range_record(tmp_path: Path) -> None:
    build_tiny_cache(tmp_path / "c", EncodingSpec("fp16"))
    assert all(p["out_of_range"] == {} for p in cache_info(str(tmp_path / "c"))["pairs"])


def test_a_dead_calibration_channel_shows_in_info_and_fails_verify(tmp_path: Path) -> None:
    _write_with_a_dead_calibration_channel(tmp_path / "c")
    (pair,) = cache_info(str(tmp_path / "c"))["pairs"]
    # Channel 3 of 32 leaves the range on (nearly) every token: about 1/32 of the values.
    assert 0.02 < pair["out_of_range"]["patch"] <= 1 / 32
    with open_cache(tmp_path / "c") as reader:
        problems = reader.verify().problems
    assert any("outside the calibrated range" in p and "patch" in p for p in problems)
    shown = CliRunner().invoke(app, ["info", str(tmp_path / "c")])
    assert shown.exit_code == 0 and "out of range" in shown.output and "patch" in shown.output
