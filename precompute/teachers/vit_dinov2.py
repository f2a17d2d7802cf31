"""DINOv2-style ViT teachers: DINOv2 ViT-L/14 with registers (and, through multihmr.py, Multi-HMR).

The architecture is timm's `vit_large_patch14_reg4_dinov2` (pos_embed on patches only, cls and
register tokens without position, LayerScale), built with `dynamic_img_size=True`. Its blocks and
norms are used as they are; `DinoV2Tokens.forward_tokens` does the embedding itself so that it
matches the reference teacher exactly:

- position embeddings are interpolated the way the DINOv2 code DUNE runs does it (bicubic, scale
  factor (g + 0.1) / M, no antialias), not timm's way (bicubic to the exact size, antialiased).
  At DUNE's grids (24 and 32 against the checkpoint's 37) the two differ, and the cache must hold
  what the reference teacher would have produced;
- outputs are the final-norm tokens. DUNE's teacher code (naver/dune teachers/forward.py)
  distills `x_norm_clstoken` / `x_norm_patchtokens` of `forward_features`, i.e. after the
  backbone's last LayerNorm (dune-facts: "each projector output is compared with that teacher's
  normalized tokens"; TeacherNorm then standardizes channels on top). Registers are dropped.

Two checkpoint formats load: the original DINOv2 release (`dinov2_vitl14_reg4_pretrain.pth`:
`cls_token`, `register_tokens`, `pos_embed` [1, 1 + 37*37, 1024] with a cls entry, `mask_token`,
`blocks.N.*` or chunked `blocks.C.N.*`) and timm's (`reg_token`, cls position folded into
`cls_token`, `pos_embed` [1, 37*37, D]). A checkpoint whose position grid differs from the model's
replaces the model's grid, and is then interpolated on the fly from its own size at every input
size (one interpolation from the trained grid, as in the reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cache_format.dinov2_keys import fold_cls_slot, holds_cls_slot, is_square, timm_key
from cache_format.errors import ConfigError
from cache_format.manifest import TOKEN_TYPES
from precompute.teachers.checkpoints import (
    MappedState,
    initial_weights,
    teacher_weights,
)
from precompute.teachers.config import TeacherConfig
from precompute.teachers.registry import BuiltTeacher, register_teacher
from precompute.teachers.specs import IMAGENET_MEAN, IMAGENET_STD

TIMM_DINOV2 = "vit_large_patch14_reg4_dinov2"
DINOV2_HUB = "vit_large_patch14_reg4_dinov2.lvd142m"
DINOV2_CHECKPOINT = "dinov2_vitl14_reg4_pretrain.pth"
DINOV2_IMG_SIZE = 518  # 37 x 14: the grid of the released position embeddings
INTERPOLATE_OFFSET = 0.1  # DINOv2's historical offset on the interpolation scale factor
_ORIGINAL_NAMES = {"reg_token": "register_tokens"}  # timm name -> DINOv2 release name


def interpolate_pos_dinov2(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch position embeddings [1, M*M, D] resampled to `grid`, as DINOv2 does it.

    Bicubic with scale factor (g + 0.1) / M per axis and no antialias: the same call the DINOv2
    code makes, so that tokens equal the reference teacher's at every grid.
    """
    count, dim = pos_embed.shape[1], pos_embed.shape[2]
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"pos_embed holds {count} patch positions, not a square grid")
    if grid == (side, side):
        return pos_embed
    square = pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((grid[0] + INTERPOLATE_OFFSET) / side, (grid[1] + INTERPOLATE_OFFSET) / side)
    resized = F.interpolate(square, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(resized.shape[-2:]) != grid:  # the offset exists to make floor() land on grid
        raise ValueError(f"interpolated grid {tuple(resized.shape[-2:])} != requested {grid}")
    return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)


class DinoV2Tokens(nn.Module):
    """A DINOv2-style timm ViT answering `forward_tokens` with final-norm cls / patch tokens."""

    def __init__(self, vit: nn.Module, token_types: tuple[str, ...]) -> None:
        super().__init__()
        self.vit = vit
        self.token_types = token_types
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.embed_dim = int(vit.embed_dim)

    @property
    def pos_grid(self) -> int:
        """Side of the stored (trained) position-embedding grid."""
        return math.isqrt(self.vit.pos_embed.shape[1])

    def forward_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Final-norm tokens of ImageNet-normalized images [B, 3, H, W], sides multiples of 14."""
        vit = self.vit
        batch = x.shape[0]
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        patches = vit.patch_embed(x).reshape(batch, grid[0] * grid[1], self.embed_dim)
        patches = patches + interpolate_pos_dinov2(vit.pos_embed, grid).to(patches.dtype)
        prefix = [vit.cls_token.expand(batch, -1, -1)]
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(batch, -1, -1))
        tokens = torch.cat([*prefix, patches], dim=1)
        tokens = vit.norm(vit.blocks(vit.norm_pre(tokens)))
        out = {"patch": tokens[:, vit.num_prefix_tokens :]}
        if "cls" in self.token_types:
            out["cls"] = tokens[:, 0]
        return out

    def extra_repr(self) -> str:
        return f"token_types={self.token_types}, pos_grid={self.pos_grid}"


def create_dinov2_vit(
    *, embed_dim: int, depth: int, num_heads: int, reg_tokens: int, hub_name: str | None = None
) -> nn.Module:
    """timm's DINOv2 ViT with overrides; hub weights when `hub_name` is given (online users)."""
    return timm.create_model(
        hub_name or TIMM_DINOV2,
        pretrained=hub_name is not None,
        dynamic_img_size=True,
        num_classes=0,
        img_size=DINOV2_IMG_SIZE,
        patch_size=14,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        reg_tokens=reg_tokens,
        no_embed_class=True,
        # LayerScale 1.0 (the reference's construction value) so random-init stand-ins have
        # blocks that matter; checkpoints overwrite it.
        init_values=1.0,
    )


