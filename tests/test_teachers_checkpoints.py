"""Checkpoint loaders: the real checkpoints' key names and shapes, both file formats, key reports.

The synthetic state dicts below are written from the released files' layouts (not from our
modules): DINOv2 `dinov2_vitl14_reg4_pretrain.pth`, Multi-HMR `multiHMR_672_L.pt`
(`model_state_dict` + `args`), MASt3R `MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth`
(`model` + `args`, decoders and heads included). Tiny dims keep the loads fast; the full ViT-L
shapes are checked on the meta device, where no memory is allocated.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cache_format.errors import CheckpointError
from precompute.teachers.checkpoints import MappedState, compare_keys, sha256_file
from precompute.teachers.config import TeacherConfig
from precompute.teachers.croco import CrocoEncoder
from precompute.teachers.loaded import load_teacher
from precompute.teachers.mast3r import map_mast3r_keys
from precompute.teachers.multihmr import map_multihmr_keys
from precompute.teachers.vit_dinov2 import create_dinov2_vit, map_dinov2_keys

Shapes = dict[str, tuple[int, ...]]
DIM, DEPTH, HEADS = 32, 2, 2


# --- the released files' layouts ---------------------------------------------------------------


def dinov2_original_shapes(
    dim: int, depth: int, reg: int, grid: int = 37, chunked: bool = False
) -> Shapes:
    """Keys of a facebookresearch/dinov2 `*_pretrain.pth` (ViT with LayerScale, mlp ratio 4)."""
    shapes: Shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, grid * grid + 1, dim),  # the cls entry comes first
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
    }
    if reg:
        shapes["register_tokens"] = (1, reg, dim)
    for i in range(depth):
        block = f"blocks.0.{i}." if chunked else f"blocks.{i}."
        for name, shape in {
            "norm1.weight": (dim,), "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
            "ls1.gamma": (dim,),
            "norm2.weight": (dim,), "norm2.bias": (dim,),
            "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
            "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,),
            "ls2.gamma": (dim,),
        }.items():  # fmt: skip
            shapes[block + name] = shape
    shapes["norm.weight"] = shapes["norm.bias"] = (dim,)
    return shapes


def multihmr_shapes(dim: int, depth: int) -> Shapes:
    """`model_state_dict` of a Multi-HMR checkpoint: hub DINOv2 backbone (no registers) + heads."""
    shapes = {
        f"backbone.encoder.{k}": v for k, v in dinov2_original_shapes(dim, depth, reg=0).items()
    }
    shapes.update({
        "mlp_classif.0.weight": (dim, dim), "mlp_classif.2.weight": (1, dim),
        "mlp_offset.0.weight": (dim, dim),
        "x_attention_head.transformer.layers.0.0.fn.to_qkv.weight": (3 * dim, dim),
    })  # fmt: skip
    return shapes


def mast3r_shapes(dim: int, depth: int, dec_dim: int = 16) -> Shapes:
    """`model` of a MASt3R checkpoint: CroCo encoder, two decoders, two heads."""
    shapes: Shapes = {"patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        for name, shape in {
            "norm1.weight": (dim,), "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
            "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
            "norm2.weight": (dim,), "norm2.bias": (dim,),
            "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
            "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,),
        }.items():  # fmt: skip
            shapes[f"enc_blocks.{i}.{name}"] = shape
    shapes["enc_norm.weight"] = shapes["enc_norm.bias"] = (dim,)
    shapes.update({
        "decoder_embed.weight": (dec_dim, dim), "decoder_embed.bias": (dec_dim,),
        "dec_blocks.0.attn.qkv.weight": (3 * dec_dim, dec_dim),
        "dec_blocks.0.cross_attn.projq.weight": (dec_dim, dec_dim),
        "dec_blocks2.0.norm_y.weight": (dec_dim,),
        "dec_norm.weight": (dec_dim,),
        "downstream_head1.dpt.head.0.weight": (dec_dim, dec_dim, 3, 3),
        "downstream_head2.head_local_features.fc1.weight": (4 * dec_dim, dim + dec_dim),
    })  # fmt: skip
    return shapes


def materialize(shapes: Shapes, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    if device == "meta":
        return {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    generator = torch.Generator().manual_seed(seed)
    return {k: 0.1 * torch.randn(s, generator=generator) for k, s in shapes.items()}


def to_timm_format(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's layout of the same weights (what timm's hub files hold), written independently."""
    out = {k: v for k, v in original.items() if k not in ("mask_token", "register_tokens")}
    out["reg_token"] = original["register_tokens"]
    out["cls_token"] = original["cls_token"] + original["pos_embed"][:, :1]
    out["pos_embed"] = original["pos_embed"][:, 1:]
    return out


