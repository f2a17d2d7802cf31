"""Teacher dropping: which teachers' losses count for each image, as coefficients [B, n].

Strategies (UNIC / DUNE):
- `lowest_loss` (default, p = 0.5): per image, the teacher with the highest loss is always kept
  and every other teacher is dropped with probability p, so the student spends its capacity
  where it lags most without forgetting the others.
- `own_data`: an image only trains the teacher(s) whose domain it comes from.
- `own+generic_data`: as `own_data`, except that images of the *generic* domain train every
  teacher. As in the reference, the generic domain is the one of the DINOv2 teacher (generic
  web/2D images); here it is named explicitly with `generic_domain`.
- `none`: every teacher counts for every image.

On top of the strategy, a presence mask [B, n] says which teachers have features for which
image; an absent teacher never gets a coefficient. The 0/1 coefficients are then divided by
their total over the batch (the reference's normalisation), so every kept (image, teacher)
pair weighs the same and the loss scale does not depend on how many were dropped. A batch
where nothing is kept yields all-zero coefficients, not NaN.

Randomness: a `TeacherDropping` owns its generator (seeded with `seed`, saved and restored with
`rng_state` / `set_rng_state`, so a resumed run draws what the uninterrupted one drew). It
draws for the *global* batch: given `rank` and `world_size`, each process keeps its own slice of
the draws and skips the others', so N processes drop exactly what one process would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from cache_format.errors import BatchMismatchError, ConfigError
from cache_format.serde import check_choice

DROPPING_STRATEGIES = ("lowest_loss", "own_data", "own+generic_data", "none")


def check_dropping(strategy: str, p: float, field: str = "dropping") -> None:
    """ConfigError unless `strategy` is a strategy and `p` a probability; `field` is the config
    table the message names (`dropping` in a run's config)."""
    check_choice(strategy, DROPPING_STRATEGIES, f"{field}.strategy")
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{field}.p: expected a probability in [0, 1], found {p}")


class TeacherDropping:
    """Per-sample per-teacher loss coefficients from the detached losses and a presence mask.

    `teacher_domains[t]` is the domain of teacher t (same order as the loss columns); it is
    required by the `own*` strategies, as is `generic_domain` by `own+generic_data`.
    `across_ranks=True` normalises by the total over all DDP ranks (times the world size, which
    DDP's gradient averaging divides back out), so that N processes match one process with the
    same global batch; the reference normalises per rank (the default).

    Randomness: `lowest_loss` draws one uniform number per (image, teacher) of the global batch
    per call, row-major, whatever the losses and the mask, from `generator` if one is given,
    else from its own (seeded with `seed`). This process, rank `rank` of `world_size`, keeps
    the draws of its rows (every rank holds the same number of rows) and skips the other
    ranks', so every rank's generator ends each call where one process's would.
    """

    def __init__(
        self,
        strategy: str = "lowest_loss",
        p: float = 0.5,
        teacher_domains: Sequence[str | None] = (),
        generic_domain: str | None = None,
        across_ranks: bool = False,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_dropping(strategy, p, field="teacher_dropping")
        if not 0 <= rank < world_size:
            raise ConfigError(
                f"teacher_dropping.rank: expected a rank in [0, {world_size}), found {rank}"
            )
        if strategy in ("own_data", "own+generic_data") and not teacher_domains:
            raise ConfigError(
                f"teacher_dropping.teacher_domains: strategy {strategy!r} needs each teacher's "
                "domain; give one domain name per teacher, in the loss columns' order"
            )
        if strategy == "own+generic_data":
            if generic_domain is None:
                raise ConfigError(
                    "teacher_dropping.generic_domain: strategy 'own+generic_data' needs the "
                    "domain whose images train every teacher (the DINOv2 teacher's domain in "
                    "the reference)"
                )
            if generic_domain not in teacher_domains:
                raise ConfigError(
                    f"teacher_dropping.generic_domain: {generic_domain!r} is not the domain of "
                    f"any teacher ({list(teacher_domains)})"
                )
        self.strategy = strategy
        self.p = p
        self.teacher_domains = tuple(teacher_domains)
        self.generic_domain = generic_domain
        self.across_ranks = across_ranks
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def rng_state(self) -> Tensor:
        """The own generator's state (what a checkpoint keeps for an exact resume)."""
        return self.generator.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        """Restore what `rng_state` returned."""
        self.generator.set_state(state)

    def __repr__(self) -> str:
        return (
            f"TeacherDropping(strategy={self.strategy!r}, p={self.p}, "
            f"teacher_domains={self.teacher_domains}, generic_domain={self.generic_domain!r})"
        )

    def __call__(
        self,
        losses: Tensor,
        present: Tensor | None = None,
        sample_domains: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Normalised coefficients [B, n] (float32, no gradient); see `coefficients`.

        `generator`: draw from it instead of the own generator (tests that replay draws).
        """
        return normalize_coefficients(
            self.coefficients(losses, present, sample_domains, generator), self.across_ranks
        )

    @torch.no_grad()
    def coefficients(
        self,
        losses: Tensor,
        present: Tensor | None = None,
        sample_domains: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Unnormalised 0/1 coefficients [B, n].

        `losses` [B, n] per-sample per-teacher losses (only read by `lowest_loss`; entries of
        absent teachers may hold anything); `present` [B, n] bool (all present if omitted);
        `sample_domains` the domain of each image (needed by the `own*` strategies).
        """
        if losses.ndim != 2:
            raise BatchMismatchError(
                f"TeacherDropping: losses must be [B, n_teachers], found {tuple(losses.shape)}"
            )
        batch, n_teachers = losses.shape
        if present is None:
            present = torch.ones(batch, n_teachers, dtype=torch.bool, device=losses.device)
        present = present.to(device=losses.device, dtype=torch.bool)
        if present.shape != losses.shape:
            raise BatchMismatchError(
                f"TeacherDropping: presence mask {tuple(present.shape)} does not match losses "
                f"{tuple(losses.shape)}"
            )

        if self.strategy == "none":
            keep = torch.ones_like(present)
        elif self.strategy == "lowest_loss":
            keep = self._keep_highest_loss(losses.detach(), present, generator)
        else:
            keep = self._keep_own_domain(batch, n_teachers, sample_domains, losses.device)
        return (keep & present).float()

    def _keep_highest_loss(
        self, losses: Tensor, present: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        # An absent teacher can never be the one kept for sure, whatever its (garbage) loss.
        candidates = losses.float().masked_fill(~present, float("-inf"))
        highest = torch.zeros_like(present)
        highest.scatter_(1, candidates.argmax(dim=1, keepdim=True), True)
        draws = self._draws(losses.shape, generator or self.generator).to(losses.device)
        return highest | (draws >= self.p)

    def _draws(self, shape: torch.Size, generator: torch.Generator) -> Tensor:
        """This rank's rows of one draw per (image, teacher) of the global batch.

        One draw even for the kept teacher: the generator advances by the same amount every
        call, whatever the losses, which keeps resumed runs identical.
        """
        per_rank = shape[0] * shape[1]
        before, after = self.rank * per_rank, (self.world_size - self.rank - 1) * per_rank
        if before:
            torch.rand(before, generator=generator, device=generator.device)
        draws = torch.rand(shape, generator=generator, device=generator.device)
        if after:
            torch.rand(after, generator=generator, device=generator.device)
        return draws

    def _keep_own_domain(
        self,
        batch: int,
        n_teachers: int,
        sample_domains: Sequence[str] | None,
        device: torch.device,
    ) -> Tensor:
        if len(self.teacher_domains) != n_teachers:
            raise ConfigError(
                f"teacher_dropping.teacher_domains: {len(self.teacher_domains)} domains for "
                f"{n_teachers} teachers; give one domain per loss column"
            )
        if sample_domains is None or len(sample_domains) != batch:
            found = "none" if sample_domains is None else len(sample_domains)
            raise BatchMismatchError(
                f"TeacherDropping({self.strategy}): needs the domain of each of the {batch} "
                f"images, found {found}"
            )
        unknown = sorted(set(sample_domains) - set(self.teacher_domains))
        if unknown:
            raise ConfigError(
                f"teacher_dropping: image domain(s) {unknown} belong to no teacher (teacher "
                f"domains: {list(self.teacher_domains)}); fix the datasets' domain names"
            )
        keep = [
            [
                own == teacher_domain
                or (self.strategy == "own+generic_data" and own == self.generic_domain)
                for teacher_domain in self.teacher_domains
            ]
            for own in sample_domains
        ]
        return torch.tensor(keep, dtype=torch.bool, device=device).view(batch, n_teachers)


def normalize_coefficients(coeffs: Tensor, across_ranks: bool = False) -> Tensor:
    """Divide coefficients by their total over the batch; all-zero stays all-zero (no NaN).

    With `across_ranks` (and a process group up) the total is summed over every rank and the
    result multiplied by the world size, to cancel DDP's averaging of gradients.
    """
    coeffs = coeffs.detach().float()
    total = coeffs.sum()
    scale = 1.0
    if across_ranks and dist.is_available() and dist.is_initialized():
        total = total.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        scale = float(dist.get_world_size())
    # An empty batch (nothing kept anywhere) gives zeros, not 0 / 0.
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, coeffs * scale / safe_total, torch.zeros_like(coeffs))
