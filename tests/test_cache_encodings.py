"""Encodings: exact round trips for fp16/bf16, bounded error and the fidelity floor for int8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cache_format.encodings import (
    EncodingSpec,
    count_out_of_range,
    decode_tokens,
    decode_tokens_torch,
    encode_tokens,
    fallback_gain,
    fit_calibration,
)
from cache_format.errors import ConfigError, InvalidTokensError
from cache_format.testing import synthetic_activations

SHAPES = hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9)


def _tokens(limit: float) -> st.SearchStrategy[np.ndarray]:
    """float32 arrays including extreme values up to +-limit, zeros and subnormals."""
    limit = float(np.float32(limit))
    elements = st.floats(-limit, limit, allow_nan=False, allow_infinity=False, width=32)
    return hnp.arrays(np.float32, SHAPES, elements=elements)


@settings(max_examples=60, deadline=None)
@given(_tokens(65504.0))
def test_fp16_round_trip_is_the_float16_cast(x: np.ndarray) -> None:
    spec = EncodingSpec("fp16")
    values, scale = encode_tokens(x, spec)
    assert scale is None and values.dtype == np.float16
    decoded = decode_tokens(values, None, spec)
    np.testing.assert_array_equal(decoded, x.astype(np.float16).astype(np.float32))
    torch_decoded = decode_tokens_torch(torch.from_numpy(values), None, spec)
    np.testing.assert_array_equal(torch_decoded.numpy(), decoded)


@settings(max_examples=60, deadline=None)
@given(_tokens(3.0e38))
def test_bf16_round_trip_matches_torch_rounding(x: np.ndarray) -> None:
    spec = EncodingSpec("bf16")
    values, scale = encode_tokens(x, spec)
    assert scale is None and values.dtype == np.uint16
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(decode_tokens(values, None, spec), expected)
    torch_decoded = decode_tokens_torch(torch.from_numpy(values), None, spec)
    np.testing.assert_array_equal(torch_decoded.numpy(), expected)


@settings(max_examples=80, deadline=None)
@given(_tokens(1.0e6), st.integers(0, 2**31 - 1))
def test_int8_error_is_half_a_step_per_token(x: np.ndarray, seed: int) -> None:
    spec = EncodingSpec("int8")
    rng = np.random.default_rng(seed)
    dim = x.shape[-1]
    mean = rng.normal(0, 10, dim).astype(np.float32)
    std = rng.uniform(0.1, 100, dim).astype(np.float32)
    values, scale = encode_tokens(x, spec, mean, std)
    assert values.dtype == np.int8 and scale is not None and scale.shape == x.shape[:-1]
    assert np.abs(values.astype(np.int32)).max() <= 127
    decoded = decode_tokens(values, scale, spec, mean, std)
    # Rounding moves each standardized value by at most half a step (|scale| / 2) of the gain
    # the token was encoded with: std, or the fallback gain (negative scale, out of range).
    gain = np.where(scale[..., None] < 0, fallback_gain(std), std)
    bound = 0.5 * np.abs(scale)[..., None] * gain + 1e-5 * (np.abs(x) + np.abs(mean) + gain)
    assert (np.abs(decoded - x) <= bound).all()
    torch_decoded = decode_tokens_torch(torch.from_numpy(values), torch.from_numpy(scale), spec,
                                        torch.from_numpy(mean), torch.from_numpy(std))
    np.testing.assert_array_equal(torch_decoded.numpy(), decoded)  # same float32 operations


def test_int8_constant_token_decodes_to_the_mean() -> None:
    spec = EncodingSpec("int8")
    mean, std = np.arange(4, dtype=np.float32), np.ones(4, np.float32)
    values, scale = encode_tokens(mean[None], spec, mean, std)
    assert scale[0] == 0 and not values.any()
    np.testing.assert_array_equal(decode_tokens(values, scale, spec, mean, std)[0], mean)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def test_int8_fidelity_floor_on_outlier_channels() -> None:
    rng = np.random.default_rng(0)
    # D = 1024 like a ViT-L teacher: per-token absmax statistics depend on the width.
    calib_x = synthetic_activations(rng, (4, 64, 1024))
    x = synthetic_activations(rng, (8, 128, 1024))
    spec = EncodingSpec("int8")
    mean, std = fit_calibration(calib_x)
    assert std.max() / np.median(std) > 50  # the data really has outlier channels
    cos = _cosines(decode_tokens(*encode_tokens(x, spec, mean, std), spec, mean, std), x)
    assert cos.mean() >= 0.9999
    assert np.percentile(cos, 1) >= 0.9995
    # Without the standardization the outliers eat the int8 range: the reason it exists.
    zeros, ones = np.zeros(1024, np.float32), np.ones(1024, np.float32)
    plain = _cosines(decode_tokens(*encode_tokens(x, spec, zeros, ones), spec, zeros, ones), x)
    assert plain.mean() < 0.999


def test_fp16_overflow_is_refused() -> None:
    with pytest.raises(InvalidTokensError, match="float16 range"):
        encode_tokens(np.array([[1.0, 70000.0]], np.float32), EncodingSpec("fp16"))


def test_int8_needs_calibration_of_the_right_shape() -> None:
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ConfigError, match="calib_mean"):
        encode_tokens(x, EncodingSpec("int8"))
    with pytest.raises(ConfigError, match=r"shape \(3,\)"):
        encode_tokens(x, EncodingSpec("int8"), np.zeros(4, np.float32), np.ones(4, np.float32))


def test_fit_calibration_floors_dead_channels() -> None:
    x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    x[:, 2] = 5.0
    mean, std = fit_calibration(x)
    assert mean[2] == 5.0 and std[2] > 0
    with pytest.raises(InvalidTokensError, match="NaN"):
        fit_calibration(np.full((2, 3), np.nan, np.float32))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"name": "int3"}, "encoding.name"), ({"codec": "lz4"}, "encoding.codec"),
     ({"codec": "zstd", "level": 30}, "encoding.level"),
     ({"codec": "blosc", "level": 12}, "encoding.level")],
)
def test_encoding_spec_names_the_bad_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        EncodingSpec(**kwargs)


def _constant_channel_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, calibration mean, std) where channel 5 was constant in the calibration sample."""
    rng = np.random.default_rng(0)
    calib_x = synthetic_activations(rng, (4, 64, 1024))
    calib_x[..., 5] = calib_x[0, 0, 5]
    mean, std = fit_calibration(calib_x)
    return synthetic_activations(rng, (8, 128, 1024)), mean, std


