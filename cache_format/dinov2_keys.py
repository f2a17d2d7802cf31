"""DINOv2's released state-dict names -> timm's ViT names: the one copy of the rule.

Stage one loads DINOv2 teachers (and Multi-HMR's DINOv2 backbone) from release checkpoints;
stage two and the heads load DUNE reference checkpoints, whose encoder is a DINOv2-style ViT
saved under the same names. The stages share no package but `cache_format` (stage two may not
import the teachers, stage one does not import `train`), so the rule lives here, beside the
other formats both stages read.
"""

from __future__ import annotations

import math
import re

import torch

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # FSDP-chunked `blocks.C.N.*`


def timm_key(key: str) -> str | None:
    """timm's name for the DINOv2 key `key`; None for `mask_token`, which only masked-image
    training uses and a timm ViT has no place for."""
    if key == "mask_token":
        return None
    if key == "register_tokens":
        return "reg_token"
    return _CHUNKED_BLOCK.sub(r"blocks.\1.", key)


def is_square(n: int) -> bool:
    """Whether `n` positions form a square patch grid."""
    return n > 0 and math.isqrt(n) ** 2 == n


def holds_cls_slot(pos_embed: torch.Tensor) -> bool:
    """Whether a position table [1, N, D] is stored DINOv2's way, with the cls token's entry in
    front of a square patch grid (timm's `no_embed_class` ViTs store the grid alone)."""
    n = pos_embed.shape[1]
    return not is_square(n) and is_square(n - 1)


def fold_cls_slot(cls_token: torch.Tensor, pos_embed: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls token, patch position table) with the table's cls entry added to the cls token:
    the cls entry is a constant, so it folds into the token exactly."""
    return cls_token + pos_embed[:, :1], pos_embed[:, 1:]
