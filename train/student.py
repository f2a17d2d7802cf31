"""The student encoder: a timm ViT whose output is [cls; patches] of the last block, unnormed.

DUNE distils the student's last-block tokens *before* the final LayerNorm (the projectors see
the raw residual stream); register tokens are internal scratch space and are never distilled.
Any timm `VisionTransformer` with a class token can be the student; the default is the
DINOv2-style ViT-B/14 with 4 registers and LayerScale 1e-4 used by the reference.

Position embeddings are stored at the training resolution's grid. The model is created with
`dynamic_img_size=True`, so other input sizes resample them on the fly; to initialise a student
at a new resolution from a checkpoint (the 336 -> 448 fine-tune), `interpolate_pos_embed`
resamples the stored table exactly the way timm does at run time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from cache_format.errors import BatchMismatchError, CheckpointError, ConfigError, RegistryError

DEFAULT_ARCH = "vit_base_patch14_reg4_dinov2"


@dataclass(frozen=True)
class StudentConfig:
    """Which timm ViT to build and how.

    `embed_dim`, `depth` and `num_heads` override the architecture's values; they exist for tiny
    test students (e.g. ViT-S/14 at width 32, 2 blocks, 2 heads) and are left `None` otherwise.
    """

    arch: str = DEFAULT_ARCH
    img_size: int = 336
    layerscale_init: float = 1e-4
    drop_path_rate: float = 0.0
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None

    def __post_init__(self) -> None:
        if not self.arch:
            raise ConfigError("student.arch: expected a timm model name, found an empty string")
        if self.img_size <= 0:
            raise ConfigError(f"student.img_size: expected a positive size, found {self.img_size}")
        if self.layerscale_init < 0:
            raise ConfigError(
                f"student.layerscale_init: expected >= 0 (0 disables LayerScale), "
                f"found {self.layerscale_init}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(
                f"student.drop_path_rate: expected a rate in [0, 1), found {self.drop_path_rate}"
            )
        for name in ("embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"student.{name}: expected a positive integer, found {value}")
        if self.embed_dim is not None and self.num_heads is not None:
            if self.embed_dim % self.num_heads:
                raise ConfigError(
                    f"student.embed_dim: {self.embed_dim} is not divisible by "
                    f"student.num_heads={self.num_heads}; pick a width that is a multiple of it"
                )


def timm_kwargs(cfg: StudentConfig) -> dict[str, Any]:
    """The keyword arguments given to `timm.create_model(cfg.arch, **kwargs)`.

    Exported alongside the student's weights so that `timm.create_model` rebuilds the same
    encoder without this project. `num_classes=0`: the student has no classifier head.
    """
    kwargs: dict[str, Any] = {
        "img_size": cfg.img_size,
        "dynamic_img_size": True,
        "num_classes": 0,
        "init_values": cfg.layerscale_init if cfg.layerscale_init > 0 else None,
        "drop_path_rate": cfg.drop_path_rate,
    }
    for name in ("embed_dim", "depth", "num_heads"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    return kwargs


class Student(nn.Module):
    """A timm ViT seen as a token encoder: `forward_tokens(x) -> [B, 1 + T, C]`."""

    def __init__(self, vit: VisionTransformer, cfg: StudentConfig) -> None:
        super().__init__()
        self.vit = vit
        self.cfg = cfg

    @property
    def patch_size(self) -> int:
        """Side of one square patch, in pixels."""
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def embed_dim(self) -> int:
        """Token width C."""
        return int(self.vit.embed_dim)

    @property
    def num_heads(self) -> int:
        """Attention heads per block (the Transformer Projector reuses this number)."""
        return int(self.vit.blocks[0].attn.num_heads)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (gh, gw) at `cfg.img_size`; the cache's grid must equal it."""
        side = self.cfg.img_size // self.patch_size
        return side, side

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches inside the ViT (cls + registers); only cls is returned."""
        return int(self.vit.num_prefix_tokens)

    @property
    def pixel_mean_std(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """The (mean, std) its input images are normalized with: those of the timm
        architecture's pretrained config, ImageNet's when it names none. The one rule for the
        trainer and for the heads' frozen student."""
        pretrained = getattr(self.vit, "pretrained_cfg", None) or {}
        mean = pretrained.get("mean", IMAGENET_DEFAULT_MEAN)
        std = pretrained.get("std", IMAGENET_DEFAULT_STD)
        return (float(mean[0]), float(mean[1]), float(mean[2])), (
            float(std[0]), float(std[1]), float(std[2]))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to save memory (large students)."""
        self.vit.set_grad_checkpointing(enable)

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Cls token and patch tokens of the last block, before the final norm.

        `x` is [B, 3, H, W], normalised, with H and W multiples of the patch size. Returns
        [B, 1 + (H / p) * (W / p), C]; register tokens are dropped.
        """
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise BatchMismatchError(
                f"student input: image size {height}x{width} is not a multiple of the patch size "
                f"{self.patch_size}; resize or crop the view to a multiple of it"
            )
        # timm's public feature API: the last block's tokens, split into prefix (cls, then
        # registers) and patches, without the final norm (DUNE distils the pre-norm stream).
        # It honours grad checkpointing (`set_grad_checkpointing`) itself.
        ((patches, prefix),) = self.vit.forward_intermediates(
            x, indices=1, norm=False, return_prefix_tokens=True, output_fmt="NLC",
            intermediates_only=True,
        )
        return torch.cat([prefix[:, :1], patches], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Same as `forward_tokens`, so that DDP and `torch.compile` wrap the right call."""
        return self.forward_tokens(x)

    def load_encoder_state(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Load ViT weights saved at any resolution, resampling position embeddings to `grid`.

        Accepts the keys of the bare timm model or of this module (`vit.` prefix). Raises
        `CheckpointError` listing missing / unexpected keys when `strict`.
        """
        plain = {
            (key[len("vit.") :] if key.startswith("vit.") else key): value
            for key, value in state_dict.items()
        }
        if "pos_embed" in plain and plain["pos_embed"].shape != self.vit.pos_embed.shape:
            plain = interpolate_pos_embed(
                plain,
                self.grid,
                num_prefix_tokens=0 if self.vit.no_embed_class else self.num_prefix_tokens,
            )
        result = self.vit.load_state_dict(plain, strict=False)
        if strict and (result.missing_keys or result.unexpected_keys):
            raise CheckpointError(
                f"student weights do not fit {self.cfg.arch}: missing keys "
                f"{sorted(result.missing_keys)[:10]}, unexpected keys "
                f"{sorted(result.unexpected_keys)[:10]}",
                hint="check that the checkpoint's student arch and width match the config",
            )


def build_student(cfg: StudentConfig) -> Student:
    """Create the student from timm with random weights (`pretrained=False`)."""
    if not timm.is_model(cfg.arch):
        family = cfg.arch.split("_")[0]
        close = timm.list_models(f"*{family}*")[:10] or timm.list_models("vit_*")[:10]
        raise RegistryError(
            f"student.arch: {cfg.arch!r} is not a timm model; some valid names: {', '.join(close)}"
        )
    try:
        vit = timm.create_model(cfg.arch, pretrained=False, **timm_kwargs(cfg))
    except TypeError as exc:
        raise ConfigError(
            f"student.arch: {cfg.arch!r} does not accept the student options ({exc}); "
            f"use a timm VisionTransformer such as {DEFAULT_ARCH!r}"
        ) from None
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(
            f"student.arch: {cfg.arch!r} builds a {type(vit).__name__}, expected a timm "
            f"VisionTransformer (e.g. {DEFAULT_ARCH!r} or 'vit_small_patch14_reg4_dinov2')"
        )
    if vit.cls_token is None:
        raise ConfigError(
            f"student.arch: {cfg.arch!r} has no class token, but the student must output "
            "[cls; patches]; pick a ViT with a class token"
        )
    # The final norm is not part of the distilled output, so it would get no gradient: freeze
    # it at its identity init, or DDP would fail on a parameter that never receives one. It is
    # kept (not removed) so that the exported weights load into `timm.create_model` as they are.
    vit.norm.requires_grad_(False)
    student = Student(vit, cfg)
    if cfg.img_size % student.patch_size:
        below = cfg.img_size // student.patch_size * student.patch_size
        raise ConfigError(
            f"student.img_size: {cfg.img_size} is not a multiple of the patch size "
            f"{student.patch_size}; use {below} or {below + student.patch_size}"
        )
    return student


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def interpolate_pos_embed(
    state_dict: Mapping[str, Tensor],
    new_grid: tuple[int, int],
    *,
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int | None = None,
    key: str = "pos_embed",
) -> dict[str, Tensor]:
    """Return a copy of `state_dict` whose position embedding is resampled to `new_grid`.

    Every entry named `key` or ending in `.key` is resampled (bicubic, antialiased: the same
    resampling timm applies to a `dynamic_img_size` model at run time, so a student initialised
    this way computes what the old one computed on the larger input). `num_prefix_tokens` is the
    number of leading non-patch entries (0 for timm's DINOv2 models, whose cls position is
    folded into the cls token); when omitted it is inferred from a square old grid.
    """
    out = dict(state_dict)
    names = [name for name in out if name == key or name.endswith("." + key)]
    if not names:
        raise CheckpointError(
            f"interpolate_pos_embed: no {key!r} entry among the checkpoint's keys "
            f"(first keys: {list(out)[:5]})"
        )
    for name in names:
        table = out[name]
        count = table.shape[1]
        prefix = num_prefix_tokens
        if prefix is None and old_grid is not None:
            prefix = count - old_grid[0] * old_grid[1]
        if prefix is None:
            prefix = next((p for p in (0, 1) if _square_side(count - p)), None)
        if prefix is None or prefix < 0:
            raise CheckpointError(
                f"interpolate_pos_embed: {name!r} has {count} entries, which is not a square "
                "grid plus 0 or 1 prefix tokens; pass old_grid= and num_prefix_tokens="
            )
        grid_before = old_grid
        if grid_before is None:
            side = _square_side(count - prefix)
            if side is None:
                raise CheckpointError(
                    f"interpolate_pos_embed: {name!r} has {count - prefix} patch entries, not a "
                    "square grid; pass old_grid="
                )
            grid_before = (side, side)
        out[name] = resample_abs_pos_embed(
            table,
            new_size=list(new_grid),
            old_size=list(grid_before),
            num_prefix_tokens=prefix,
        )
    return out