def test_int8_survives_a_near_constant_calibration_channel() -> None:
    x, mean, std = _constant_channel_case()
    spec = EncodingSpec("int8")
    values, scale = encode_tokens(x, spec, mean, std)
    cos = _cosines(decode_tokens(values, scale, spec, mean, std), x)
    assert np.percentile(cos, 1) >= 0.999
    assert (scale < 0).mean() > 0.5  # most tokens left the calibrated range and fell back
    assert count_out_of_range(x, mean, std) > 0


def test_int8_without_the_fallback_is_broken_by_that_channel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What the fallback prevents: the floored channel takes the absmax, the rest rounds to 0.
    monkeypatch.setattr("cache_format.encodings.FALLBACK_Z_BOUND", float("inf"))
    x, mean, std = _constant_channel_case()
    spec = EncodingSpec("int8")
    cos = _cosines(decode_tokens(*encode_tokens(x, spec, mean, std), spec, mean, std), x)
    assert np.percentile(cos, 1) < 0.5


def test_int8_fallback_decodes_bit_identically_in_torch() -> None:
    x, mean, std = _constant_channel_case()
    spec = EncodingSpec("int8")
    values, scale = encode_tokens(x[:2], spec, mean, std)
    assert (scale < 0).any() and (scale >= 0).any()
    decoded = decode_tokens(values, scale, spec, mean, std)
    torch_decoded = decode_tokens_torch(torch.from_numpy(values), torch.from_numpy(scale), spec,
                                        torch.from_numpy(mean), torch.from_numpy(std))
    np.testing.assert_array_equal(torch_decoded.numpy(), decoded)


def test_fallback_gain_floors_at_the_upper_median() -> None:
    std = np.array([1e-6, 2.0, 1.0, 300.0], np.float32)
    np.testing.assert_array_equal(fallback_gain(std), [2.0, 2.0, 2.0, 300.0])
