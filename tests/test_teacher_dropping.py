"""Teacher dropping: the highest loss is kept, others dropped at rate p, masks, normalisation."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cache_format.errors import ConfigError
from train.losses import total_loss
from train.teacher_dropping import TeacherDropping, normalize_coefficients

N_IMAGES = 4000


def _losses(batch: int, n_teachers: int, seed: int = 100) -> torch.Tensor:
    return torch.rand(batch, n_teachers, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    """Draws for dropping; seeds differ from `_losses` so draws and losses are independent."""
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_lowest_loss_keeps_the_highest_and_drops_others_at_rate_p(p: float) -> None:
    losses = _losses(N_IMAGES, 3)
    raw = TeacherDropping("lowest_loss", p=p).coefficients(losses, generator=_gen())
    highest = losses.argmax(dim=1)
    assert (raw[torch.arange(N_IMAGES), highest] == 1).all()
    others = torch.ones_like(raw, dtype=torch.bool)
    others[torch.arange(N_IMAGES), highest] = False
    kept_rate = raw[others].mean().item()
    # 8000 Bernoulli draws: the standard error is under 0.006; 0.03 is five of them.
    assert kept_rate == pytest.approx(1 - p, abs=0.03)


def test_extreme_rates() -> None:
    losses = _losses(64, 3)
    assert (TeacherDropping(p=0.0).coefficients(losses, generator=_gen()) == 1).all()
    only_highest = TeacherDropping(p=1.0).coefficients(losses, generator=_gen())
    assert (only_highest.sum(dim=1) == 1).all()
    assert torch.equal(only_highest.argmax(dim=1), losses.argmax(dim=1))


def test_dropping_is_deterministic_given_a_generator() -> None:
    losses = _losses(256, 3)
    dropping = TeacherDropping()
    first = dropping(losses, generator=_gen(7))
    assert torch.equal(first, dropping(losses, generator=_gen(7)))
    assert not torch.equal(first, dropping(losses, generator=_gen(8)))


def test_draws_are_one_rand_of_shape_b_by_n_whatever_the_mask() -> None:
    """The loop relies on this to give each DDP rank its slice of the global batch's draws."""
    losses = _losses(8, 3)
    present = torch.rand(8, 3, generator=_gen(5)) > 0.5
    full = TeacherDropping().coefficients(losses, generator=_gen(1))
    generator = _gen(1)
    torch.rand(4 * 3, generator=generator)  # skip the first 4 images' draws
    second_half = TeacherDropping().coefficients(losses[4:], generator=generator)
    assert torch.equal(second_half, full[4:])
    used = _gen(1)
    TeacherDropping().coefficients(losses, present, generator=used)
    expected = _gen(1)
    torch.rand(8, 3, generator=expected)
    assert torch.equal(used.get_state(), expected.get_state())


def test_ranks_draw_their_slice_of_the_global_batch_and_stay_in_step() -> None:
    """Two ranks of 4 images each drop what one process drops for the 8, call after call, and
    every generator ends each call in the same state (what a DDP run relies on)."""
    one = TeacherDropping(seed=3)
    ranks = [TeacherDropping(seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        losses = _losses(8, 3, seed=step)
        full = one.coefficients(losses)
        halves = [ranks[r].coefficients(losses[4 * r : 4 * r + 4]) for r in range(2)]
        assert torch.equal(torch.cat(halves), full), step
        for rank in ranks:
            assert torch.equal(rank.rng_state(), one.rng_state())
    with pytest.raises(ConfigError, match="teacher_dropping.rank"):
        TeacherDropping(rank=2, world_size=2)


def test_rng_state_resumes_the_draws_exactly() -> None:
    losses = _losses(16, 3)
    dropping = TeacherDropping(seed=11)
    dropping.coefficients(losses)
    saved = dropping.rng_state()
    expected = dropping.coefficients(losses)
    resumed = TeacherDropping(seed=0)
    resumed.set_rng_state(saved)
    assert torch.equal(resumed.coefficients(losses), expected)
    assert not torch.equal(TeacherDropping(seed=0).coefficients(losses), expected)


def test_coefficients_are_normalised_by_their_total() -> None:
    losses = _losses(32, 3)
    dropping = TeacherDropping()
    raw = dropping.coefficients(losses, generator=_gen())
    coeffs = dropping(losses, generator=_gen())
    assert coeffs.sum().item() == pytest.approx(1.0)
    assert torch.allclose(coeffs, raw / raw.sum())
    assert not coeffs.requires_grad
    # The total loss is then the mean of the kept losses.
    assert total_loss(losses, coeffs).item() == pytest.approx(losses[raw > 0].mean().item())


def test_missing_teachers_never_get_a_coefficient() -> None:
    losses = _losses(N_IMAGES, 3)
    present = torch.rand(N_IMAGES, 3, generator=_gen(3)) > 0.4
    present[:10] = False  # some images have no teacher at all
    losses[~present] = float("inf")  # an absent teacher's garbage must not win the argmax
    raw = TeacherDropping().coefficients(losses, present, generator=_gen())
    assert (raw[~present] == 0).all()
    assert (raw[:10] == 0).all()
    # Every image with some teacher keeps its highest-loss *present* teacher.
    candidates = losses.masked_fill(~present, float("-inf"))
    has_teacher = present.any(dim=1)
    highest = candidates.argmax(dim=1)
    assert (raw[has_teacher, highest[has_teacher]] == 1).all()
    coeffs = normalize_coefficients(raw)
    assert torch.isfinite(coeffs).all() and coeffs.sum().item() == pytest.approx(1.0)
    losses_nan = losses.masked_fill(~present, float("nan")).requires_grad_(True)
    loss = total_loss(losses_nan, coeffs)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(losses_nan.grad).all()
    assert (losses_nan.grad[~present] == 0).all()


def test_a_batch_with_no_teacher_present_gives_zeros() -> None:
    losses = torch.full((5, 3), float("nan"))
    coeffs = TeacherDropping()(losses, torch.zeros(5, 3, dtype=torch.bool), generator=_gen())
    assert torch.equal(coeffs, torch.zeros(5, 3))
    assert total_loss(losses, coeffs).item() == 0.0


def test_none_keeps_every_present_teacher() -> None:
    present = torch.tensor([[True, True], [True, False]])
    coeffs = TeacherDropping("none")(_losses(2, 2), present)
    assert torch.allclose(coeffs, present.float() / 3)


DOMAINS = ("2d", "3d", "human")  # teacher columns: dinov2, mast3r, multihmr
SAMPLES = ["2d", "3d", "human", "3d"]


def test_own_data_keeps_the_teacher_of_the_image_domain() -> None:
    dropping = TeacherDropping("own_data", teacher_domains=DOMAINS)
    raw = dropping.coefficients(_losses(4, 3), sample_domains=SAMPLES)
    assert torch.equal(raw, torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]]).float())
    # Own teacher without features for that image: the image contributes nothing.
    present = torch.ones(4, 3, dtype=torch.bool)
    present[1, 1] = False
    masked = dropping.coefficients(_losses(4, 3), present, sample_domains=SAMPLES)
    assert masked[1].sum() == 0 and masked.sum() == 3


