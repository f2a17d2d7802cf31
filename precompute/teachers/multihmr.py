"""The Multi-HMR teacher: the DINOv2 ViT-L/14 backbone (no registers) of a Multi-HMR checkpoint.

Multi-HMR (github naver/multi-hmr) wraps a torch.hub DINOv2 ViT-L/14 as `self.backbone.encoder`
and saves `{"epoch", "iter", "model_state_dict", "args"}`; the backbone's keys are therefore
`model_state_dict["backbone.encoder.<DINOv2 key>"]` in the original DINOv2 naming, with a
position embedding of 37 x 37 + 1 entries (trained at 518 px, then fine-tuned at 672 px through
the on-the-fly interpolation that `DinoV2Tokens` reproduces). The detection / mesh heads
(`x_attention_head.*`, `mlp_classif.*`, `mlp_offset.*`, ...) are set aside.

DUNE distills its patch tokens only (the cls token was never trained by Multi-HMR), after the
backbone's final norm: Multi-HMR itself reads `get_intermediate_layers(x)[0]`, which applies it,
and DUNE's teacher code reads `x_norm_patchtokens`.
"""

from __future__ import annotations

import torch
from torch import nn

from cache_format.errors import CheckpointError
from precompute.teachers.checkpoints import MappedState
from precompute.teachers.config import TeacherConfig
from precompute.teachers.registry import BuiltTeacher, register_teacher
from precompute.teachers.specs import IMAGENET_MEAN, IMAGENET_STD
from precompute.teachers.vit_dinov2 import build_dinov2_teacher, map_dinov2_keys

BACKBONE_PREFIX = "backbone.encoder."
MULTIHMR_CHECKPOINT = "multiHMR_672_L.pt"


def map_multihmr_keys(state: dict[str, torch.Tensor], target: nn.Module) -> MappedState:
    """Take the `backbone.encoder.` keys, strip the prefix, map them as DINOv2 keys."""
    backbone = {
        k.removeprefix(BACKBONE_PREFIX): v
        for k, v in state.items()
        if k.startswith(BACKBONE_PREFIX)
    }
    if not backbone:
        sample = ", ".join(sorted(state)[:10])
        raise CheckpointError(
            f"no key starts with {BACKBONE_PREFIX!r}: this is not a Multi-HMR checkpoint "
            f"(first keys: {sample})",
            hint="for a plain DINOv2 checkpoint use kind dino2reg_vitlarge_14",
        )
    mapped = map_dinov2_keys(backbone, target, file_prefix=BACKBONE_PREFIX)
    rest = tuple(sorted(k for k in state if not k.startswith(BACKBONE_PREFIX)))
    return MappedState(
        mapped.tensors, mapped.original_names, mapped.ignored + rest, mapped.file_name
    )


@register_teacher(
    "multihmr_vitlarge_14_672",
    patch_size=14,
    dim=1024,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    token_types=("patch",),
    domain="human",
    description="Multi-HMR backbone: DINOv2 ViT-L/14 (no registers) fine-tuned at 672 px, patch",
    checkpoint_file=MULTIHMR_CHECKPOINT,
)
def build_multihmr(cfg: TeacherConfig) -> BuiltTeacher:
    """The Multi-HMR ViT-L/14 backbone from `model_state_dict` of a Multi-HMR checkpoint."""
    return build_dinov2_teacher(
        cfg,
        dims=(1024, 24, 16),
        reg_tokens=0,
        token_types=("patch",),
        mapper=map_multihmr_keys,
        container_keys=("model_state_dict",),
        checkpoint_hint=MULTIHMR_CHECKPOINT,
    )
