"""Projectors: shapes, the TP's near-linear start, token splitting, gradients."""

from __future__ import annotations

import pytest
import torch

from cache_format.errors import ConfigError
from train.projectors import (
    PROJECTOR_KINDS,
    LinearProjector,
    MLPProjector,
    TransformerProjector,
    build_projector,
    split_tokens,
)


@pytest.mark.parametrize("kind", PROJECTOR_KINDS)
def test_every_kind_maps_student_tokens_to_teacher_width(kind: str) -> None:
    torch.manual_seed(0)
    projector = build_projector(kind, 32, 48, n_blocks=2, num_heads=2)
    out = projector(torch.randn(3, 17, 32))
    assert out.shape == (3, 17, 48)
    assert torch.isfinite(out).all()


def test_build_projector_types_and_unknown_kind() -> None:
    assert isinstance(build_projector("tp", 32, 8), TransformerProjector)
    assert isinstance(build_projector("mlp", 32, 8), MLPProjector)
    assert isinstance(build_projector("linear", 32, 8), LinearProjector)
    with pytest.raises(ConfigError, match="projector.kind"):
        build_projector("conv", 32, 8)


def test_tp_structure_follows_the_reference() -> None:
    tp = TransformerProjector(64, 96)
    assert len(tp.blocks) == 1 and tp.num_heads == 1  # 64 channels per head by default
    block = tp.blocks[0]
    assert block.norm1.eps == 1e-6 and block.mlp.fc1.out_features == 4 * 64
    assert torch.allclose(block.ls1.gamma, torch.full((64,), 1e-4))
    # Blocks then the Linear, with no norm in between.
    assert [name for name, _ in tp.named_children()] == ["blocks", "linear"]
    assert TransformerProjector(768, 1024).num_heads == 12
    with pytest.raises(ConfigError, match="projector.num_heads"):
        TransformerProjector(32, 8, num_heads=3)


def test_tp_starts_near_its_linear_part() -> None:
    torch.manual_seed(0)
    tp = TransformerProjector(32, 48, n_blocks=2, num_heads=2)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        linear_only = tp.linear(x)
        relative = (tp(x) - linear_only).norm() / linear_only.norm()
    assert relative < 1e-3
    assert relative > 0  # the blocks do run
    zero_blocks = TransformerProjector(32, 48, n_blocks=0)
    assert torch.equal(zero_blocks(x), zero_blocks.linear(x))


def test_tp_with_full_layerscale_is_far_from_linear() -> None:
    """Guards the previous test: it would pass vacuously if blocks were skipped."""
    torch.manual_seed(0)
    tp = TransformerProjector(32, 48, num_heads=2, layerscale_init=1.0)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        assert (tp(x) - tp.linear(x)).norm() / tp.linear(x).norm() > 0.05


@pytest.mark.parametrize("kind", PROJECTOR_KINDS)
def test_gradient_reaches_every_parameter(kind: str) -> None:
    torch.manual_seed(0)
    projector = build_projector(kind, 32, 16, num_heads=2)
    x = torch.randn(2, 5, 32, requires_grad=True)
    projector(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in projector.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_split_tokens() -> None:
    y = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    parts = split_tokens(y, has_cls=True)
    assert torch.equal(parts["cls"], y[:, 0]) and torch.equal(parts["patch"], y[:, 1:])
    assert parts["cls"].shape == (2, 3) and parts["patch"].shape == (2, 4, 3)
    assert set(split_tokens(y, has_cls=False)) == {"patch"}
    with pytest.raises(ValueError, match="expected"):
        split_tokens(torch.zeros(2, 3))
