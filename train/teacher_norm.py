"""Per-channel standardization of one teacher's tokens of one type: (x - mean) / max(std, 1e-3).

Teachers differ wildly in feature scale; standardizing each channel puts every teacher's target
on the same footing before the loss. Two sources for the statistics:

- `exact` (default): the cache's exact per-channel mean/std over all cached samples, set once
  with `set_stats` before training. This is a deliberate improvement over the reference, made
  possible by the cache: targets no longer depend on which images share a batch.
- `batch`: the reference's behaviour, kept for parity. In training mode each global batch (the
  samples of all DDP ranks together) is standardized with its own mean and (unbiased) std;
  patch tokens pool over batch and tokens, cls over batch only. An exponential moving average
  of those statistics, with a momentum cosine-scheduled from 1.0 down to 0.001 over training,
  is kept in buffers and used only in eval mode.

`forward(x, mask)`: `mask` says which samples count; samples for which the teacher has no
features are left out of the batch statistics (their outputs are garbage the loss masks out).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from cache_format.errors import BatchMismatchError, ConfigError, TrainingError
from cache_format.serde import check_choice

NORM_MODES = ("exact", "batch")
MOMENTUM_START = 1.0
MOMENTUM_END = 0.001


def ema_momentum(
    step: int, total_steps: int, start: float = MOMENTUM_START, end: float = MOMENTUM_END
) -> float:
    """Cosine schedule of the EMA momentum: `start` at step 0, `end` at `total_steps` and after.

    Same curve as the reference's cosine scheduler without warm-up (which spans one "epoch" of
    all training iterations).
    """
    if total_steps <= 0:
        return end
    progress = min(max(step, 0), total_steps) / total_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


class TeacherNorm(nn.Module):
    """Standardize one teacher's tokens of one type ([B, D] cls or [B, T, D] patch) per channel.

    One instance per (teacher, token type); the token type is read from the input's rank.
    `total_steps` (batch mode) is the run's number of training steps, over which the EMA
    momentum decays; every training-mode call counts as one step, so call it once per step.
    Held-out evaluation must run in eval mode, or it would update the EMA.
    """

    def __init__(
        self,
        dim: int,
        mode: str = "exact",
        min_std: float = 1e-3,
        total_steps: int = 1,
        momentum_start: float = MOMENTUM_START,
        momentum_end: float = MOMENTUM_END,
    ) -> None:
        super().__init__()
        check_choice(mode, NORM_MODES, "teacher_norm.mode")
        if dim <= 0:
            raise ConfigError(f"teacher_norm.dim: expected a positive width, found {dim}")
        if min_std <= 0:
            raise ConfigError(f"teacher_norm.min_std: expected > 0, found {min_std}")
        if total_steps <= 0:
            raise ConfigError(f"teacher_norm.total_steps: expected > 0, found {total_steps}")
        self.dim, self.mode, self.min_std = dim, mode, min_std
        self.total_steps = total_steps
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        # Buffers, not attributes, so that a checkpoint restores them and resume is exact.
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("has_stats", torch.zeros((), dtype=torch.bool))
        self._stats_known = False

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, mode={self.mode}, min_std={self.min_std}, "
            f"total_steps={self.total_steps}, steps_seen={int(self.steps_seen)}, "
            f"momentum={self.current_momentum():.4f}, has_stats={bool(self.has_stats)}"
        )

    def current_momentum(self) -> float:
        """Momentum the next batch-mode training update will use."""
        return ema_momentum(
            int(self.steps_seen), self.total_steps, self.momentum_start, self.momentum_end
        )

    @torch.no_grad()
    def set_stats(self, mean: Tensor | np.ndarray, std: Tensor | np.ndarray) -> None:
        """Install per-channel statistics (the cache's exact ones in `exact` mode)."""
        mean_t = torch.as_tensor(np.asarray(mean) if not torch.is_tensor(mean) else mean)
        std_t = torch.as_tensor(np.asarray(std) if not torch.is_tensor(std) else std)
        for name, value in (("mean", mean_t), ("std", std_t)):
            if tuple(value.shape) != (self.dim,):
                raise ConfigError(
                    f"teacher_norm.set_stats: {name} must have shape ({self.dim},), "
                    f"found {tuple(value.shape)}; are these statistics of another teacher?"
                )
            if not torch.isfinite(value).all():
                raise ConfigError(f"teacher_norm.set_stats: {name} has non-finite values")
        if (std_t < 0).any():
            raise ConfigError("teacher_norm.set_stats: std has negative values")
        self.mean.copy_(mean_t.to(self.mean))
        self.std.copy_(std_t.to(self.std))
        self.has_stats.fill_(True)
        self._stats_known = False

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Standardized float32 copy of `x`; `mask` ([B] bool) marks the samples that count."""
        if x.ndim not in (2, 3) or x.shape[-1] != self.dim:
            raise BatchMismatchError(
                f"TeacherNorm: expected [B, {self.dim}] (cls) or [B, T, {self.dim}] (patch), "
                f"found shape {tuple(x.shape)}"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.mode == "batch" and self.training:
                mean, std = self._update_from_batch(x, mask)
            else:
                self._check_has_stats()
                mean, std = self.mean, self.std
            return (x - mean) / std.clamp_min(self.min_std)

    def _check_has_stats(self) -> None:
        # Reading the flag syncs with the device: do it until it first succeeds, not every step.
        if not self._stats_known:
            self._stats_known = bool(self.has_stats)
            if not self._stats_known:
                raise TrainingError(
                    f"TeacherNorm(mode={self.mode}) has no statistics yet: "
                    + (
                        "call set_stats with the cache's statistics before training"
                        if self.mode == "exact"
                        else "run at least one training batch before evaluating"
                    )
                )

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._stats_known = False  # the loaded flag may differ from the one checked before
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _update_from_batch(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Global batch statistics of `x` (masked rows only), and the EMA update they feed.

        Written without host synchronisation (no `.item()`), so it does not stall the GPU.
        """
        weights = torch.ones(x.shape[0], device=x.device) if mask is None else mask.float()
        weights = weights.to(x.device).view(-1, *([1] * (x.ndim - 1)))
        pooled = tuple(range(x.ndim - 1))  # batch for cls; batch and tokens for patch
        per_sample_tokens = 1 if x.ndim == 2 else x.shape[1]
        # Two passes (mean, then squared deviations) with sums all-reduced across ranks: exact
        # global statistics without gathering the tokens themselves, and stable in float32.
        count = _all_reduce_sum(weights.sum() * per_sample_tokens)
        mean = _all_reduce_sum((x * weights).sum(dim=pooled)) / count.clamp_min(1)
        squares = _all_reduce_sum((((x - mean) ** 2) * weights).sum(dim=pooled))
        std = (squares / (count - 1).clamp_min(1)).sqrt()  # unbiased, as torch.std

        # A global batch without any sample of this teacher teaches nothing: keep the EMA, and
        # standardize (outputs that the loss masks out anyway) with it.
        has_samples = count > 0
        progress = self.steps_seen.clamp(max=self.total_steps).float() / self.total_steps
        momentum = self.momentum_end + 0.5 * (self.momentum_start - self.momentum_end) * (
            1.0 + torch.cos(math.pi * progress)
        )
        mean = torch.where(has_samples, mean, self.mean)
        std = torch.where(has_samples, std, self.std)
        self.mean.copy_(torch.where(has_samples, torch.lerp(self.mean, mean, momentum), self.mean))
        self.std.copy_(torch.where(has_samples, torch.lerp(self.std, std, momentum), self.std))
        # The schedule follows training steps, as the reference's per-iteration schedule does.
        self.steps_seen.add_(1)
        self.has_stats.logical_or_(has_samples)
        self._stats_known = False
        return mean, std


def _all_reduce_sum(value: Tensor) -> Tensor:
    """Sum over DDP ranks when a process group is up; the value itself otherwise."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
