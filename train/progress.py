"""The live progress display of the main process: a rich bar, plain lines, or nothing.

- "bar" (a terminal): one rich progress bar with steps done, images/s, elapsed time, ETA and
  each teacher's last training loss.
- "lines" (no terminal: batch jobs, `| tee`, CI): plain `key=value` lines, 20 per run and at
  least one a minute, that `grep`/`awk` or a log shipper parse without this code, e.g.
  `progress step=40 total=400 img_per_s=812.3 eta_s=118 lr=0.0003 loss=0.4211 loss/dinov2=0.39`.
- "off": nothing (tests, other ranks).
`metrics.jsonl` remains the record; this display only shows it as it is written.
"""

from __future__ import annotations

import time

LINES_PER_RUN = 20
MAX_SILENCE_S = 60.0


class LiveProgress:
    """Progress of the main process: a rich bar ("bar"), plain lines ("lines", when the output
    is not a terminal), or nothing ("off")."""

    def __init__(self, mode: str, total: int, start: int) -> None:
        self.mode, self.total, self.start, self.progress = mode, total, start, None
        self.every = max(1, total // LINES_PER_RUN)
        self.began = self.last_line = time.monotonic()
        if mode != "bar":
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=total, completed=start, info="", rate=""
        )

    def update(self, step: int, rate: float, logged: dict[str, float]) -> None:
        """Show step `step` with images/s and each logged loss."""
        if self.mode == "off":
            return
        losses = {k: v for k, v in logged.items() if k.startswith("loss")}
        if self.progress is not None:
            info = "  ".join(f"{k.removeprefix('loss/')}={v:.4f}" for k, v in losses.items())
            self.progress.update(self.task, completed=step, info=info, rate=f"{rate:.1f} img/s")
            return
        now = time.monotonic()
        due = step % self.every == 0 or step == self.total
        if not due and now - self.last_line < MAX_SILENCE_S:
            return
        self.last_line = now
        print(progress_line(step, self.total, rate, self.eta_s(step, now), logged), flush=True)

    def eta_s(self, step: int, now: float) -> float | None:
        """Seconds left at the pace of the steps done since this display started."""
        done = step - self.start
        if done <= 0:
            return None
        return (self.total - step) * (now - self.began) / done

    def close(self) -> None:
        """Stop the live display."""
        if self.progress is not None:
            self.progress.stop()


def progress_line(
    step: int, total: int, rate: float, eta_s: float | None, logged: dict[str, float]
) -> str:
    """One plain `key=value` line (no spaces inside values; teacher names have none)."""
    parts = [f"step={step}", f"total={total}", f"img_per_s={rate:.1f}"]
    parts.append(f"eta_s={eta_s:.0f}" if eta_s is not None else "eta_s=nan")
    parts += [f"{k}={v:.6g}" for k, v in logged.items()]
    return "progress " + " ".join(parts)
