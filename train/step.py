"""One batch through the model: predictions, normalized targets and per-teacher losses.

Training (`train.trainer`) and held-out evaluation (`train.evaluation`) both call `DistillStep`,
so the two cannot drift apart: pixel normalization with the student's mean / std, the forward
under autocast (bf16 on CUDA when `amp`), the teacher targets without gradients, each teacher's
`TeacherNorm` on its present rows, and the masked per-sample loss. What differs stays with the
caller: training drops teachers and steps the optimizer; evaluation puts the model in eval mode
(the norms then use their fixed statistics) and adds the cosine.

`check_finite` is the one non-finite check of both: it names the step and every value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cache_format.errors import TrainingError
from train.losses import masked_teacher_losses
from train.model import DistillModel

# {teacher: {token type: tensor}}: predictions, targets and normalized targets alike.
TeacherTokens = dict[str, dict[str, Tensor]]

NON_FINITE_HINT = (
    "lower optim.lr, check the cache with `dune-cache verify`, or set amp = false; the last "
    "checkpoint is intact"
)


@dataclass(frozen=True)
class BatchLosses:
    """What one batch gave: `losses` [B, n_teachers] float32 (0 where a teacher is absent),
    `present` [B, n_teachers] bool, the predictions and the normalized targets per teacher
    (a target holds all B rows or only the present ones, in batch order)."""

    losses: Tensor
    present: Tensor
    preds: TeacherTokens
    targets: TeacherTokens


class DistillStep:
    """Computes a batch's per-teacher losses; see the module docstring.

    `targets(batch)` gives the raw teacher tokens (cached or online); `teachers` is the column
    order of the losses (the batch's `presence` columns); `pixel_mean` / `pixel_std` are the
    student's image normalization.
    """

    def __init__(
        self,
        model: DistillModel,
        targets: Callable[[Any], TeacherTokens],
        teachers: Sequence[str],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.targets = targets
        self.teachers = list(teachers)
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.mean = torch.tensor(pixel_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pixel_std, device=device).view(1, 3, 1, 1)

    def __call__(self, batch: Any, forward: nn.Module | None = None) -> BatchLosses:
        """The losses of `batch` (moved to the device here).

        `forward` runs the model: the DDP / compiled wrapper when training, `model` itself
        (the default) when evaluating. Train or eval mode is the caller's to set.
        """
        batch = batch.to(self.device, non_blocking=True)
        images = (batch.images - self.mean) / self.std
        with torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            preds = (forward if forward is not None else self.model)(images)
        with torch.no_grad():
            targets = self.targets(batch)
        present = batch.presence.to(self.device)
        columns, normed_targets = [], {}
        for i, teacher in enumerate(self.teachers):
            norms = self.model.norms[teacher]
            normed_targets[teacher] = {
                tok: norms[tok](value, mask=present[:, i])
                for tok, value in targets[teacher].items()
            }
            columns.append(
                masked_teacher_losses(preds[teacher], normed_targets[teacher], present[:, i])
            )
        return BatchLosses(torch.stack(columns, dim=1), present, preds, normed_targets)


def check_finite(values: Mapping[str, float], *, step: int, what: str = "loss") -> None:
    """TrainingError naming the step and every value when one of `values` is NaN or infinite."""
    if all(math.isfinite(v) for v in values.values()):
        return
    listed = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
    raise TrainingError(f"step {step}: non-finite {what} ({listed})", hint=NON_FINITE_HINT)
