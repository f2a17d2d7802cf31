"""The distillation loss: per token, per teacher and per sample, then the weighted total.

Per token: L = 0.5 * (1 - cos(s, t)) + 0.5 * SmoothL1(s, t; beta=1) averaged over channels,
always in float32 (bf16/fp16 cosines of 1024-d vectors are too coarse to train on). Per teacher
and sample, as the reference does: patch-token losses are averaged over tokens, then the cls
loss and the averaged patch loss are averaged together (each token type weighs one half, not
one token's worth). Teacher dropping (see `train.teacher_dropping`) turns the per-sample,
per-teacher losses [B, n_teachers] into coefficients; `total_loss` applies them.

A teacher without features for a sample (data-sharing strategy `own`) is never compared with a
placeholder: `masked_teacher_losses` evaluates only the present rows, and `total_loss` ignores
every entry whose coefficient is zero, so a NaN left in a masked entry cannot leak.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from cache_format.errors import BatchMismatchError
from cache_format.manifest import TOKEN_TYPES

COS_WEIGHT = 0.5
SMOOTH_L1_WEIGHT = 0.5
SMOOTH_L1_BETA = 1.0


def token_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Loss of every token: [..., D] x [..., D] -> [...], float32 whatever the input dtypes."""
    if student.shape != teacher.shape:
        raise BatchMismatchError(
            f"token_loss: student tokens {tuple(student.shape)} and teacher tokens "
            f"{tuple(teacher.shape)} differ in shape; is the projector's width the teacher's?"
        )
    # Autocast off: under bf16 autocast the upcast below would otherwise be undone.
    with torch.autocast(device_type=student.device.type, enabled=False):
        s, t = student.float(), teacher.float()
        cosine = F.cosine_similarity(s, t, dim=-1)
        smooth_l1 = F.smooth_l1_loss(s, t, reduction="none", beta=SMOOTH_L1_BETA).mean(dim=-1)
        return COS_WEIGHT * (1.0 - cosine) + SMOOTH_L1_WEIGHT * smooth_l1


def teacher_losses(pred: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> Tensor:
    """Per-sample loss [B] of one teacher.

    The teacher's token types (`target`'s keys: "cls" [B, D] and/or "patch" [B, T, D]) decide
    what is compared; `pred` may hold more (the projector always emits a cls token, which a
    teacher without one, like MASt3R's encoder, simply does not use).
    """
    kinds = [kind for kind in TOKEN_TYPES if kind in target]
    unknown = sorted(set(target) - set(TOKEN_TYPES))
    if unknown or not kinds:
        raise BatchMismatchError(
            f"teacher_losses: target token types must be among {TOKEN_TYPES}, "
            f"found {sorted(target)}"
        )
    per_kind = []
    for kind in kinds:
        if kind not in pred:
            raise BatchMismatchError(
                f"teacher_losses: the teacher has {kind!r} tokens but the prediction has only "
                f"{sorted(pred)}"
            )
        loss = token_loss(pred[kind], target[kind])
        per_kind.append(loss.mean(dim=1) if loss.ndim == 2 else loss)  # patch: mean over tokens
    return torch.stack(per_kind, dim=1).mean(dim=1)


def masked_teacher_losses(
    pred: Mapping[str, Tensor], target: Mapping[str, Tensor], present: Tensor
) -> Tensor:
    """Per-sample loss [B] of one teacher, computed on the samples it has features for only.

    `present` is [B] bool. `target` holds either all B rows (absent rows are ignored, whatever
    they contain) or only the present rows, in batch order. Absent samples get a loss of 0 and
    no gradient; they must also get no coefficient (see `TeacherDropping`).
    """
    present = present.to(device=next(iter(pred.values())).device, dtype=torch.bool)
    batch = present.shape[0]
    n_present = int(present.sum())
    if n_present == batch and all(value.shape[0] == batch for value in target.values()):
        return teacher_losses(pred, target)  # everyone present: no gather needed
    rows = present.nonzero().squeeze(1)
    pred_rows = {kind: value.index_select(0, rows) for kind, value in pred.items()}
    target_rows = {}
    for kind, value in target.items():
        if value.shape[0] == batch:
            target_rows[kind] = value.index_select(0, rows.to(value.device))
        elif value.shape[0] == n_present:
            target_rows[kind] = value
        else:
            raise BatchMismatchError(
                f"masked_teacher_losses: target {kind!r} has {value.shape[0]} rows; expected "
                f"the batch ({batch}) or its present samples ({n_present})"
            )
    losses = torch.zeros(batch, device=present.device, dtype=torch.float32)
    if n_present == 0:
        return losses
    return losses.index_put((rows,), teacher_losses(pred_rows, target_rows))


def total_loss(losses: Tensor, coeffs: Tensor) -> Tensor:
    """Scalar training loss: sum of coefficient x loss over samples and teachers.

    `losses` and `coeffs` are [B, n_teachers]; coefficients are treated as constants (as in the
    reference) and entries with a zero coefficient are excluded outright, so masked entries
    contribute neither value nor gradient even if they hold NaN.
    """
    if losses.shape != coeffs.shape:
        raise BatchMismatchError(
            f"total_loss: losses {tuple(losses.shape)} and coefficients {tuple(coeffs.shape)} "
            "must have the same [B, n_teachers] shape"
        )
    weights = coeffs.detach().float()
    kept = torch.where(weights > 0, losses.float(), torch.zeros_like(weights))
    return (weights * kept).sum()