def args_namespace(**fields: object) -> argparse.Namespace:
    return argparse.Namespace(**fields)


def save(path: Path, obj: dict) -> str:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return str(path)


def load(kind: str, path: str, **fields: object) -> object:
    dims = {"embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS, **fields}
    return load_teacher(TeacherConfig(name="t", kind=kind, checkpoint=path, **dims))


def tokens(teacher: object, grid: tuple[int, int] = (3, 4)) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, *teacher.input_size(grid), generator=generator)
    return teacher.forward_tokens(x)


# --- each loader accepts its real layout ---------------------------------------------------------


def test_original_dinov2_checkpoint_loads_with_cls_position_folded(tmp_path: Path) -> None:
    state = materialize(dinov2_original_shapes(DIM, DEPTH, reg=4))
    path = save(tmp_path / "dinov2_vitl14_reg4_pretrain.pth", state)
    teacher = load("dino2reg_vitlarge_14", path)
    vit = teacher.module.vit
    assert torch.equal(vit.reg_token, state["register_tokens"])
    assert torch.equal(vit.cls_token, state["cls_token"] + state["pos_embed"][:, :1])
    assert torch.equal(vit.pos_embed, state["pos_embed"][:, 1:])
    assert torch.equal(vit.blocks[1].ls2.gamma, state["blocks.1.ls2.gamma"])
    assert teacher.checkpoint_sha256 == sha256_file(path)
    assert "pos=37x37" in teacher.arch


def test_original_timm_and_chunked_layouts_give_identical_tokens(tmp_path: Path) -> None:
    original = materialize(dinov2_original_shapes(DIM, DEPTH, reg=4))
    chunked = {k.replace("blocks.", "blocks.0.", 1): v for k, v in original.items()}
    reference = tokens(load("dino2reg_vitlarge_14", save(tmp_path / "a.pth", original)))
    for name, state in [("b.safetensors", to_timm_format(original)), ("c.pth", chunked)]:
        other = tokens(load("dino2reg_vitlarge_14", save(tmp_path / name, state)))
        assert torch.equal(other["cls"], reference["cls"])
        assert torch.equal(other["patch"], reference["patch"])


def test_pth_and_safetensors_load_the_same_weights(tmp_path: Path) -> None:
    state = materialize(mast3r_shapes(DIM, DEPTH))
    pth = save(tmp_path / "mast3r.pth", {"model": state, "args": args_namespace(model="MASt3R")})
    safetensors = save(tmp_path / "model.safetensors", state)
    a, b = load("mast3r_vitlarge_16", pth), load("mast3r_vitlarge_16", safetensors)
    assert torch.equal(tokens(a)["patch"], tokens(b)["patch"])
    assert a.checkpoint_sha256 == sha256_file(pth) != b.checkpoint_sha256


def test_mast3r_checkpoint_keeps_the_encoder_and_sets_aside_the_rest(tmp_path: Path) -> None:
    state = materialize(mast3r_shapes(DIM, DEPTH))
    args = args_namespace(model="AsymmetricMASt3R(enc_depth=2, pos_embed='RoPE100')", epoch=3)
    teacher = load("mast3r_vitlarge_16", save(tmp_path / "m.pth", {"model": state, "args": args}))
    encoder = teacher.module
    assert torch.equal(encoder.enc_blocks[1].mlp.fc2.weight, state["enc_blocks.1.mlp.fc2.weight"])
    assert torch.equal(encoder.enc_norm.bias, state["enc_norm.bias"])
    mapped = map_mast3r_keys(state, encoder)
    assert "decoder_embed.weight" in mapped.ignored and "dec_norm.weight" in mapped.ignored


