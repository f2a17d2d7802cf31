"""Held-out evaluation: each teacher's loss and student-to-teacher cosine on held-out cached views.

The held-out images never enter training (see `DataConfig.heldout_images`); their cached views are
read in a fixed order, each batch goes through the same `DistillStep` as training, with the model
in eval mode (the norms use exact statistics, or the EMA in `batch` mode) and nothing dropped.
The cosine is the mean per-token cosine between the projected student tokens and the normalized
teacher tokens, cls and patch averaged the way the loss is: the number that says how well the
student reproduces each teacher.

A non-finite held-out loss or cosine stops the run as a non-finite training loss does
(`TrainingError` naming the step and each teacher's values): a NaN in held-out targets or
predictions is never logged silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from train.step import DistillStep, check_finite


def token_cosine(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample cosine [B]: per token type the mean over tokens, then the mean over types."""
    per_type = []
    for tok, value in target.items():
        cos = F.cosine_similarity(pred[tok].float(), value.float(), dim=-1)
        per_type.append(cos.mean(dim=1) if cos.ndim == 2 else cos)
    return torch.stack(per_type, dim=1).mean(dim=1)


@torch.no_grad()
def evaluate_heldout(
    step: DistillStep,
    data: Dataset,
    *,
    batch_size: int,
    collate: Callable[[list[Any]], Any],
    at_step: int,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """`heldout/loss`, and `heldout/loss/<t>` and `heldout/cos/<t>` per teacher, over all ranks.

    Rank `rank` of `world_size` evaluates every world_size-th sample, `batch_size` at a time;
    `at_step` is the training step the numbers belong to (named by a non-finite error).
    """
    loader = DataLoader(
        data,
        batch_size=batch_size,
        sampler=list(range(rank, len(data), world_size)),
        num_workers=0,
        collate_fn=collate,
    )
    n = len(step.teachers)
    sums = torch.zeros(3, n, dtype=torch.float64, device=step.device)  # loss, cosine, count
    model = step.model
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            out = step(batch)
            for i, teacher in enumerate(step.teachers):
                mask = out.present[:, i]
                if not mask.any():
                    continue
                rows = mask.nonzero().squeeze(1)
                cos = token_cosine(
                    {k: v.index_select(0, rows) for k, v in out.preds[teacher].items()},
                    {k: (v.index_select(0, rows) if v.shape[0] == mask.shape[0] else v)
                     for k, v in out.targets[teacher].items()},
                )
                sums[0, i] += out.losses[:, i][mask].double().sum()
                sums[1, i] += cos.double().sum()
                sums[2, i] += mask.sum()
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
    result: dict[str, float] = {}
    per_teacher = []
    for i, teacher in enumerate(step.teachers):
        count = float(sums[2, i])
        if count == 0:
            continue
        result[f"heldout/loss/{teacher}"] = float(sums[0, i]) / count
        result[f"heldout/cos/{teacher}"] = float(sums[1, i]) / count
        per_teacher.append(result[f"heldout/loss/{teacher}"])
    # Every rank holds the same reduced sums, so every rank stops here together.
    check_finite(result, step=at_step, what="held-out loss or cosine")
    result["heldout/loss"] = sum(per_teacher) / len(per_teacher) if per_teacher else float("nan")
    result["heldout/samples"] = float(sums[2].max()) if n else 0.0
    return result
