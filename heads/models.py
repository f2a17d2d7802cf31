"""Linear heads on frozen tokens, a whole grid of them at once (DINOv2's linear protocols).

A grid holds one independent linear head per (learning rate, weight decay) setting. All heads
see the same features of a batch, read once; each has its own parameters (and optimizer param
group), so training the grid together equals training each head alone.

Features are standardized per channel with the train split's exact statistics (from the
features cache) before the linear layers. This takes the place of the BatchNorm the DINOv2 heads
put first: at evaluation BatchNorm is exactly such a fixed affine map, and a linear layer after
a fixed affine map is still a linear head.

- classification: [cls ; mean of patches] -> classes (mean of patches alone without a cls);
- segmentation: each patch token -> class logits on the token grid, bilinear upsampling to
  the label size;
- depth (DINOv2 "lin. 1"): [patch ; cls] per token -> `bins` logits, bilinear x4 upsampling,
  ReLU + 0.1 then divided by their sum (DINOv2's "linear" bin normalisation), expected depth over
  bins uniform in [min_depth, max_depth], bilinear resize to the label size.
  Upsampling the logits equals upsampling the features first: both maps are linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache_format.manifest import TOKEN_TYPES
from heads.datasets import Task

DEPTH_UPSAMPLE = 4


class HeadGrid(nn.Module):
    """`count` linear heads of one task over standardized tokens."""

    def __init__(self, task: Task, count: int, in_dim: int, has_cls: bool, out_dim: int,
                 grid: tuple[int, int], label_size: int, *, min_depth: float = 1e-3,
                 max_depth: float = 10.0) -> None:
        super().__init__()
        self.task, self.grid, self.label_size = Task(task), tuple(grid), int(label_size)
        self.has_cls = has_cls
        width = in_dim * (2 if has_cls and self.task != Task.segmentation else 1)
        self.heads = nn.ModuleList(nn.Linear(width, out_dim) for _ in range(count))
        for head in self.heads:  # small init: every head starts from the same near-zero map
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        for tok in TOKEN_TYPES:
            self.register_buffer(f"{tok}_mean", torch.zeros(in_dim))
            self.register_buffer(f"{tok}_std", torch.ones(in_dim))
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, out_dim)
                             if self.task == Task.depth else torch.zeros(0))

    def set_standardization(self, tok: str, mean: Tensor, std: Tensor) -> None:
        getattr(self, f"{tok}_mean").copy_(mean)
        getattr(self, f"{tok}_std").copy_(std)

    def inputs(self, tokens: dict[str, Tensor]) -> Tensor:
        """The heads' shared input: [B, in] (classification) or [B, T, in] (dense tasks)."""
        patch = (tokens["patch"] - self.patch_mean) / self.patch_std
        cls = (tokens["cls"] - self.cls_mean) / self.cls_std if self.has_cls else None
        if self.task == Task.classification:
            pooled = patch.mean(1)
            return torch.cat([cls, pooled], 1) if cls is not None else pooled
        if self.task == Task.depth and cls is not None:
            return torch.cat([patch, cls[:, None].expand_as(patch)], 2)
        return patch

    def forward_heads(self, heads: range, x: Tensor) -> Tensor:
        """Heads `heads` on shared inputs, in one batched map: [H, B, C] logits, [H, B, C, S, S]
        logits or [H, B, S, S] depths. One matmul and one upsampling for all of them."""
        chosen = [self.heads[h] for h in heads]
        weight = torch.cat([head.weight for head in chosen])
        bias = torch.cat([head.bias for head in chosen])
        n, c = len(chosen), chosen[0].out_features
        y = F.linear(x, weight, bias)  # [B, n*c] or [B, T, n*c]
        if self.task == Task.classification:
            return y.reshape(y.shape[0], n, c).transpose(0, 1)
        b, gh, gw = y.shape[0], *self.grid
        y = y.transpose(1, 2).reshape(b, n * c, gh, gw)
        side = (self.label_size, self.label_size)
        if self.task == Task.segmentation:
            y = F.interpolate(y, size=side, mode="bilinear", align_corners=False)
            return y.reshape(b, n, c, *side).transpose(0, 1)
        y = F.interpolate(y, scale_factor=DEPTH_UPSAMPLE, mode="bilinear", align_corners=False)
        y = y.reshape(b, n, c, *y.shape[-2:])
        weights = F.relu(y) + 0.1
        weights = weights / weights.sum(2, keepdim=True)
        depth = (weights * self.bins[None, None, :, None, None]).sum(2)  # [B, n, 4gh, 4gw]
        depth = F.interpolate(depth, size=side, mode="bilinear", align_corners=False)
        return depth.transpose(0, 1)

    def chunks(self, batch: int, budget_bytes: int = 256 * 2**20) -> list[range]:
        """Groups of heads whose batched outputs stay under `budget_bytes` (float32)."""
        per_head = batch * self.heads[0].out_features * 4
        if self.task != Task.classification:
            per_head *= max(self.label_size, DEPTH_UPSAMPLE * max(self.grid)) ** 2
        size = max(1, budget_bytes // max(per_head, 1))
        count = len(self.heads)
        return [range(i, min(i + size, count)) for i in range(0, count, size)]

    def predictions(self, x: Tensor) -> list[Tensor]:
        """What metrics compare, per head: logits [B, C], class map [B, S, S] or depth."""
        out: list[Tensor] = []
        for chunk in self.chunks(x.shape[0]):
            y = self.forward_heads(chunk, x)
            out += [y[j].argmax(1) if self.task == Task.segmentation else y[j]
                    for j in range(len(chunk))]
        return out


def task_loss(task: Task, output: Tensor, target: Tensor, ignore: int) -> Tensor:
    """Cross-entropy (ignore index) for classes; scale-invariant log loss for depth."""
    if task != Task.depth:
        return F.cross_entropy(output, target, ignore_index=ignore)
    valid = target > 0
    if not bool(valid.any()):
        return output.sum() * 0.0
    g = torch.log(output[valid].clamp(min=1e-6)) - torch.log(target[valid])
    # SiLog (Eigen et al.), as DINOv2's depth heads use: var(g) + 0.15 * mean(g)^2
    return torch.sqrt(g.var(unbiased=False) + 0.15 * g.mean() ** 2 + 1e-12)