def test_own_plus_generic_data_gives_generic_images_to_every_teacher() -> None:
    dropping = TeacherDropping("own+generic_data", teacher_domains=DOMAINS, generic_domain="2d")
    raw = dropping.coefficients(_losses(4, 3), sample_domains=SAMPLES)
    assert torch.equal(raw, torch.tensor([[1, 1, 1], [0, 1, 0], [0, 0, 1], [0, 1, 0]]).float())
    coeffs = dropping(_losses(4, 3), sample_domains=SAMPLES)
    assert torch.allclose(coeffs, raw / 6)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="teacher_dropping.strategy"):
        TeacherDropping("random")
    with pytest.raises(ConfigError, match="teacher_dropping.p"):
        TeacherDropping(p=1.5)
    with pytest.raises(ConfigError, match="teacher_domains"):
        TeacherDropping("own_data")
    with pytest.raises(ConfigError, match="generic_domain"):
        TeacherDropping("own+generic_data", teacher_domains=DOMAINS)
    with pytest.raises(ConfigError, match="generic_domain"):
        TeacherDropping("own+generic_data", teacher_domains=DOMAINS, generic_domain="video")
    dropping = TeacherDropping("own_data", teacher_domains=DOMAINS)
    with pytest.raises(ConfigError, match="belong to no teacher"):
        dropping.coefficients(_losses(2, 3), sample_domains=["2d", "audio"])
    with pytest.raises(ValueError, match="domain of each"):
        dropping.coefficients(_losses(2, 3))
    with pytest.raises(ConfigError, match="3 teachers"):
        TeacherDropping("own_data", teacher_domains=DOMAINS[:2]).coefficients(
            _losses(4, 3), sample_domains=SAMPLES
        )
    with pytest.raises(ValueError, match="presence mask"):
        TeacherDropping()(_losses(2, 3), torch.ones(2, 2, dtype=torch.bool))


def _rank_main(rank: int, port: int, raw: torch.Tensor, losses: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        share = slice(rank * 3, rank * 3 + 3)
        coeffs = normalize_coefficients(raw[share], across_ranks=True)
        torch.save(total_loss(losses[share], coeffs), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_across_ranks_normalisation_matches_one_process(tmp_path: Path) -> None:
    """DDP averages the ranks' losses; with the global total they average to the 1-process loss."""
    raw = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 0], [0, 0], [1, 0]]).float()  # 4 vs 2 kept
    losses = _losses(6, 2)
    expected = total_loss(losses, normalize_coefficients(raw))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(port, raw, losses, str(tmp_path)), nprocs=2, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ((per_rank[0] + per_rank[1]) / 2).item() == pytest.approx(expected.item())
    # Per-rank normalisation (the reference's) would weigh the ranks' images unequally here.
    local = [
        total_loss(losses[s], normalize_coefficients(raw[s])) for s in (slice(0, 3), slice(3, 6))
    ]
    assert ((local[0] + local[1]) / 2).item() != pytest.approx(expected.item())
