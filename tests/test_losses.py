"""Loss formulas against hand-computed values, fp32 computation, masking and the total."""

from __future__ import annotations

import pytest
import torch

from train.losses import masked_teacher_losses, teacher_losses, token_loss, total_loss


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# (student, teacher, 0.5 * (1 - cos) + 0.5 * mean_c SmoothL1, worked out by hand).
# SmoothL1 with beta 1: 0.5 d^2 for |d| < 1, |d| - 0.5 otherwise.
HAND_COMPUTED = [
    ([1.0, 0.0], [1.0, 0.0], 0.0),  # identical
    ([1.0, 0.0], [0.0, 1.0], 0.5 * 1.0 + 0.5 * 0.5),  # orthogonal, |d| = 1 on both channels
    ([2.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], 0.5 * (1.5 - 0.5) / 4),  # parallel, |d| = 1.5
    ([1.0, 1.0], [-1.0, -1.0], 0.5 * 2.0 + 0.5 * 1.5),  # opposite, |d| = 2
    ([0.2, 0.0, 0.0], [0.0, 0.0, 0.1], 0.5 + 0.5 * (0.02 + 0.005) / 3),  # quadratic branch
]


@pytest.mark.parametrize(("student", "teacher", "expected"), HAND_COMPUTED)
def test_token_loss_matches_hand_computed_values(
    student: list[float], teacher: list[float], expected: float
) -> None:
    loss = token_loss(_t(student), _t(teacher))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_token_loss_is_per_token() -> None:
    student = torch.stack([_t(s) for s, _, _ in HAND_COMPUTED[:2]]).view(1, 2, 2)
    teacher = torch.stack([_t(t) for _, t, _ in HAND_COMPUTED[:2]]).view(1, 2, 2)
    loss = token_loss(student, teacher)
    assert loss.shape == (1, 2)
    assert torch.allclose(loss, _t([0.0, 0.75]).view(1, 2))
    with pytest.raises(ValueError, match="differ in shape"):
        token_loss(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 9, 64, generator=gen).to(dtype)
    teacher = (student.float() + 0.01 * torch.randn(4, 9, 64, generator=gen)).to(dtype)
    expected = token_loss(student.float(), teacher.float())
    loss = token_loss(student, teacher)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, expected)
    # Also under autocast, which would otherwise run these ops in half precision.
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast_loss = token_loss(student, teacher)
    assert autocast_loss.dtype == torch.float32 and torch.equal(autocast_loss, expected)


def test_cls_and_patch_losses_are_averaged_together_not_pooled() -> None:
    """cls loss 0.75; patch losses 0, 0, 0.75 (mean 0.25) -> (0.75 + 0.25) / 2 = 0.5.

    Pooling the four tokens would give 0.375 instead: the reference averages per type.
    """
    same, other = _t([1.0, 0.0]), _t([0.0, 1.0])
    pred = {"cls": same.view(1, 2), "patch": torch.stack([same, same, same]).view(1, 3, 2)}
    target = {"cls": other.view(1, 2), "patch": torch.stack([same, same, other]).view(1, 3, 2)}
    losses = teacher_losses(pred, target)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(0.5)
    # A teacher without cls tokens (MASt3R) compares patches only; the extra cls is ignored.
    assert teacher_losses(pred, {"patch": target["patch"]}).item() == pytest.approx(0.25)


def test_teacher_losses_checks_token_types() -> None:
    pred = {"patch": torch.zeros(2, 3, 4)}
    with pytest.raises(ValueError, match="has 'cls' tokens"):
        teacher_losses(pred, {"cls": torch.zeros(2, 4), "patch": torch.zeros(2, 3, 4)})
    with pytest.raises(ValueError, match="token types"):
        teacher_losses(pred, {"registers": torch.zeros(2, 3, 4)})


def _pred_target(batch: int = 4, tokens: int = 5, dim: int = 8) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(0)
    pred = {
        "cls": torch.randn(batch, dim, generator=gen, requires_grad=True),
        "patch": torch.randn(batch, tokens, dim, generator=gen, requires_grad=True),
    }
    target = {
        "cls": torch.randn(batch, dim, generator=gen),
        "patch": torch.randn(batch, tokens, dim, generator=gen),
    }
    return pred, target


def test_masked_teacher_losses_never_look_at_absent_rows() -> None:
    pred, target = _pred_target()
    present = torch.tensor([True, False, True, False])
    poisoned = {kind: value.clone() for kind, value in target.items()}
    for value in poisoned.values():
        value[~present] = float("nan")
    losses = masked_teacher_losses(pred, poisoned, present)
    full = teacher_losses(pred, target)
    assert torch.equal(losses[~present], torch.zeros(2))
    assert torch.allclose(losses[present], full[present])
    losses.sum().backward()
    for value in pred.values():
        assert torch.isfinite(value.grad).all()
        assert value.grad[~present].abs().sum() == 0 and value.grad[present].abs().sum() > 0
    # Targets may also come compacted to the present rows only.
    compact = {kind: value[present] for kind, value in target.items()}
    assert torch.allclose(masked_teacher_losses(pred, compact, present), losses)
    # Nobody present: zeros, not an error.
    nobody = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(masked_teacher_losses(pred, target, nobody), torch.zeros(4))
    with pytest.raises(ValueError, match="rows"):
        masked_teacher_losses(pred, {"cls": torch.zeros(3, 8)}, present)


def test_total_loss_weights_and_ignores_masked_entries() -> None:
    losses = torch.tensor([[1.0, float("nan")], [3.0, 5.0]], requires_grad=True)
    coeffs = torch.tensor([[0.5, 0.0], [0.25, 0.25]])
    loss = total_loss(losses, coeffs)
    assert loss.item() == pytest.approx(0.5 * 1 + 0.25 * 3 + 0.25 * 5)
    loss.backward()
    assert torch.equal(losses.grad, coeffs)  # coefficients are constants, NaN entry gets 0


def test_total_loss_with_nothing_kept_is_zero_and_finite() -> None:
    losses = torch.full((3, 2), float("nan"), requires_grad=True)
    loss = total_loss(losses, torch.zeros(3, 2))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(losses.grad, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="same"):
        total_loss(torch.zeros(3, 2), torch.zeros(2, 3))


def test_gradient_flows_from_total_loss_into_a_projector() -> None:
    torch.manual_seed(0)
    projector = torch.nn.Linear(8, 6)
    tokens = projector(torch.randn(2, 5, 8))
    pred = {"cls": tokens[:, 0], "patch": tokens[:, 1:]}
    target = {"cls": torch.randn(2, 6), "patch": torch.randn(2, 4, 6)}
    losses = torch.stack([teacher_losses(pred, target)], dim=1)  # [B, 1 teacher]
    total_loss(losses, torch.full((2, 1), 0.5)).backward()
    assert projector.weight.grad is not None and projector.weight.grad.abs().sum() > 0
