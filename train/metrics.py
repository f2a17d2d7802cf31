"""The run's metrics: a JSON-lines file, and one loss-curve PNG per teacher drawn with PIL.

`metrics.jsonl` holds one JSON object per line:
- training rows (`"kind": "train"`): `step`, `epoch`, `lr`, `loss` (the total), one
  `loss/<teacher>` per teacher (that teacher's mean loss over the samples it had, before
  dropping), `images_per_s`, `elapsed_s`;
- held-out rows (`"kind": "eval"`): `step`, `heldout/loss`, `heldout/loss/<teacher>` and
  `heldout/cos/<teacher>` (mean per-token cosine between the projected student and the
  normalized teacher tokens).
Plain lines, so `jq`, pandas (`read_json(lines=True)`) or a CI diff read them without this code.
On resume the rows after the checkpoint's step are dropped: the resumed run writes them again.
`LiveProgress` shows the same numbers while training runs (a rich bar, or plain lines).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends rows to `run_dir/metrics.jsonl`; only the main process should own one."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else [
            row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step
        ]
        # Rewrite the file with the rows the checkpoint covers: a killed run may have logged
        # steps past its last checkpoint, which the resumed run is about to redo.
        with self.path.open("w") as handle:
            for row in kept:
                handle.write(json.dumps(row) + "\n")

    def write(self, row: dict[str, Any]) -> None:
        """Append one row and flush it (a killed run keeps every row logged so far)."""
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, allow_nan=True) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a metrics file (a run folder or the file itself); [] if there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: everything before it is good
    return rows


def series(
    rows: Iterable[dict[str, Any]], key: str, kind: str = "train"
) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric from rows of one kind, skipping rows without it."""
    return [
        (int(row["step"]), float(row[key]))
        for row in rows
        if row.get("kind") == kind and key in row and row[key] is not None
    ]


def draw_loss_curves(
    rows: list[dict[str, Any]], teachers: list[str], out_dir: str | Path
) -> list[Path]:
    """Write `loss_<teacher>.png` per teacher (training loss line, held-out loss dots)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for teacher in teachers:
        train_points = series(rows, f"loss/{teacher}")
        eval_points = series(rows, f"heldout/loss/{teacher}", kind="eval")
        path = out / f"loss_{teacher}.png"
        _plot(train_points, eval_points, f"loss/{teacher}", path)
        written.append(path)
    return written


_W, _H = 640, 400
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 28, 40


def _plot(
    line: list[tuple[int, float]], dots: list[tuple[int, float]], title: str, path: Path
) -> None:
    """A minimal line chart: axes, 5 ticks per axis, the line in blue, held-out dots in red."""
    image = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    finite = [(s, v) for s, v in line + dots if math.isfinite(v)]
    draw.text((_LEFT, 6), f"{title}  (blue: train, red: held-out)", fill="black", font=font)
    x0, x1, y0, y1 = _LEFT, _W - _RIGHT, _H - _BOTTOM, _TOP
    draw.rectangle((x0, y1, x1, y0), outline="black")
    if not finite:
        draw.text((x0 + 10, y1 + 10), "no data yet", fill="gray", font=font)
        image.save(path)
        return
    smin, smax = min(s for s, _ in finite), max(s for s, _ in finite)
    vmin, vmax = min(v for _, v in finite), max(v for _, v in finite)
    if smax == smin:
        smax = smin + 1
    if vmax == vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5

    def to_px(step: float, value: float) -> tuple[float, float]:
        px = x0 + (step - smin) / (smax - smin) * (x1 - x0)
        py = y0 - (value - vmin) / (vmax - vmin) * (y0 - y1)
        return px, py

    for i in range(5):
        value = vmin + (vmax - vmin) * i / 4
        _, py = to_px(smin, value)
        draw.line((x0 - 4, py, x0, py), fill="black")
        draw.text((4, py - 6), f"{value:.3g}", fill="black", font=font)
        step = smin + (smax - smin) * i / 4
        px, _ = to_px(step, vmin)
        draw.line((px, y0, px, y0 + 4), fill="black")
        draw.text((px - 12, y0 + 8), f"{step:.0f}", fill="black", font=font)
    draw.text(((x0 + x1) // 2 - 12, _H - 16), "step", fill="black", font=font)
    points = [to_px(s, v) for s, v in line if math.isfinite(v)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    elif points:
        px, py = points[0]
        draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=(31, 119, 180))
    for s, v in dots:
        if math.isfinite(v):
            px, py = to_px(s, v)
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=(214, 39, 40))
    image.save(path)


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
