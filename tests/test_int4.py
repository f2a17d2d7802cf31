"""The 4-bit encodings (int4, int4h): bounds of the round trip, torch decoding bit-identical to
numpy on odd shapes and fallback tokens, a channel constant in the calibration, exact bytes,
and the manifest's refusal of an encoding it does not know."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_format import int4
from cache_format.encodings import (
    EncodingSpec,
    decode_tokens,
    decode_tokens_torch,
    encode_tokens,
    fallback_gain,
    fit_calibration,
)
from cache_format.errors import CacheVersionError, ConfigError
from cache_format.footprint import bytes_per_sample
from cache_format.manifest import Manifest
from cache_format.testing import synthetic_activations, tiny_manifest

INT4_SPECS = [EncodingSpec("int4"), EncodingSpec("int4h")]


def _standardized_cosines(decoded: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-token cosine after standardizing each channel with x's own statistics (what the
    trainer's TeacherNorm does before the loss)."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    a = (decoded.reshape(flat.shape) - mean) / std
    b = (flat - mean) / std
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _torch_decode(values: np.ndarray, scale: np.ndarray, spec: EncodingSpec, mean: np.ndarray,
                  std: np.ndarray) -> np.ndarray:
    return decode_tokens_torch(torch.from_numpy(values), torch.from_numpy(scale), spec,
                               torch.from_numpy(mean), torch.from_numpy(std)).numpy()


@pytest.mark.parametrize("spec", INT4_SPECS, ids=lambda s: s.name)
def test_round_trip_error_is_bounded_by_half_a_step(spec: EncodingSpec) -> None:
    """Standardized error per group is at most half a quantization step (int4, per value) or
    its L2 norm (int4h: the rotation is orthonormal, so the rotated error's norm carries)."""
    rng = np.random.default_rng(0)
    x = synthetic_activations(rng, (6, 20, 256))
    mean, std = fit_calibration(x[:2])
    values, scale = encode_tokens(x, spec, mean, std)
    assert values.shape == (6, 20, 128) and values.dtype == np.uint8
    assert scale.shape == (6, 20, 2) and scale.dtype == np.float16
    decoded = decode_tokens(values, scale, spec, mean, std)
    gain = np.where(int4.negative_first_scale(scale)[..., None], fallback_gain(std), std)
    err = (decoded - x) / gain  # standardized error
    step = np.repeat(np.abs(scale).astype(np.float32), int4.INT4_GROUP, axis=-1)
    if spec.name == "int4":
        assert (np.abs(err) <= step / 2 * (1 + 1e-3) + 1e-5).all()
    else:
        bound = np.sqrt((step**2 / 4).sum(-1))
        assert (np.linalg.norm(err, axis=-1) <= bound * (1 + 1e-3) + 1e-5).all()
    assert np.percentile(_standardized_cosines(decoded, x), 1) > 0.98


def test_hadamard_is_orthonormal_and_its_own_inverse() -> None:
    rng = np.random.default_rng(1)
    for dim, block in ((1024, 1024), (768, 256), (120, 8), (33, 1), (2, 2)):
        assert int4.hadamard_block(dim) == block
        y = rng.standard_normal((5, dim)).astype(np.float32)
        h = int4.hadamard(y)
        np.testing.assert_allclose(np.linalg.norm(h, axis=-1), np.linalg.norm(y, axis=-1),
                                   rtol=1e-5)
        np.testing.assert_allclose(int4.hadamard(h), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", INT4_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(3, 5, 1), (4, 7), (2, 9, 33), (3, 130), (1, 4, 120),
                                   (2, 3, 1024)])
def test_torch_decode_is_bit_identical(spec: EncodingSpec, shape: tuple[int, ...]) -> None:
    """Odd widths (an odd D pads one nibble, a D past a group leaves a short last group), cls
    shapes [B, D], fallback tokens and tokens equal to the mean all decode alike."""
    rng = np.random.default_rng(sum(shape))
    x = synthetic_activations(rng, shape)
    mean, std = fit_calibration(x)
    flat = x.reshape(-1, shape[-1])
    flat[0] = mean  # a token at the mean: every scale 0
    flat[-1, 0] += 1e4 * std[0]  # outside the calibrated range: a fallback token
    values, scale = encode_tokens(x, spec, mean, std)
    assert int4.negative_first_scale(scale).reshape(-1)[-1]
    numpy_out = decode_tokens(values, scale, spec, mean, std)
    torch_out = _torch_decode(values, scale, spec, mean, std)
    np.testing.assert_array_equal(numpy_out.view(np.uint32), torch_out.view(np.uint32))
    np.testing.assert_array_equal(numpy_out.reshape(-1, shape[-1])[0], mean)
    # The training batch collates the scales as float32 (train/batch.py): same bits out.
    batch_out = _torch_decode(values, scale.astype(np.float32), spec, mean, std)
    np.testing.assert_array_equal(numpy_out.view(np.uint32), batch_out.view(np.uint32))


@pytest.mark.parametrize("spec", [*INT4_SPECS, EncodingSpec("int8")], ids=lambda s: s.name)
def test_a_channel_constant_in_the_calibration_stays_bounded(spec: EncodingSpec) -> None:
    """The issue's failure mode: a channel constant across the calibration tokens varies later.
    The fallback keeps int8's 1st-percentile cosine (standardized, as the loss sees it) at
    0.999 or above (0.9989 with a fallback bound of 32), and int4's within 0.02 of what it
    reaches with an honest calibration (0.71 with a bound of 32: about 2% of the tokens lose
    their whole group)."""
    rng = np.random.default_rng(2)
    x = synthetic_activations(rng, (40, 16, 64))
    calib = x[:8].copy()
    honest = fit_calibration(calib)
    calib[..., 5] = calib[..., 5].mean()
    broken = fit_calibration(calib)
    p01 = {}
    for label, (mean, std) in (("honest", honest), ("broken", broken)):
        decoded = decode_tokens(*encode_tokens(x, spec, mean, std), spec, mean, std)
        p01[label] = float(np.percentile(_standardized_cosines(decoded, x), 1))
    if spec.name == "int8":
        assert p01["broken"] >= 0.999
    else:
        assert p01["broken"] >= p01["honest"] - 0.02


def test_bytes_per_sample_of_a_vit_l_at_448_px() -> None:
    """1024 patch tokens + cls of D = 1024, with each record's crc32c: int4 is under 0.55 MB."""
    got = {name: bytes_per_sample(EncodingSpec(name), 1024, 1024)
           for name in ("fp16", "bf16", "int8", "int4", "int4h")}
    assert got == {"fp16": 1025 * 2048 + 4, "bf16": 1025 * 2048 + 4,
                   "int8": 1025 * (1024 + 4) + 4, "int4": 1025 * (512 + 16) + 4,
                   "int4h": 1025 * (512 + 16) + 4}
    assert got["int4"] <= 0.55e6


def test_an_unknown_encoding_name_is_refused_with_an_upgrade_hint() -> None:
    with pytest.raises(ConfigError, match="encoding.name.*'int3'") as err:
        EncodingSpec("int3")
    assert "upgrade" in err.value.hint
    stored = tiny_manifest(EncodingSpec("int4h")).to_dict()
    assert Manifest.from_dict(stored).encoding == EncodingSpec("int4h")
    stored["encoding"]["name"] = "int3"
    with pytest.raises(CacheVersionError, match="manifest.encoding.name is 'int3'") as err:
        Manifest.from_dict(stored, where="/c")
    assert "upgrade dune-distill" in err.value.hint
