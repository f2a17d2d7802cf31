"""Our teachers against the reference implementations' own outputs (golden fixtures).

The fixtures hold numbers only: a tiny config, its weights, an input and the reference's output
tokens, produced once by running the reference code outside this project (see
tests/fixtures/README.md). Weights and inputs are fp16-representable values stored as fp16 and
run in fp32, which keeps the files small without changing a single bit of the computation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from precompute.teachers.config import TeacherConfig
from precompute.teachers.croco import CrocoEncoder
from precompute.teachers.loaded import load_teacher

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4  # fp32, max absolute difference


def read_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    with safe_open(str(FIXTURES / name), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key).float() for key in handle.keys()}
        metadata = handle.metadata()
    return tensors, json.loads(metadata["config"]), metadata["reference"]


def weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "name", ["mast3r_encoder_golden.safetensors", "dinov2_reg_golden.safetensors"]
)
def test_golden_fixtures_are_small_and_say_where_they_come_from(name: str) -> None:
    assert (FIXTURES / name).stat().st_size < 200_000
    _, config, reference = read_fixture(name)
    assert "naver/" in reference and config["depth"] == 2


def test_mast3r_encoder_matches_the_reference(tmp_path: Path) -> None:
    tensors, config, _ = read_fixture("mast3r_encoder_golden.safetensors")
    # through the real loading path: a checkpoint laid out like MASt3R's release
    checkpoint = tmp_path / "mast3r_tiny.pth"
    args = argparse.Namespace(model="AsymmetricMASt3R(pos_embed='RoPE100', ...)")
    torch.save({"model": weights(tensors), "args": args}, checkpoint)
    teacher = load_teacher(
        TeacherConfig(
            name="mast3r",
            kind="mast3r_vitlarge_16",
            checkpoint=str(checkpoint),
            embed_dim=config["embed_dim"],
            depth=config["depth"],
            num_heads=config["num_heads"],
        )
    )
    out = teacher.forward_tokens(tensors["input"])
    assert set(out) == {"patch"}
    assert max_diff(out["patch"], tensors["output"]) <= TOLERANCE


def test_the_mast3r_fixture_would_catch_a_wrong_rope() -> None:
    tensors, config, _ = read_fixture("mast3r_encoder_golden.safetensors")
    dims = {k: config[k] for k in ("embed_dim", "depth", "num_heads")}
    wrong = CrocoEncoder(patch_size=16, rope_base=10_000.0, **dims).eval()
    wrong.load_state_dict(weights(tensors))
    with torch.no_grad():
        out = wrong.forward_tokens(tensors["input"])["patch"]
    assert max_diff(out, tensors["output"]) > 100 * TOLERANCE


def test_dinov2_reg_matches_the_reference_at_an_interpolated_grid(tmp_path: Path) -> None:
    tensors, config, _ = read_fixture("dinov2_reg_golden.safetensors")
    checkpoint = tmp_path / "dinov2_tiny_reg4_pretrain.pth"  # the original release layout
    torch.save(weights(tensors), checkpoint)
    teacher = load_teacher(
        TeacherConfig(
            name="dinov2",
            kind="dino2reg_vitlarge_14",
            checkpoint=str(checkpoint),
            embed_dim=config["embed_dim"],
            depth=config["depth"],
            num_heads=config["num_heads"],
        )
    )
    # the fixture's 3 x 5 grid differs from the checkpoint's 4 x 4: positions are interpolated
    assert teacher.module.pos_grid == config["img_size"] // 14 == 4
    out = teacher.forward_tokens(tensors["input"])
    assert max_diff(out["cls"], tensors["cls"]) <= TOLERANCE
    assert max_diff(out["patch"], tensors["patch"]) <= TOLERANCE
    # timm's own interpolation (antialiased, exact size) would not match: why we do our own
    vit = teacher.module.vit
    vit.patch_embed.img_size, vit.patch_embed.grid_size = (56, 56), (4, 4)
    with torch.no_grad():
        timm_tokens = vit.forward_features(tensors["input"])[:, vit.num_prefix_tokens :]
    assert max_diff(timm_tokens, tensors["patch"]) > 10 * TOLERANCE
