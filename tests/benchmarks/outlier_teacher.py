"""A stand-in teacher whose tokens carry outlier channels, as pretrained ViTs' do.

Pretrained transformers (DINOv2, CLIP, MASt3R's encoder) put a few channels of their last-block
tokens at tens to hundreds of times the median channel's spread, with a large offset. A compact
encoding that scales per token or per group spends its range on those channels; one that
standardizes per channel or rotates first does not. A random-init ViT has no such channels, so
this factory adds them: a small timm ViT (random init, no LayerScale, so the blocks shape the
tokens) whose output has `OUTLIER_CHANNELS` channels multiplied by 20-100 and offset.

Used as `kind = "factory:tests.benchmarks.outlier_teacher:outlier_vit"` (bench_encodings.py);
the channels and gains are fixed (seeded), so every build of the same config gives the same
teacher.
"""

from __future__ import annotations

import numpy as np
import timm
import torch
from torch import nn

from cache_format.manifest import TOKEN_TYPES
from precompute.teachers.generic import TimmTokens

#: Outlier channels per teacher, and the range of their gain (std multiplier).
OUTLIER_CHANNELS = 4
OUTLIER_GAIN = (20.0, 100.0)


class OutlierViT(nn.Module):
    """A timm ViT (patch 14, cls token) whose tokens have a few outlier channels."""

    token_types = TOKEN_TYPES
    patch_size = 14

    def __init__(self, embed_dim: int = 64, depth: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        vit = timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, num_classes=0, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, init_values=None, dynamic_img_size=True)
        self.tokens = TimmTokens(vit, "outlier_vit")
        self.embed_dim = embed_dim
        rng = np.random.default_rng(embed_dim)  # fixed channels for a given width
        channels = rng.choice(embed_dim, size=min(OUTLIER_CHANNELS, embed_dim), replace=False)
        gain = np.ones(embed_dim, dtype=np.float32)
        gain[channels] = rng.uniform(*OUTLIER_GAIN, channels.size)
        offset = np.zeros(embed_dim, dtype=np.float32)
        offset[channels] = gain[channels] * rng.choice([-1.0, 1.0], channels.size)
        self.register_buffer("gain", torch.from_numpy(gain))
        self.register_buffer("offset", torch.from_numpy(offset))

    def forward_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ViT's tokens (cls, patch) with the outlier channels scaled and offset.

        A random-init ViT's cls token barely depends on the image (its per-channel spread
        across images is ~1e-4, below fp16's resolution once scaled), which no trained teacher
        does; the mean patch token is added to it so that it summarises the image.
        """
        tokens = self.tokens.forward_tokens(x)
        tokens["cls"] = tokens["cls"] + tokens["patch"].mean(dim=1)
        return {tok: value * self.gain + self.offset for tok, value in tokens.items()}


def outlier_vit(embed_dim: int = 64, depth: int = 2, num_heads: int = 4) -> OutlierViT:
    """The factory the teacher kind names (overrides: embed_dim, depth, num_heads)."""
    return OutlierViT(embed_dim, depth, num_heads)
