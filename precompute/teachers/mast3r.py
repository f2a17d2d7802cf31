"""The MASt3R teacher: the CroCo ViT-L/16 encoder of a MASt3R checkpoint, 2D RoPE, no cls token.

The official checkpoint (`MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth`) is a dict
`{"model": state_dict, "args": Namespace(...)}` holding the whole two-view model. The encoder is
`patch_embed.proj.*`, `enc_blocks.N.*` and `enc_norm.*`; the decoders (`decoder_embed`,
`dec_blocks`, `dec_blocks2`, `dec_norm`) and the heads (`downstream_head1/2`) are set aside. A
HuggingFace `model.safetensors` export has the same keys without the `model` wrapper.

DUNE distills the encoder's output after `enc_norm` (its teacher code calls MASt3R's
`_encode_image`, which ends with that norm), patch tokens only, from images normalized with mean
and std 0.5. Portrait images are not transposed: the reference swaps MASt3R's landscape-only
patch embedding for the plain one, as we do.
"""

from __future__ import annotations

import torch
from torch import nn

from cache_format.errors import ConfigError
from precompute.teachers.checkpoints import (
    MappedState,
    initial_weights,
    teacher_weights,
)
from precompute.teachers.config import TeacherConfig
from precompute.teachers.croco import CrocoEncoder
from precompute.teachers.registry import BuiltTeacher, register_teacher
from precompute.teachers.specs import HALF_MEAN, HALF_STD

ENCODER_PREFIXES = ("patch_embed.", "enc_blocks.", "enc_norm.", "enc_pos_embed")
MAST3R_CHECKPOINT = "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric.pth"


def map_mast3r_keys(state: dict[str, torch.Tensor], target: nn.Module) -> MappedState:
    """Keep the encoder's keys as they are; set aside the decoders and heads.

    `enc_pos_embed` counts as an encoder key so that a cosine-position CroCo checkpoint (not a
    RoPE one) is reported as unexpected instead of loading into the wrong model.
    """
    del target  # nothing to adapt: RoPE has no parameters
    encoder = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    ignored = tuple(sorted(k for k in state if not k.startswith(ENCODER_PREFIXES)))
    return MappedState(tensors=encoder, ignored=ignored)


def croco_arch(encoder: CrocoEncoder, depth: int) -> str:
    """A deterministic description of the encoder for the cache manifest."""
    return (
        f"croco-encoder/{encoder.patch_size} rope2d(base={encoder.rope_base:g}) "
        f"dim={encoder.embed_dim} depth={depth} heads={encoder.num_heads} no-cls enc_norm"
    )


def build_croco_teacher(
    cfg: TeacherConfig, *, embed_dim: int, depth: int, num_heads: int
) -> BuiltTeacher:
    """Build the encoder (overrides applied), random-init seeded or filled from the checkpoint."""
    embed_dim = cfg.embed_dim or embed_dim
    depth = cfg.depth or depth
    num_heads = cfg.num_heads or num_heads
    head_dim, rest = divmod(embed_dim, num_heads)
    if rest or head_dim % 4:
        raise ConfigError(
            f"{cfg.where}.embed_dim: 2D RoPE needs embed_dim / num_heads to be a multiple of 4, "
            f"found embed_dim={embed_dim}, num_heads={num_heads}"
        )
    if cfg.pretrained:
        raise ConfigError(
            f"{cfg.where}.pretrained: no hub download is wired for {cfg.kind!r}",
            hint=f"download {MAST3R_CHECKPOINT} (github naver/mast3r) and set checkpoint",
        )
    with initial_weights(cfg.init_seed, from_checkpoint=cfg.checkpoint is not None):
        encoder = CrocoEncoder(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    arch = croco_arch(encoder, depth)
    sha = teacher_weights(encoder, cfg, map_mast3r_keys, container_keys=("model", "state_dict"),
                          arch=arch)
    return BuiltTeacher(encoder, arch, sha)


@register_teacher(
    "mast3r_vitlarge_16",
    patch_size=16,
    dim=1024,
    mean=HALF_MEAN,
    std=HALF_STD,
    token_types=("patch",),
    domain="3d",
    description="MASt3R encoder: CroCo ViT-L/16, 2D RoPE (base 100), patch tokens after enc_norm",
    checkpoint_file=MAST3R_CHECKPOINT,
)
def build_mast3r(cfg: TeacherConfig) -> BuiltTeacher:
    """The MASt3R ViT-L/16 encoder."""
    return build_croco_teacher(cfg, embed_dim=1024, depth=24, num_heads=16)


@register_teacher(
    "test_vit_p16",
    patch_size=16,
    dim=32,
    mean=HALF_MEAN,
    std=HALF_STD,
    token_types=("patch",),
    domain="3d",
    description="tiny random-init MASt3R-style encoder (patch 16, dim 32, 2 blocks) for tests",
)
def build_test_vit_p16(cfg: TeacherConfig) -> BuiltTeacher:
    """A tiny stand-in with the MASt3R encoder's architecture, for fast tests."""
    return build_croco_teacher(cfg, embed_dim=32, depth=2, num_heads=2)
