"""Encoders: a released-DUNE-layout checkpoint against an independent forward, the student's
export and run folders, registered teachers."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cache_format.errors import ConfigError
from cache_format.serde import to_dict
from heads.encoders import load_encoder, load_encoders
from train.projectors import build_projector
from train.student import StudentConfig, build_student, timm_kwargs

DIM, DEPTH, HEADS, REG, PATCH, IMAGE = 48, 2, 6, 4, 14, 56  # vit_small has 6 heads
TEACHER = "dino2reg_vitlarge_14"


def _block(prefix: str, dim: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape: int, s: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    return {
        f"{prefix}norm1.weight": 1 + r(dim), f"{prefix}norm1.bias": r(dim),
        f"{prefix}attn.qkv.weight": r(3 * dim, dim), f"{prefix}attn.qkv.bias": r(3 * dim),
        f"{prefix}attn.proj.weight": r(dim, dim), f"{prefix}attn.proj.bias": r(dim),
        f"{prefix}ls1.gamma": r(dim, s=0.5), f"{prefix}norm2.weight": 1 + r(dim),
        f"{prefix}norm2.bias": r(dim), f"{prefix}mlp.fc1.weight": r(4 * dim, dim),
        f"{prefix}mlp.fc1.bias": r(4 * dim), f"{prefix}mlp.fc2.weight": r(dim, 4 * dim),
        f"{prefix}mlp.fc2.bias": r(dim), f"{prefix}ls2.gamma": r(dim, s=0.5),
    }


def write_dune_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """naver/dune's layout: {"model": encoder.* (chunked blocks), projectors.*, teacher_norms.*,
    "args": argparse.Namespace}, tiny sizes."""
    g = torch.Generator().manual_seed(0)
    grid = IMAGE // PATCH
    model = {
        "encoder.cls_token": torch.randn(1, 1, DIM, generator=g),
        "encoder.pos_embed": torch.randn(1, 1 + grid * grid, DIM, generator=g),
        "encoder.register_tokens": torch.randn(1, REG, DIM, generator=g),
        "encoder.mask_token": torch.zeros(1, DIM),
        "encoder.patch_embed.proj.weight": torch.randn(DIM, 3, PATCH, PATCH, generator=g) * 0.05,
        "encoder.patch_embed.proj.bias": torch.randn(DIM, generator=g) * 0.1,
        "encoder.norm.weight": torch.ones(DIM), "encoder.norm.bias": torch.zeros(DIM),
    }
    for i in range(DEPTH):
        model.update(_block(f"encoder.blocks.0.{i}.", DIM, g))
    model.update(_block(f"projectors.{TEACHER}.blocks.0.", DIM, g))
    model[f"projectors.{TEACHER}.linear.weight"] = torch.randn(40, DIM, generator=g) * 0.1
    model[f"projectors.{TEACHER}.linear.bias"] = torch.randn(40, generator=g) * 0.1
    for tok in ("cls", "patch"):
        model[f"teacher_norms.{TEACHER}.normalizers.{tok}.mean"] = torch.zeros(40)
        model[f"teacher_norms.{TEACHER}.normalizers.{tok}.std"] = torch.ones(40)
    args = argparse.Namespace(
        image_size=IMAGE, teachers=[TEACHER], enc_args={"arch": "vit_small", "patch_size": PATCH,
                                                         "num_register_tokens": REG,
                                                         "layerscale_init": 1e-4},
        proj_args={"num_blocks": 1, "scale": 1.0})
    torch.save({"model": model, "args": args, "iter": 10}, path)
    return model


def reference_forward(model: dict[str, torch.Tensor], x: torch.Tensor,
                      teacher: str | None) -> torch.Tensor:
    """Written from the method's description: DINOv2 ViT with registers, pos interpolated with
    scale factor (g + 0.1) / M, no final norm, [cls; patches]; then the projector."""
    e = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
    b, gh, gw = x.shape[0], x.shape[2] // PATCH, x.shape[3] // PATCH
    tokens = F.conv2d(x, e["patch_embed.proj.weight"], e["patch_embed.proj.bias"], stride=PATCH)
    tokens = tokens.flatten(2).transpose(1, 2)
    pos = e["pos_embed"]
    m = math.isqrt(pos.shape[1] - 1)
    grid_pos = pos[:, 1:].reshape(1, m, m, DIM).permute(0, 3, 1, 2)
    if (gh, gw) != (m, m):
        grid_pos = F.interpolate(grid_pos, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m),
                                 mode="bicubic", antialias=False)
    tokens = tokens + grid_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, DIM)
    cls = e["cls_token"] + pos[:, :1]
    seq = torch.cat([cls.expand(b, -1, -1), e["register_tokens"].expand(b, -1, -1), tokens], 1)

    def block(seq: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        h = F.layer_norm(seq, (DIM,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"])
        q, k, v = qkv.reshape(b, -1, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS), -1) @ v
        att = F.linear(att.transpose(1, 2).reshape(b, -1, DIM), p["attn.proj.weight"],
                       p["attn.proj.bias"])
        seq = seq + p["ls1.gamma"] * att
        h = F.layer_norm(seq, (DIM,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
                     p["mlp.fc2.weight"], p["mlp.fc2.bias"])
        return seq + p["ls2.gamma"] * h

    def params(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}

    for i in range(DEPTH):
        seq = block(seq, params(f"encoder.blocks.0.{i}."))
    out = torch.cat([seq[:, :1], seq[:, 1 + REG:]], 1)
    if teacher is not None:
        out = block(out, params(f"projectors.{teacher}.blocks.0."))
        p = params(f"projectors.{teacher}.linear.")
        out = F.linear(out, p["weight"], p["bias"])
    return out


@pytest.mark.parametrize("teacher", [None, TEACHER])
def test_dune_checkpoint_matches_the_reference_forward(tmp_path: Path,
                                                        teacher: str | None) -> None:
    path = tmp_path / "dune_tiny.pth"
    model = write_dune_checkpoint(path)
    spec = f"dune:{path}" + (f"@{teacher}" if teacher else "")
    encoder = load_encoder(spec)
    x = torch.randn(2, 3, 5 * PATCH, 6 * PATCH, generator=torch.Generator().manual_seed(1))
    got = encoder.forward_tokens(x)  # grid 5x6 != stored 4x4: the interpolation matters
    want = reference_forward(model, x, teacher)
    torch.testing.assert_close(got["cls"], want[:, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["patch"], want[:, 1:], atol=1e-4, rtol=1e-4)
    assert encoder.dim == (40 if teacher else DIM) and encoder.patch_size == PATCH


def test_dune_checkpoint_unknown_projector_lists_the_names(tmp_path: Path) -> None:
    write_dune_checkpoint(tmp_path / "d.pth")
    with pytest.raises(ConfigError, match=TEACHER):
        load_encoder(f"dune:{tmp_path / 'd.pth'}@mast3r")
    # a unique prefix of a projector name picks it
    assert load_encoder(f"dune:{tmp_path / 'd.pth'}@dino2reg").spec.endswith(f"@{TEACHER}")


def _student_state(tmp_path: Path) -> tuple[dict, dict, dict[str, torch.Tensor], object, object]:
    torch.manual_seed(0)
    cfg = StudentConfig(arch="vit_small_patch14_reg4_dinov2", img_size=56, embed_dim=32,
                        depth=1, num_heads=2)
    student = build_student(cfg)
    projector = build_projector("tp", 32, 24, n_blocks=1, num_heads=2)
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state.update({f"projectors.dinov2.{k}": v for k, v in projector.state_dict().items()})
    config = {"student": to_dict(cfg), "projector": {"kind": "tp", "n_blocks": 1}}
    heads = {"dinov2": {"dim": 24, "has_cls": True}}
    return config, heads, state, student.eval(), projector.eval()


def test_student_from_export_and_run_folders_gives_the_distilled_tokens(tmp_path: Path) -> None:
    config, heads, state, student, projector = _student_state(tmp_path)
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(export / "full_model.safetensors"))
    (export / "full_model.json").write_text(json.dumps({"config": config, "teachers": heads}))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    (run / "teachers.json").write_text(json.dumps({"heads": heads}))
    torch.save({"model": state, "step": 7}, run / "checkpoints" / "last.pt")
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        own = student.forward_tokens(x)
        through = projector(own)
    for where in (export, run, run / "checkpoints" / "last.pt"):
        enc = load_encoder(f"student:{where}")
        torch.testing.assert_close(enc.forward_tokens(x)["patch"], own[:, 1:])
        enc = load_encoder(f"student:{where}@dinov2")
        out = enc.forward_tokens(x)
        torch.testing.assert_close(out["cls"], through[:, 0])
        torch.testing.assert_close(out["patch"], through[:, 1:])
        assert enc.name == "student-dinov2" and enc.dim == 24
    with pytest.raises(ConfigError, match="dinov2"):
        load_encoder(f"student:{export}@mast3r")
    # the student-only export (student.json + student.safetensors: a bare timm ViT)
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k: v.contiguous() for k, v in student.vit.state_dict().items()},
              str(bare / "student.safetensors"))
    (bare / "student.json").write_text(json.dumps({
        "architecture": "vit_small_patch14_reg4_dinov2",
        "model_args": timm_kwargs(StudentConfig(**config["student"]))}))
    torch.testing.assert_close(load_encoder(f"student:{bare}").forward_tokens(x)["cls"],
                               own[:, 0])


def test_any_timm_vit_is_an_encoder() -> None:
    encoder = load_encoder("timm:test_vit")
    tokens = encoder.forward_tokens(torch.zeros(2, 3, *encoder.input_size((3, 5))))
    assert tokens["patch"].shape == (2, 15, encoder.dim) and tokens["cls"].shape == (2, encoder.dim)


def test_teachers_of_a_build_config_load_as_the_build_loads_them(tmp_path: Path) -> None:
    from train.demo import DemoSizes, cache_config, to_toml

    sizes = DemoSizes(teacher_dims=(32, 48, 64), teacher_depth=1)
    (tmp_path / "cache.toml").write_text(to_toml(cache_config(sizes, [
        {"name": "d", "kind": "folder", "root": "data", "domain": "2d"}])))
    encoders = load_encoders(f"teacher:*@{tmp_path / 'cache.toml'}")
    assert [e.name for e in encoders] == ["dinov2", "mast3r", "multihmr"]
    assert [e.dim for e in encoders] == [32, 48, 64]
    assert encoders[1].patch_size == 16 and not encoders[1].has_cls
    with pytest.raises(ConfigError, match="no teacher 'clip'"):
        load_encoders(f"teacher:clip@{tmp_path / 'cache.toml'}")
    with pytest.raises(ConfigError, match="expected one of"):
        load_encoders("nonsense")