def test_multihmr_checkpoint_loads_its_prefixed_backbone(tmp_path: Path) -> None:
    state = materialize(multihmr_shapes(DIM, DEPTH))
    saved = {
        "epoch": 7,
        "iter": 1000,
        "model_state_dict": state,
        "args": args_namespace(img_size=[672]),
    }
    teacher = load("multihmr_vitlarge_14_672", save(tmp_path / "multiHMR_672_L.pt", saved))
    vit = teacher.module.vit
    assert vit.reg_token is None and teacher.token_types == ("patch",)
    prefix = "backbone.encoder."
    assert torch.equal(vit.pos_embed, state[prefix + "pos_embed"][:, 1:])
    assert torch.equal(vit.blocks[0].attn.qkv.weight, state[prefix + "blocks.0.attn.qkv.weight"])
    assert set(tokens(teacher)) == {"patch"}


def test_a_checkpoint_position_grid_of_another_size_is_kept_and_interpolated(
    tmp_path: Path,
) -> None:
    state = materialize(dinov2_original_shapes(DIM, DEPTH, reg=4, grid=4))
    teacher = load("dino2reg_vitlarge_14", save(tmp_path / "small_grid.pth", state))
    assert teacher.module.vit.pos_embed.shape == (1, 16, DIM) and "pos=4x4" in teacher.arch
    assert tokens(teacher, grid=(5, 7))["patch"].shape == (2, 35, DIM)


def test_a_data_parallel_module_prefix_is_removed(tmp_path: Path) -> None:
    state = materialize(mast3r_shapes(DIM, DEPTH))
    path = save(tmp_path / "ddp.pth", {"model": {f"module.{k}": v for k, v in state.items()}})
    teacher = load("mast3r_vitlarge_16", path)
    assert torch.equal(teacher.module.enc_norm.weight, state["enc_norm.weight"])


# --- what does not fit is listed by name -------------------------------------------------------


@dataclass(frozen=True)
class Case:
    kind: str
    shapes: Callable[[], Shapes]
    wrap: Callable[[dict], dict]
    drop: str  # a key removed from the file: reported missing
    add: str  # a key added to the file: reported unexpected


CASES = [
    Case("dino2reg_vitlarge_14", lambda: dinov2_original_shapes(DIM, DEPTH, 4), lambda s: s,
         "blocks.1.mlp.fc2.weight", "blocks.1.attn.q_norm.weight"),
    Case("multihmr_vitlarge_14_672", lambda: multihmr_shapes(DIM, DEPTH),
         lambda s: {"model_state_dict": s}, "backbone.encoder.norm.bias",
         "backbone.encoder.blocks.0.attn.rope.freqs"),
    Case("mast3r_vitlarge_16", lambda: mast3r_shapes(DIM, DEPTH), lambda s: {"model": s},
         "enc_blocks.0.attn.qkv.bias", "enc_blocks.2.norm1.weight"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.kind)
def test_missing_and_unexpected_keys_are_listed_by_name(case: Case, tmp_path: Path) -> None:
    state = materialize(case.shapes())
    state.pop(case.drop)
    state[case.add] = torch.zeros(DIM)
    path = save(tmp_path / "bad.pth", case.wrap(state))
    with pytest.raises(CheckpointError) as err:
        load(case.kind, path)
    message = str(err.value)
    assert "bad.pth" in message
    assert f"1 missing key(s): {case.drop}" in message
    assert f"1 unexpected key(s): {case.add}" in message


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.kind)
def test_shapes_that_do_not_fit_the_overrides_are_listed(case: Case, tmp_path: Path) -> None:
    path = save(tmp_path / "dim32.safetensors", materialize(case.shapes()))
    with pytest.raises(
        CheckpointError, match=r"shape mismatch\(es\): .*expected \(48,\) found \(32,\)"
    ):
        load(case.kind, path, embed_dim=48)


