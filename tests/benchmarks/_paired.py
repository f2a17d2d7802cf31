"""Paired comparisons of students: the statistics bench_encodings.py judges encodings by.

Two students of one seed start from the same weights and see the same batches; they differ
only through their targets. Their relative held-out loss difference is one paired observation,
and the mean over seeds gets a 95% Student-t interval. Measured here (docs/benchmarks.md): a
target change in the 5th digit (int8) already sends training down another path, so one paired
difference carries about as much noise as two unpaired seeds, and only many seeds pin a 1%
effect.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: Two-sided 95% quantiles of Student's t by degrees of freedom (no scipy in the environment).
#: A df between two keys takes the smaller key's (larger) quantile: conservative.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042,
       40: 2.021, 60: 2.000, 120: 1.980}


def t95(df: int) -> float:
    """The two-sided 95% t quantile for `df` degrees of freedom (rounded down to a table key)."""
    return T95[max(k for k in T95 if k <= df)]


@dataclasses.dataclass(frozen=True)
class Paired:
    """Per-seed relative differences of one encoding's student against the fp16 student of the
    same seed, and their summary."""

    diffs: np.ndarray  # loss_enc / loss_fp16 - 1, one per seed
    cos_diffs: np.ndarray  # mean held-out cosine, enc - fp16, one per seed

    @property
    def mean(self) -> float:
        return float(self.diffs.mean())

    @property
    def sd(self) -> float:
        return float(self.diffs.std(ddof=1)) if len(self.diffs) > 1 else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% t interval of the mean paired difference."""
        n = len(self.diffs)
        half = t95(n - 1) * self.sd / np.sqrt(n) if n > 1 else float("inf")
        return self.mean - half, self.mean + half

    def within(self, goal: float) -> str:
        """Two-sided: "within" when the whole interval lies inside +-goal, "outside" when it
        lies wholly beyond it, "cannot tell" when it straddles a bound."""
        low, high = self.interval
        if -goal <= low and high <= goal:
            return "within"
        if high < -goal or low > goal:
            return "outside"
        return "cannot tell"

    def no_worse(self, goal: float) -> str:
        """One-sided (non-inferiority): "yes" when the interval's upper end is at most +goal
        (the student is at most `goal` worse), "no" when its lower end is above +goal, else
        "cannot tell". The upper end of the two-sided 95% interval: a 97.5% one-sided bound."""
        low, high = self.interval
        if high <= goal:
            return "yes"
        if low > goal:
            return "no"
        return "cannot tell"


def paired(losses: dict[int, float], base: dict[int, float], coses: dict[int, float],
           base_coses: dict[int, float]) -> Paired:
    """`Paired` over the seeds both students were trained with: held-out losses and mean
    held-out cosines by seed, of the encoding's students and of the fp16 students."""
    seeds = sorted(set(losses) & set(base))
    return Paired(np.array([losses[s] / base[s] - 1 for s in seeds]),
                  np.array([coses[s] - base_coses[s] for s in seeds]))


def pct(x: float) -> str:
    """A relative difference as a signed percentage."""
    return f"{100 * x:+.2f}%"


def goal_statement(small: dict[str, Paired], goal_text: str, goal: float) -> str:
    """The plain verdict on the issue's goal, from the paired intervals of the encodings small
    enough to count. Two readings, both stated: "within" (the whole interval inside +-goal,
    the issue's words read literally) and "no worse" (the interval's upper end at most +goal:
    what a user of the cache cares about; a student better by more than 1% is not a loss)."""
    detail = "; ".join(
        f"{n}: mean {pct(p.mean)}, 95% interval [{pct(p.interval[0])}, {pct(p.interval[1])}]"
        for n, p in small.items())
    within = [n for n, p in small.items() if p.within(goal) == "within"]
    no_worse = [n for n, p in small.items() if p.no_worse(goal) == "yes"]
    worse = [n for n, p in small.items() if p.no_worse(goal) == "no"]
    if within:
        return (f"**Goal met** ({goal_text}) by {', '.join(within)}: the whole 95% interval of "
                f"the paired difference lies inside +-{100 * goal:.0f}% ({detail}).")
    if no_worse:
        return (f"**Goal met in the reading that matters, not literally** ({goal_text}): "
                f"{', '.join(no_worse)} is shown no more than {100 * goal:.0f}% worse (the "
                f"interval's upper end is at most +{100 * goal:.0f}%), but its interval reaches "
                f"below -{100 * goal:.0f}%, so 'within {100 * goal:.0f}%' read two-sided is not "
                f"shown ({detail}).")
    if len(worse) == len(small):
        return (f"**Goal not met** ({goal_text}): every small encoding's student is more than "
                f"{100 * goal:.0f}% worse ({detail}).")
    return (f"**Cannot tell** whether the goal ({goal_text}) is met: every interval straddles "
            f"+{100 * goal:.0f}% ({detail}); more seeds would narrow it.")
