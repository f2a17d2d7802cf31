"""TeacherNorm: exact statistics, the reference's batch statistics and their EMA."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cache_format.errors import ConfigError, TrainingError
from train.teacher_norm import TeacherNorm, ema_momentum


def _tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * torch.linspace(0.5, 4, shape[-1]) + 3.0


def test_exact_mode_standardizes_with_the_given_statistics() -> None:
    norm = TeacherNorm(3, mode="exact")
    norm.set_stats(torch.tensor([1.0, -2.0, 0.0]), torch.tensor([2.0, 0.5, 1e-5]))
    x = torch.tensor([[3.0, -1.0, 0.0005]])
    expected = torch.tensor([[1.0, 2.0, 0.5]])  # the last std is clamped to 1e-3
    assert torch.allclose(norm(x), expected)
    norm.eval()
    assert torch.allclose(norm(x), expected)  # same statistics in both modes
    patch = x.expand(2, 4, 3)
    assert torch.allclose(norm(patch), expected.expand(2, 4, 3))
    assert norm(x.to(torch.bfloat16)).dtype == torch.float32


def test_exact_mode_refuses_to_run_without_statistics_and_checks_them() -> None:
    norm = TeacherNorm(4)
    with pytest.raises(TrainingError, match="set_stats"):
        norm(torch.zeros(2, 4))
    with pytest.raises(ConfigError, match=r"shape \(4,\)"):
        norm.set_stats(torch.zeros(3), torch.ones(3))
    with pytest.raises(ConfigError, match="non-finite"):
        norm.set_stats(torch.zeros(4), torch.full((4,), float("nan")))
    norm.set_stats(torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="expected"):
        norm(torch.zeros(2, 5))  # another teacher's width
    with pytest.raises(ConfigError, match="teacher_norm.mode"):
        TeacherNorm(4, mode="running")


def test_batch_mode_uses_each_batch_own_statistics() -> None:
    patch = _tokens(4, 6, 5)
    cls = _tokens(8, 5, seed=1)
    patch_norm, cls_norm = TeacherNorm(5, mode="batch"), TeacherNorm(5, mode="batch")
    flat = patch.reshape(-1, 5)  # patch tokens pool over batch and tokens
    assert torch.allclose(patch_norm(patch), (patch - flat.mean(0)) / flat.std(0), atol=1e-5)
    assert torch.allclose(cls_norm(cls), (cls - cls.mean(0)) / cls.std(0), atol=1e-5)


def test_batch_mode_mask_keeps_absent_samples_out_of_the_statistics() -> None:
    x = _tokens(6, 3, 4)
    present = torch.tensor([True, False, True, True, False, True])
    polluted = x.clone()
    polluted[~present] = 1e6
    out = TeacherNorm(4, mode="batch")(polluted, present)
    reference = TeacherNorm(4, mode="batch")(x[present])
    assert torch.allclose(out[present], reference, atol=1e-5)


def test_momentum_schedule_endpoints() -> None:
    assert ema_momentum(0, 100) == pytest.approx(1.0)
    assert ema_momentum(50, 100) == pytest.approx((1.0 + 0.001) / 2)
    assert ema_momentum(100, 100) == pytest.approx(0.001)
    assert ema_momentum(500, 100) == pytest.approx(0.001)
    quarter = 0.001 + 0.5 * 0.999 * (1 + math.cos(math.pi / 4))
    assert ema_momentum(25, 100) == pytest.approx(quarter)


def test_ema_follows_the_schedule_and_eval_uses_it() -> None:
    norm = TeacherNorm(5, mode="batch", total_steps=4)
    first, second = _tokens(3, 7, 5, seed=1), _tokens(3, 7, 5, seed=2) * 2 - 1
    norm(first)  # momentum 1.0: the EMA becomes the first batch's statistics
    first_flat = first.reshape(-1, 5)
    assert torch.allclose(norm.mean, first_flat.mean(0), atol=1e-5)
    assert torch.allclose(norm.std, first_flat.std(0), atol=1e-5)
    assert norm.current_momentum() == pytest.approx(ema_momentum(1, 4))
    norm(second)
    m = ema_momentum(1, 4)
    second_flat = second.reshape(-1, 5)
    expected_mean = (1 - m) * first_flat.mean(0) + m * second_flat.mean(0)
    expected_std = (1 - m) * first_flat.std(0) + m * second_flat.std(0)
    assert torch.allclose(norm.mean, expected_mean, atol=1e-5)
    assert torch.allclose(norm.std, expected_std, atol=1e-5)
    assert int(norm.steps_seen) == 2
    # Evaluation standardizes with the EMA, not with the batch's own statistics.
    norm.eval()
    assert torch.allclose(norm(second), (second - expected_mean) / expected_std, atol=1e-5)
    assert "mode=batch" in repr(norm) and "steps_seen=2" in repr(norm)


def test_batch_without_any_sample_leaves_the_ema_alone() -> None:
    norm = TeacherNorm(4, mode="batch", total_steps=10)
    norm(_tokens(5, 4))
    mean, std = norm.mean.clone(), norm.std.clone()
    out = norm(_tokens(5, 4, seed=3), torch.zeros(5, dtype=torch.bool))
    assert torch.isfinite(out).all()
    assert torch.equal(norm.mean, mean) and torch.equal(norm.std, std)
    assert int(norm.steps_seen) == 2  # the schedule still follows training steps


def test_eval_before_any_batch_statistics_is_an_error() -> None:
    with pytest.raises(TrainingError, match="training batch"):
        TeacherNorm(4, mode="batch").eval()(torch.zeros(2, 4))


def test_state_dict_round_trip_restores_the_statistics() -> None:
    norm = TeacherNorm(4, mode="batch", total_steps=10)
    for seed in range(3):
        norm(_tokens(5, 4, seed=seed))
    restored = TeacherNorm(4, mode="batch", total_steps=10)
    restored.load_state_dict(norm.state_dict())
    x = _tokens(5, 4, seed=9)
    assert torch.equal(restored.eval()(x), norm.eval()(x))
    assert int(restored.steps_seen) == 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    rank: int, world: int, port: int, x: torch.Tensor, mask: torch.Tensor, out_dir: str
) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        norm = TeacherNorm(x.shape[-1], mode="batch", total_steps=5)
        share = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        out = norm(x[share], mask[share])
        torch.save({"out": out, "mean": norm.mean, "std": norm.std}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_batch_statistics_are_global_across_ranks(tmp_path: Path) -> None:
    x = _tokens(6, 3, 4)
    mask = torch.tensor([True, True, False, True, False, True])
    single = TeacherNorm(4, mode="batch", total_steps=5)
    expected = single(x, mask)
    mp.spawn(_rank_main, args=(2, _free_port(), x, mask, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.allclose(torch.cat([p["out"] for p in parts]), expected, atol=1e-5)
    for part in parts:
        assert torch.allclose(part["mean"], single.mean, atol=1e-6)
        assert torch.allclose(part["std"], single.std, atol=1e-6)
