"""naver/dune's checkpoint layout: our export reads back with equal outputs, its keys and shapes
are those of a module tree built with the reference's attribute names, and `init_from` takes it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from cache_format.errors import CheckpointError
from train.config import ProjectorConfig, TrainConfig
from train.dune_format import (
    EXTRAS_KEY,
    load_dune_checkpoint,
    model_from_dune,
    save_dune_checkpoint,
    to_dune_checkpoint,
)
from train.init_from import init_model_from
from train.model import DistillModel, TeacherHead
from train.student import StudentConfig

WIDTH, DEPTH, HEADS, IMG = 32, 2, 2, 56
TEACHERS = {
    "dino2reg_vitlarge_14": TeacherHead(dim=48, has_cls=True),
    "mast3r_vitlarge_16": TeacherHead(dim=40, has_cls=False),
}


def tiny_cfg(img_size: int = IMG, n_blocks: int = 1) -> TrainConfig:
    student = StudentConfig(
        arch="vit_small_patch14_reg4_dinov2", img_size=img_size, embed_dim=WIDTH, depth=DEPTH,
        num_heads=HEADS,
    )
    return TrainConfig(student=student, projector=ProjectorConfig(n_blocks=n_blocks))


def trained_like(cfg: TrainConfig, seed: int = 0) -> DistillModel:
    """A tiny model whose every parameter and norm buffer is random (no zero cls / LayerScale)."""
    torch.manual_seed(seed)
    model = DistillModel(cfg, TEACHERS)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        for teacher, head in TEACHERS.items():
            for tok in head.token_types:
                stats = torch.randn(head.dim), torch.rand(head.dim) + 0.5
                model.norms[teacher][tok].set_stats(*stats)
    return model.eval()


def exported(tmp_path: Path, model: DistillModel, cfg: TrainConfig) -> Path:
    ckpt = to_dune_checkpoint(model, cfg, step=7)
    return save_dune_checkpoint(ckpt, tmp_path / "dune.pth")


def test_our_loader_reads_back_the_export_with_equal_outputs(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    model = trained_like(cfg)
    path = exported(tmp_path, model, cfg)
    back = model_from_dune(path)
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want, got = model(images), back(images)
    for teacher in TEACHERS:
        assert want[teacher].keys() == got[teacher].keys()
        for tok in want[teacher]:
            torch.testing.assert_close(got[teacher][tok], want[teacher][tok], rtol=0, atol=1e-6)
        for tok, norm in model.norms[teacher].items():
            assert torch.equal(back.norms[teacher][tok].mean, norm.mean)
            assert torch.equal(back.norms[teacher][tok].std, norm.std)
    assert back.teachers == TEACHERS
    assert load_dune_checkpoint(path).step == 7


def test_a_checkpoint_without_our_extras_loads_from_args_alone(tmp_path: Path) -> None:
    """A released checkpoint carries `model` and `args` only: the student comes from `args`."""
    cfg = tiny_cfg()
    model = trained_like(cfg)
    ckpt = to_dune_checkpoint(model, cfg)
    del ckpt[EXTRAS_KEY]
    path = save_dune_checkpoint(ckpt, tmp_path / "released.pth")
    back = model_from_dune(path)
    images = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        want, got = model(images), back(images)
    torch.testing.assert_close(got["dino2reg_vitlarge_14"]["patch"],
                               want["dino2reg_vitlarge_14"]["patch"], rtol=0, atol=1e-6)


# -- a module tree with the reference's attribute names (model/dune.py, encoder, projector) --
# The forwards follow the reference's semantics (pre-norm blocks with LayerScale; the cls
# token gets position slot 0, registers are inserted after the position embeddings; the
# encoder output is [cls; patches] of the last block without the final norm).
class RefLayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class RefAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = HEADS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), RefAttention(dim), RefLayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim), RefMlp(dim), RefLayerScale(dim)
        self.norm1.eps = self.norm2.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RefPatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class RefEncoder(nn.Module):
    """DinoVisionTransformer with its default block_chunks=1: blocks.0.<i>.*"""

    def __init__(self, dim: int, depth: int, image_size: int, patch: int, registers: int) -> None:
        super().__init__()
        patches = (image_size // patch) ** 2
        self.patch_embed = RefPatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))
        self.blocks = nn.ModuleList([nn.ModuleList([RefBlock(dim) for _ in range(depth)])])
        self.norm = nn.LayerNorm(dim)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        registers = self.register_tokens.expand(len(x), -1, -1)
        x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        for block in self.blocks[0]:
            x = block(x)
        return torch.cat([x[:, :1], x[:, 1 + registers.shape[1]:]], dim=1)


class RefProjector(nn.Module):
    def __init__(self, dim: int, out: int, n_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([RefBlock(dim) for _ in range(n_blocks)])
        self.linear = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.linear(x)


class RefNormalizer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))


class RefTeacherNorm(nn.Module):
    def __init__(self, token_types: tuple[str, ...], dim: int) -> None:
        super().__init__()
        self.normalizers = nn.ModuleDict({t: RefNormalizer(dim) for t in token_types})


class RefDune(nn.Module):
    def __init__(self, args: argparse.Namespace, teachers: dict[str, TeacherHead]) -> None:
        super().__init__()
        enc = args.enc_args
        self.encoder = RefEncoder(
            enc["embed_dim"], enc["depth"], args.image_size, enc["patch_size"],
            enc["num_register_tokens"],
        )
        self.projectors = nn.ModuleDict({
            t: RefProjector(enc["embed_dim"], teachers[t].dim, args.proj_args["num_blocks"])
            for t in args.teachers
        })
        self.teacher_norms = nn.ModuleDict({
            t: RefTeacherNorm(teachers[t].token_types, teachers[t].dim) for t in args.teachers
        })


def test_keys_and_shapes_match_the_reference_module_tree(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    raw = torch.load(exported(tmp_path, trained_like(cfg), cfg), weights_only=False)
    args = raw["args"]
    assert isinstance(args, argparse.Namespace)  # the reference reads args.image_size
    assert args.image_size == IMG and args.teachers == sorted(TEACHERS)
    assert args.enc_args["patch_size"] == 14 and args.enc_args["num_register_tokens"] == 4
    assert args.proj_args["num_blocks"] == 1 and args.proj_args["num_heads"] == HEADS
    reference = RefDune(args, TEACHERS)
    want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in raw["model"].items()}
    assert got == want
    reference.load_state_dict(raw["model"], strict=True)  # what the reference's loader does


def test_the_reference_forward_on_our_export_equals_ours(tmp_path: Path) -> None:
    """Checks the parameterisation changes: the cls slot, register order, block chunk."""
    cfg = tiny_cfg()
    model = trained_like(cfg)
    raw = torch.load(exported(tmp_path, model, cfg), weights_only=False)
    reference = RefDune(raw["args"], TEACHERS).eval()
    reference.load_state_dict(raw["model"], strict=True)
    images = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        tokens = reference.encoder(images)
        torch.testing.assert_close(tokens, model.student.forward_tokens(images))
        ours = model(images)
        for teacher in TEACHERS:
            torch.testing.assert_close(reference.projectors[teacher](tokens)[:, 1:],
                                       ours[teacher]["patch"])


def test_the_reference_names_its_sizes_and_only_ours_need_explicit_widths() -> None:
    base = StudentConfig(img_size=56)  # ViT-B/14 with 4 registers, the reference's vit_base
    cfg = TrainConfig(student=base, projector=ProjectorConfig(kind="linear"))
    model = DistillModel(cfg, {"t": TeacherHead(dim=8, has_cls=True)})
    args = to_dune_checkpoint(model, cfg)["args"]
    assert args.enc_args["arch"] == "vit_base" and "embed_dim" not in args.enc_args
    assert args.proj_args["num_blocks"] == 0  # a linear projector is a TP without blocks
    mlp = TrainConfig(student=base, projector=ProjectorConfig(kind="mlp"))
    with pytest.raises(CheckpointError, match="Transformer Projectors"):
        to_dune_checkpoint(DistillModel(mlp, {"t": TeacherHead(dim=8, has_cls=True)}), mlp)


def test_init_from_a_dune_checkpoint_at_another_grid(tmp_path: Path) -> None:
    cfg = tiny_cfg()
    source = trained_like(cfg)
    path = exported(tmp_path, source, cfg)
    torch.manual_seed(1)
    heads = {"dino2reg_vitlarge_14": TEACHERS["dino2reg_vitlarge_14"],
             "other": TeacherHead(dim=40, has_cls=False)}
    target = DistillModel(tiny_cfg(img_size=84), heads)
    other_before = {k: v.clone() for k, v in target.projectors["other"].state_dict().items()}
    init_model_from(target, str(path))
    assert target.student.vit.pos_embed.shape[1] == (84 // 14) ** 2
    for key, value in source.student.vit.state_dict().items():
        if key not in ("pos_embed",):
            assert torch.equal(target.student.vit.state_dict()[key], value), key
    for key, value in source.projectors["dino2reg_vitlarge_14"].state_dict().items():
        assert torch.equal(target.projectors["dino2reg_vitlarge_14"].state_dict()[key], value)
    for key, value in target.projectors["other"].state_dict().items():
        assert torch.equal(value, other_before[key])  # no projector of that name: stays new


class NotAllowed:
    """A class weights_only=True refuses to unpickle (code could run through such a class)."""


def test_files_that_are_not_the_layout_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"blocks.0.x": torch.zeros(1)}}, plain)
    with pytest.raises(CheckpointError, match="not in the DUNE layout"):
        load_dune_checkpoint(plain)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "args": NotAllowed()}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_dune_checkpoint(unsafe)
