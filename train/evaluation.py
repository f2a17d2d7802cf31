"""Held-out evaluation: each teacher's loss and student-to-teacher cosine on held-out cached views.

The held-out images never enter training (see `DataConfig.heldout_images`); their cached views are
read in a fixed order, the norms run in eval mode (exact statistics, or the EMA in `batch`
mode) and nothing is dropped. The cosine is the mean per-token cosine between the projected
student tokens and the normalized teacher tokens, cls and patch averaged the way the loss is:
the number that says how well the student reproduces each teacher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from train.losses import masked_teacher_losses

if TYPE_CHECKING:
    from train.trainer import Trainer


def token_cosine(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample cosine [B]: per token type the mean over tokens, then the mean over types."""
    per_type = []
    for tok, value in target.items():
        cos = F.cosine_similarity(pred[tok].float(), value.float(), dim=-1)
        per_type.append(cos.mean(dim=1) if cos.ndim == 2 else cos)
    return torch.stack(per_type, dim=1).mean(dim=1)


@torch.no_grad()
def evaluate_heldout(trainer: Trainer, data: Any) -> dict[str, float]:
    """`heldout/loss`, and `heldout/loss/<t>` and `heldout/cos/<t>` per teacher, over all ranks."""
    rank, world = trainer.dist.rank, trainer.dist.world_size
    loader = DataLoader(
        data,
        batch_size=trainer.local_batch,
        sampler=list(range(rank, len(data), world)),
        num_workers=0,
        collate_fn=trainer.ctx.collate,
    )
    n = len(trainer.teachers)
    sums = torch.zeros(3, n, dtype=torch.float64, device=trainer.device)  # loss, cosine, count
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            batch = batch.to(trainer.device)
            images = (batch.images - trainer.mean) / trainer.std
            with torch.autocast(
                trainer.device.type, dtype=trainer.autocast_dtype or torch.float32,
                enabled=trainer.autocast_dtype is not None,
            ):
                preds = model(images)
            targets = trainer.targets(batch)
            present = batch.presence.to(trainer.device)
            for i, teacher in enumerate(trainer.teachers):
                mask = present[:, i]
                if not mask.any():
                    continue
                normed = {
                    tok: model.norms[teacher][tok](value, mask=mask)
                    for tok, value in targets[teacher].items()
                }
                losses = masked_teacher_losses(preds[teacher], normed, mask)
                rows = mask.nonzero().squeeze(1)
                cos = token_cosine(
                    {k: v.index_select(0, rows) for k, v in preds[teacher].items()},
                    {k: (v.index_select(0, rows) if v.shape[0] == mask.shape[0] else v)
                     for k, v in normed.items()},
                )
                sums[0, i] += losses[mask].double().sum()
                sums[1, i] += cos.double().sum()
                sums[2, i] += mask.sum()
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(sums)
    result: dict[str, float] = {}
    per_teacher = []
    for i, teacher in enumerate(trainer.teachers):
        count = float(sums[2, i])
        if count == 0:
            continue
        result[f"heldout/loss/{teacher}"] = float(sums[0, i]) / count
        result[f"heldout/cos/{teacher}"] = float(sums[1, i]) / count
        per_teacher.append(result[f"heldout/loss/{teacher}"])
    result["heldout/loss"] = sum(per_teacher) / len(per_teacher) if per_teacher else float("nan")
    result["heldout/samples"] = float(sums[2].max()) if n else 0.0
    return result
