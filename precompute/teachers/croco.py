"""The CroCo ViT encoder with 2D rotary position embeddings, as used by MASt3R (our own code).

What the encoder computes (the MASt3R / DUSt3R / CroCo papers and their public code):
- patch embedding: a stride-p convolution, tokens in row-major order, no cls token, no absolute
  position embedding;
- pre-norm transformer blocks (LayerNorm eps 1e-6, qkv with bias, GELU MLP of ratio 4) whose
  attention rotates queries and keys with 2D RoPE: the first half of each head's channels turns
  with the patch's row index, the second half with its column index, each half by the
  "rotate half" convention with frequencies base^(-2i/half), base 100;
- a final LayerNorm `enc_norm` after the last block: its output is what MASt3R's decoder (and
  the DUNE distillation) consumes.

Parameter names follow the MASt3R checkpoints (`patch_embed.proj.*`, `enc_blocks.N.*`,
`enc_norm.*`) so that their encoder keys load as they are. The rotation angles are computed in
float32 whatever the autocast dtype (the reference builds them in the activations' dtype, which in
bf16 rounds a position-64 angle by up to 0.25 rad); in fp32 the two agree to 1e-6, see
tests/test_teachers_golden.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rope_2d_tables(
    grid: tuple[int, int], head_dim: int, base: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [gh*gw, head_dim] for the patches of a (gh, gw) grid, row-major."""
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=device, dtype=torch.float32) / half))
    rows = torch.arange(grid[0], device=device, dtype=torch.float32)
    cols = torch.arange(grid[1], device=device, dtype=torch.float32)
    row_of = rows.repeat_interleave(grid[1])  # patch k sits at (k // gw, k % gw)
    col_of = cols.repeat(grid[0])
    row_angles = torch.outer(row_of, inv_freq)
    col_angles = torch.outer(col_of, inv_freq)
    angles = torch.cat((row_angles, row_angles, col_angles, col_angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope_2d(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, N, head_dim] queries or keys; each half turns by its own "rotate half"."""
    row_a, row_b, col_a, col_b = t.float().chunk(4, dim=-1)
    rotated = torch.cat((-row_b, row_a, -col_b, col_a), dim=-1)
    return (t.float() * cos + rotated * sin).to(t.dtype)


class PatchEmbed(nn.Module):
    """Stride-p convolution from pixels to tokens (the module is named to match checkpoints)."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RopeAttention(nn.Module):
    """Multi-head self-attention whose queries and keys carry 2D RoPE."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Two linear layers with a GELU between them."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: attention with RoPE, then the MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RopeAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class CrocoEncoder(nn.Module):
    """MASt3R's image encoder: patch tokens after `enc_norm`, no cls token.

    `forward_tokens(x)` takes images normalized with mean = std = 0.5 whose sides are multiples
    of `patch_size` (any aspect ratio: RoPE needs no interpolation) and returns
    `{"patch": [B, (H/p)*(W/p), embed_dim]}`.
    """

    token_types = ("patch",)

    def __init__(
        self,
        *,
        patch_size: int = 16,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        rope_base: float = 100.0,
    ) -> None:
        super().__init__()
        head_dim = embed_dim // num_heads
        if embed_dim % num_heads or head_dim % 4:
            # 2D RoPE splits each head in two halves, and each half in two again
            raise ValueError(
                f"CrocoEncoder: embed_dim/num_heads must be a multiple of 4, "
                f"found {embed_dim}/{num_heads}"
            )
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.rope_base = rope_base
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.enc_blocks = nn.ModuleList(EncoderBlock(embed_dim, num_heads) for _ in range(depth))
        self.enc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier-uniform linears and patch projection, as CroCo initializes before pretraining:
        # random-init stand-ins then produce tokens of sensible scale.
        proj = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Patch tokens of images [B, 3, H, W] (H, W multiples of the patch size)."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.patch_embed(x)
        cos, sin = rope_2d_tables(grid, self.embed_dim // self.num_heads, self.rope_base, x.device)
        for block in self.enc_blocks:
            tokens = block(tokens, cos, sin)
        return {"patch": self.enc_norm(tokens)}

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, rope_base={self.rope_base}"