def map_dinov2_keys(
    state: dict[str, torch.Tensor], target: nn.Module, *, file_prefix: str = ""
) -> MappedState:
    """Rename an original-DINOv2 or timm state dict to timm's names; adapt the position grid.

    `target` is the timm ViT. `file_prefix` is what the keys carried in the file (Multi-HMR's
    `backbone.encoder.`), used only to name keys in errors.
    """
    tensors: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in state.items():
        new = timm_key(key)
        if new is None:  # used only by DINOv2's masked-image training
            ignored.append(file_prefix + key)
            continue
        tensors[new] = value
        original[new] = file_prefix + key
    pos = tensors.get("pos_embed")
    if pos is not None and pos.ndim == 3 and "cls_token" in tensors:
        if holds_cls_slot(pos):
            tensors["cls_token"], tensors["pos_embed"] = fold_cls_slot(tensors["cls_token"], pos)
            pos = tensors["pos_embed"]
            original["cls_token"] = f"{file_prefix}cls_token (+ {file_prefix}pos_embed[:, 0])"
        stored = target.pos_embed
        if (
            is_square(pos.shape[1])
            and pos.shape[2] == stored.shape[2]
            and pos.shape[1] != stored.shape[1]
        ):
            # Keep the checkpoint's trained grid; forward_tokens interpolates from it.
            target.pos_embed = nn.Parameter(torch.zeros_like(pos, device=stored.device))
    timm_layout = "reg_token" in state

    def file_name(key: str) -> str:
        return file_prefix + (key if timm_layout else _ORIGINAL_NAMES.get(key, key))

    return MappedState(tensors, original, tuple(ignored), file_name)


def dinov2_arch(teacher: DinoV2Tokens, depth: int, num_heads: int) -> str:
    """A deterministic description of the architecture for the cache manifest."""
    reg = 0 if teacher.vit.reg_token is None else teacher.vit.reg_token.shape[1]
    grid = teacher.pos_grid
    return (
        f"dinov2-vit/{teacher.patch_size} dim={teacher.embed_dim} depth={depth} heads={num_heads} "
        f"reg={reg} pos={grid}x{grid} interp=bicubic+{INTERPOLATE_OFFSET} final-norm "
        f"tokens={'+'.join(teacher.token_types)} (timm {TIMM_DINOV2})"
    )


def build_dinov2_teacher(
    cfg: TeacherConfig,
    *,
    dims: tuple[int, int, int],
    reg_tokens: int,
    token_types: tuple[str, ...],
    mapper: Callable[[dict[str, torch.Tensor], nn.Module], MappedState] = map_dinov2_keys,
    container_keys: tuple[str, ...] = ("model", "state_dict"),
    hub_name: str | None = None,
    checkpoint_hint: str = DINOV2_CHECKPOINT,
) -> BuiltTeacher:
    """Build a DINOv2-style teacher: random init (seeded), a local checkpoint, or the hub."""
    embed_dim = cfg.embed_dim or dims[0]
    depth = cfg.depth or dims[1]
    num_heads = cfg.num_heads or dims[2]
    if embed_dim % num_heads:
        raise ConfigError(
            f"{cfg.where}.embed_dim: expected a multiple of num_heads={num_heads}, "
            f"found {embed_dim}"
        )
    if cfg.pretrained and hub_name is None:
        raise ConfigError(
            f"{cfg.where}.pretrained: no hub download is wired for {cfg.kind!r}",
            hint=f"download {checkpoint_hint} and set checkpoint",
        )
    hub = hub_name if cfg.pretrained else None
    with initial_weights(cfg.init_seed, from_checkpoint=cfg.checkpoint is not None):
        vit = create_dinov2_vit(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            reg_tokens=reg_tokens,
            hub_name=hub,
        )
    teacher = DinoV2Tokens(vit, token_types)
    if hub is not None:
        return BuiltTeacher(teacher, dinov2_arch(teacher, depth, num_heads), f"hub:timm/{hub}")
    sha = teacher_weights(vit, cfg, mapper, container_keys=container_keys,
                          arch=dinov2_arch(teacher, depth, num_heads))
    # Described again after the load: a checkpoint's position grid replaces the built one.
    return BuiltTeacher(teacher, dinov2_arch(teacher, depth, num_heads), sha)


@register_teacher(
    "dino2reg_vitlarge_14",
    patch_size=14,
    dim=1024,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token_types=TOKEN_TYPES,
    domain="2d",
    description="DINOv2 ViT-L/14 with 4 registers (registers dropped), final-norm cls + patch",
    checkpoint_file=DINOV2_CHECKPOINT,
)
def build_dino2reg(cfg: TeacherConfig) -> BuiltTeacher:
    """DINOv2 ViT-L/14 reg4: original or timm checkpoint, or timm's hub weights when pretrained."""
    return build_dinov2_teacher(
        cfg, dims=(1024, 24, 16), reg_tokens=4, token_types=TOKEN_TYPES, hub_name=DINOV2_HUB
    )


@register_teacher(
    "test_vit_p14",
    patch_size=14,
    dim=32,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token_types=TOKEN_TYPES,
    domain="2d",
    description="tiny random-init DINOv2-reg-style ViT (patch 14, dim 32, 2 blocks) for tests",
)
def build_test_vit_p14(cfg: TeacherConfig) -> BuiltTeacher:
    """A tiny stand-in with the DINOv2-reg architecture, for fast tests."""
    return build_dinov2_teacher(cfg, dims=(32, 2, 2), reg_tokens=4, token_types=TOKEN_TYPES)
