"""Per-teacher projectors: student tokens [B, 1 + T, C] -> teacher-width tokens [B, 1 + T, D].

DUNE's Transformer Projector (TP) runs N pre-norm transformer blocks at the student width, with
LayerScale initialised at 1e-4 so that each block starts as (almost) the identity, then one
Linear to the teacher width. As in the reference there is no LayerNorm between the last block
and the Linear. The paper's ablations compare it with a linear and an MLP projector; both are
kept for that purpose. Cls and patch tokens go through the projector together (attention mixes
them) and are split apart afterwards with `split_tokens`.
"""

from __future__ import annotations

from functools import partial

from timm.models.vision_transformer import Block
from torch import Tensor, nn

from cache_format.errors import BatchMismatchError, ConfigError

PROJECTOR_KINDS = ("tp", "mlp", "linear")


def default_num_heads(dim: int) -> int:
    """Heads of 64 channels each, as ViT-S/B/L use; 1 head for widths below 64 or not a multiple."""
    return dim // 64 if dim >= 64 and dim % 64 == 0 else 1


class TransformerProjector(nn.Module):
    """N transformer blocks at the student width, then a Linear to the teacher width."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        n_blocks: int = 1,
        mlp_ratio: float = 4.0,
        layerscale_init: float = 1e-4,
        eps: float = 1e-6,
        num_heads: int | None = None,
    ) -> None:
        super().__init__()
        _check_dims(in_dim, out_dim)
        if n_blocks < 0:
            raise ConfigError(f"projector.n_blocks: expected >= 0, found {n_blocks}")
        heads = num_heads if num_heads is not None else default_num_heads(in_dim)
        if heads <= 0 or in_dim % heads:
            raise ConfigError(
                f"projector.num_heads: {heads} does not divide the student width {in_dim}; "
                "use the student's head count"
            )
        self.in_dim, self.out_dim, self.num_heads = in_dim, out_dim, heads
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=in_dim,
                    num_heads=heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    init_values=layerscale_init if layerscale_init > 0 else None,
                    norm_layer=partial(nn.LayerNorm, eps=eps),
                )
                for _ in range(n_blocks)
            ]
        )
        self.linear = nn.Linear(in_dim, out_dim)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_heads={self.num_heads}"

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, in_dim] -> [B, N, out_dim]."""
        return self.linear(self.blocks(x))


class MLPProjector(nn.Module):
    """Linear -> GELU -> Linear, token-wise (UNIC's adapter without its optional norms)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        _check_dims(in_dim, out_dim)
        hidden = hidden_dim if hidden_dim is not None else 4 * in_dim
        if hidden <= 0:
            raise ConfigError(f"projector.hidden_dim: expected a positive width, found {hidden}")
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, in_dim] -> [B, N, out_dim]."""
        return self.fc2(self.act(self.fc1(x)))


class LinearProjector(nn.Module):
    """One Linear layer, token-wise: the weakest projector of the paper's ablation."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        _check_dims(in_dim, out_dim)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, in_dim] -> [B, N, out_dim]."""
        return self.linear(x)


def build_projector(
    kind: str, in_dim: int, out_dim: int, n_blocks: int = 1, num_heads: int | None = None
) -> nn.Module:
    """Build one projector by name (`tp`, `mlp` or `linear`).

    `n_blocks` and `num_heads` only apply to `tp`; pass the student's head count as `num_heads`
    (the reference does), otherwise heads of 64 channels are used.
    """
    if kind == "tp":
        return TransformerProjector(in_dim, out_dim, n_blocks=n_blocks, num_heads=num_heads)
    if kind == "mlp":
        return MLPProjector(in_dim, out_dim)
    if kind == "linear":
        return LinearProjector(in_dim, out_dim)
    raise ConfigError(
        f"projector.kind: {kind!r} is not a projector; valid kinds are {', '.join(PROJECTOR_KINDS)}"
    )


def split_tokens(y: Tensor, has_cls: bool = True) -> dict[str, Tensor]:
    """Split projector output [B, 1 + T, D] into {"cls": [B, D], "patch": [B, T, D]}.

    The student always emits a cls token; `has_cls=False` (a teacher without one, e.g. the
    MASt3R encoder) drops it so that only the patch tokens are compared.
    """
    if y.ndim != 3 or y.shape[1] < 2:
        raise BatchMismatchError(
            f"split_tokens: expected [B, 1 + T, D] with T >= 1, found shape {tuple(y.shape)}"
        )
    tokens = {"patch": y[:, 1:]}
    if has_cls:
        tokens["cls"] = y[:, 0]
    return tokens


def _check_dims(in_dim: int, out_dim: int) -> None:
    if in_dim <= 0 or out_dim <= 0:
        raise ConfigError(
            f"projector: expected positive in_dim and out_dim, found {in_dim} and {out_dim}"
        )
