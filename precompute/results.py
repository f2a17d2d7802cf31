"""What a build did, and how it is shown: per-pair totals, end-of-build tables, live progress."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from precompute.plan import BuildPlan


@dataclass
class PairTotals:
    """What this run wrote for one (teacher, dataset) pair."""

    samples: int = 0
    skipped: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


@dataclass
class BuildSummary:
    """The outcome of `build_cache`: per-pair totals of this run and the cache's state."""

    plan: BuildPlan
    pairs: dict[tuple[str, str], PairTotals] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset -> reason -> n
    cache_bytes: int = 0
    seconds: float = 0.0


class _RateColumn(ProgressColumn):
    """Teacher input images (views) per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "- img/s", style="cyan")


def progress_display(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
        _RateColumn(), TextColumn("{task.fields[mb]:.2f} MB"), TimeRemainingColumn(),
        TextColumn("skipped {task.fields[skipped]}"), console=console,
    )




def summary_tables(summary: BuildSummary) -> list[Table]:
    """The end-of-build tables: per (teacher, dataset) this run, and skips per dataset."""
    run = Table(title="written this run")
    for column in ("teacher", "dataset", "samples", "skipped", "MB", "seconds", "img/s"):
        run.add_column(column, justify="left" if column in ("teacher", "dataset") else "right")
    for (teacher, dataset), t in summary.pairs.items():
        rate = t.samples / t.seconds if t.seconds else 0.0
        run.add_row(teacher, dataset, str(t.samples), str(t.skipped),
                    f"{t.bytes_written / 1e6:.1f}", f"{t.seconds:.1f}", f"{rate:.1f}")
    skips = Table(title="images per dataset")
    for column in ("dataset", "images", "skipped images", "reasons"):
        skips.add_column(column, justify="left" if column in ("dataset", "reasons") else "right")
    views = summary.plan.config.views_per_image
    for name, d in summary.plan.datasets.items():
        reasons = summary.skipped.get(name, {})
        skipped = sum(reasons.values()) // views
        skips.add_row(name, str(d.num_images), str(skipped),
                      ", ".join(f"{r} {n // views}" for r, n in sorted(reasons.items())) or "-")
    return [run, skips] if summary.pairs else [skips]