def test_a_checkpoint_of_another_teacher_is_refused_with_both_lists(tmp_path: Path) -> None:
    mast3r_file = save(tmp_path / "mast3r.pth", {"model": materialize(mast3r_shapes(DIM, DEPTH))})
    with pytest.raises(CheckpointError) as err:
        load("dino2reg_vitlarge_14", mast3r_file)
    message = str(err.value)
    assert "33 missing key(s): cls_token, pos_embed, register_tokens, norm.bias" in message
    assert "34 unexpected key(s): dec_norm.weight" in message and "enc_norm.weight" in message
    assert "patch_embed.proj.weight expected (32, 3, 14, 14) found (32, 3, 16, 16)" in message
    dinov2_file = save(tmp_path / "dinov2.pth", materialize(dinov2_original_shapes(DIM, DEPTH, 4)))
    with pytest.raises(CheckpointError, match="no key starts with 'backbone.encoder.'"):
        load("multihmr_vitlarge_14_672", dinov2_file)
    no_encoder = r"26 missing key\(s\): enc_norm\.bias, enc_norm\.weight"
    with pytest.raises(CheckpointError, match=no_encoder):
        load("mast3r_vitlarge_16", dinov2_file)


def test_long_key_lists_are_cut_but_counted(tmp_path: Path) -> None:
    path = save(tmp_path / "deep.pth", materialize(dinov2_original_shapes(DIM, 6, reg=4)))
    with pytest.raises(CheckpointError, match=r"56 unexpected key\(s\): .*\(36 more\)"):
        load("dino2reg_vitlarge_14", path, depth=2)


def test_pickles_that_are_not_plain_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"model": materialize(mast3r_shapes(DIM, DEPTH)), "hook": CroCoFake()}, path)
    refused = r"cannot read .* as a weights-only checkpoint \(it needs [\w.]*CroCoFake\)"
    with pytest.raises(CheckpointError, match=refused):
        load("mast3r_vitlarge_16", str(path))


class CroCoFake:
    """An arbitrary class: the weights-only unpickler must not rebuild it."""


# --- the real ViT-L shapes, on the meta device ----------------------------------------------------


def _meta_croco() -> torch.nn.Module:
    with torch.device("meta"):
        return CrocoEncoder(embed_dim=1024, depth=24, num_heads=16)


def _meta_dinov2(reg: int) -> torch.nn.Module:
    with torch.device("meta"):
        return create_dinov2_vit(embed_dim=1024, depth=24, num_heads=16, reg_tokens=reg)


@pytest.mark.parametrize(
    ("name", "state", "target", "mapper"),
    [
        ("dinov2_vitl14_reg4_pretrain.pth", lambda: dinov2_original_shapes(1024, 24, 4),
         lambda: _meta_dinov2(4), map_dinov2_keys),
        ("timm vit_large_patch14_reg4_dinov2", lambda: {
            k: tuple(v.shape) for k, v in to_timm_format(
                materialize(dinov2_original_shapes(1024, 24, 4), device="meta")).items()},
         lambda: _meta_dinov2(4), map_dinov2_keys),
        ("multiHMR_672_L.pt", lambda: multihmr_shapes(1024, 24),
         lambda: _meta_dinov2(0), map_multihmr_keys),
        ("MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth",
         lambda: mast3r_shapes(1024, 24, dec_dim=768),
         lambda: _meta_croco(), map_mast3r_keys),
    ],
    ids=["dinov2-original", "dinov2-timm", "multihmr", "mast3r"],
)  # fmt: skip
def test_full_size_layouts_fit_the_full_size_modules(
    name: str,
    state: Callable[[], Shapes],
    target: Callable[[], torch.nn.Module],
    mapper: Callable[[dict, torch.nn.Module], MappedState],
) -> None:
    module = target()
    mapped = mapper(materialize(state(), device="meta"), module)
    report = compare_keys(mapped, module.state_dict())
    assert report.ok, f"{name}: {report.describe()}"
    assert sum(v.numel() for v in mapped.tensors.values()) > 300_000_000  # a ViT-L: ~304 M


def test_half_precision_files_give_float32_teachers(tmp_path: Path) -> None:
    state = materialize(mast3r_shapes(DIM, DEPTH))
    half = {k: v.half() for k, v in state.items()}
    teacher = load("mast3r_vitlarge_16", save(tmp_path / "model_fp16.safetensors", half))
    weight = teacher.module.enc_blocks[0].attn.qkv.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, state["enc_blocks.0.attn.qkv.weight"].half().float())
    assert not any(p.is_meta for p in teacher.module.parameters())
