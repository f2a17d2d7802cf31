"""The live progress display of the main process: a rich bar, plain lines, or nothing."""

from __future__ import annotations


class LiveProgress:
    """Progress of the main process: a rich bar ("bar"), plain lines ("lines", when the output
    is not a terminal), or nothing ("off")."""

    def __init__(self, mode: str, total: int, start: int) -> None:
        self.mode, self.total, self.progress = mode, total, None
        self.every = max(1, total // 20)
        if mode != "bar":
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, rate: float, logged: dict[str, float]) -> None:
        """Show step `step` with images/s and each logged loss (lines: 20 times per run)."""
        quiet_step = self.mode == "lines" and step % self.every and step != self.total
        if self.mode == "off" or quiet_step:
            return
        parts = [f"{rate:.1f} img/s"] + [
            f"{k.removeprefix('loss/')}={v:.4f}" for k, v in logged.items() if k.startswith("loss")
        ]
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info="  ".join(parts))
        else:
            print(f"step {step}/{self.total}  " + "  ".join(parts), flush=True)

    def close(self) -> None:
        """Stop the live display."""
        if self.progress is not None:
            self.progress.stop()
