"""The student encoder: [cls; patches] of the last block, registers dropped, no final norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cache_format.errors import CheckpointError, ConfigError, RegistryError
from cache_format.serde import from_dict, to_dict
from train.student import Student, StudentConfig, build_student, interpolate_pos_embed

TINY = {"arch": "vit_small_patch14_reg4_dinov2", "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_student(img_size: int = 56, seed: int = 0) -> Student:
    torch.manual_seed(seed)
    return build_student(StudentConfig(img_size=img_size, **TINY)).eval()


def randomize(student: Student, seed: int = 1) -> Student:
    """Random LayerScale / pos-embed values, so that blocks and positions visibly matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in student.vit.named_parameters():
            if "gamma" in name or "pos_embed" in name or "token" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return student


def test_properties_of_the_tiny_student() -> None:
    student = tiny_student()
    assert student.patch_size == 14
    assert student.embed_dim == 32
    assert student.num_heads == 2
    assert student.grid == (4, 4)
    assert student.num_prefix_tokens == 5  # cls + 4 registers
    assert torch.allclose(student.vit.blocks[0].ls1.gamma, torch.full((32,), 1e-4))


def test_forward_tokens_drops_registers_and_is_not_final_normed() -> None:
    student = randomize(tiny_student())
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = student.forward_tokens(x)
        features = student.vit.forward_features(x)  # timm: blocks then the final norm
    assert tokens.shape == (2, 1 + 16, 32)
    without_registers = torch.cat([features[:, :1], features[:, 5:]], dim=1)
    # Applying the final norm to our tokens gives exactly timm's output minus the registers ...
    assert torch.allclose(student.vit.norm(tokens), without_registers, atol=1e-6)
    # ... and our tokens themselves are not that normed output.
    assert (tokens - without_registers).abs().max() > 1e-2
    assert torch.equal(student(x), tokens)


def test_forward_tokens_is_embed_positions_blocks_then_cls_and_patches_by_hand() -> None:
    """What `forward_tokens` takes from timm's `forward_intermediates`, computed by hand from the
    ViT's parts: patch embedding, positions on the patches, [cls; registers; patches], every
    block, no final norm, registers dropped. A timm release that changes any of it (prefix
    order, where positions go, an extra norm) fails here."""
    student = randomize(tiny_student())
    vit = student.vit
    # The by-hand forward below leaves these out: they must be identities in this student.
    assert isinstance(vit.patch_embed.norm, nn.Identity) and isinstance(vit.norm_pre, nn.Identity)
    assert vit.no_embed_class and vit.num_reg_tokens == 4  # DINOv2 style: positions on patches
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        proj = vit.patch_embed.proj
        patches = F.conv2d(x, proj.weight, proj.bias, stride=14).flatten(2).transpose(1, 2)
        patches = patches + vit.pos_embed
        prefix = [vit.cls_token.expand(2, -1, -1), vit.reg_token.expand(2, -1, -1)]
        tokens = torch.cat([*prefix, patches], dim=1)
        for block in vit.blocks:
            tokens = block(tokens)
        expected = torch.cat([tokens[:, :1], tokens[:, 5:]], dim=1)
        got = student.forward_tokens(x)
    assert got.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_dynamic_input_size_and_bad_sizes() -> None:
    student = tiny_student()
    assert student.forward_tokens(torch.randn(1, 3, 70, 56)).shape == (1, 1 + 5 * 4, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        student.forward_tokens(torch.randn(1, 3, 60, 56))


def test_gradient_reaches_every_trainable_parameter() -> None:
    student = tiny_student().train()
    student.forward_tokens(torch.randn(2, 3, 56, 56)).square().mean().backward()
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert "vit.norm.weight" not in trainable  # unused by the distilled output: frozen
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_grad_checkpointing_gives_the_same_tokens() -> None:
    student = randomize(tiny_student())
    x = torch.randn(1, 3, 56, 56)
    plain = student.forward_tokens(x)
    student.set_grad_checkpointing(True)
    assert torch.allclose(student.forward_tokens(x), plain, atol=1e-6)


def test_interpolated_checkpoint_matches_dynamic_resampling() -> None:
    """336 -> 448 in miniature: a 56 px checkpoint loaded into an 84 px student."""
    small = randomize(tiny_student(56))
    state = interpolate_pos_embed(small.vit.state_dict(), (6, 6))
    assert state["pos_embed"].shape == (1, 36, 32)
    assert small.vit.state_dict()["pos_embed"].shape == (1, 16, 32)  # input left untouched
    large = tiny_student(84, seed=5)
    large.vit.load_state_dict(state)
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        out = large.forward_tokens(x)
        expected = small.forward_tokens(x)  # timm resamples the 4x4 table on the fly
    assert out.shape == (2, 37, 32) and torch.isfinite(out).all()
    assert torch.allclose(out, expected, atol=1e-5)


def test_load_encoder_state_resizes_and_checks_keys() -> None:
    small = randomize(tiny_student(56))
    large = tiny_student(84, seed=5)
    large.load_encoder_state(small.state_dict())  # keys with the "vit." prefix
    x = torch.randn(1, 3, 84, 84)
    with torch.no_grad():
        assert torch.allclose(large(x), small(x), atol=1e-5)
    broken = {k: v for k, v in small.vit.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match="missing keys"):
        large.load_encoder_state(broken)


def test_interpolate_pos_embed_with_a_class_entry_and_errors() -> None:
    table = torch.randn(1, 1 + 16, 8)
    resized = interpolate_pos_embed({"encoder.pos_embed": table}, (3, 5))["encoder.pos_embed"]
    assert resized.shape == (1, 1 + 15, 8)
    assert torch.equal(resized[:, 0], table[:, 0])  # the class entry is carried over as is
    with pytest.raises(CheckpointError, match="no 'pos_embed'"):
        interpolate_pos_embed({"weight": table}, (3, 3))
    with pytest.raises(CheckpointError, match="not a square"):
        interpolate_pos_embed({"pos_embed": torch.randn(1, 7, 8)}, (3, 3))


def test_config_checks_and_round_trip() -> None:
    cfg = StudentConfig(img_size=56, **TINY)
    assert from_dict(StudentConfig, to_dict(cfg)) == cfg
    assert StudentConfig().arch == "vit_base_patch14_reg4_dinov2"
    with pytest.raises(ConfigError, match="student.img_size"):
        build_student(StudentConfig(img_size=60, **TINY))
    with pytest.raises(ConfigError, match="student.embed_dim"):
        StudentConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ConfigError, match="student.drop_path_rate"):
        StudentConfig(drop_path_rate=1.5)
    with pytest.raises(RegistryError, match="not a timm model"):
        build_student(StudentConfig(arch="vit_nonexistent_patch14"))


def test_students_without_a_class_token_are_refused() -> None:
    tiny_siglip = StudentConfig(
        arch="vit_base_patch16_siglip_224", img_size=32, embed_dim=32, depth=1, num_heads=2
    )
    with pytest.raises(ConfigError, match="no class token"):
        build_student(tiny_siglip)
