"""Loss curves drawn with matplotlib from the rows of `metrics.jsonl` (the source of truth).

`draw_loss_curves` writes into the run's `curves/` folder:
- `losses.png`: one figure for the whole run: left, every teacher's training loss (line) and
  held-out loss (dashed, dots) on a log scale, one colour per teacher; right, every teacher's
  held-out cosine. Stage boundaries (rows carrying a `stage` field) are drawn as vertical lines.
- `loss_<teacher>.png`: the same two panels for one teacher.
Figures are built with `matplotlib.figure.Figure` and its Agg canvas (no pyplot), so drawing
never touches a display or matplotlib's global backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from train.metrics import series

ALL_TEACHERS_FILE = "losses.png"


def draw_loss_curves(
    rows: list[dict[str, Any]], teachers: list[str], out_dir: str | Path
) -> list[Path]:
    """Write `losses.png` (every teacher) and `loss_<teacher>.png`; returns their paths, the
    all-teacher figure first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [_save(loss_figure(rows, teachers), out / ALL_TEACHERS_FILE)]
    for teacher in teachers:
        written.append(_save(loss_figure(rows, [teacher]), out / f"loss_{teacher}.png"))
    return written


def loss_figure(rows: list[dict[str, Any]], teachers: list[str]) -> Figure:
    """Two panels: train and held-out loss per teacher (log scale), held-out cosine per teacher."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, cos_ax = figure.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(teachers))]
    for teacher, color in zip(teachers, colors, strict=True):
        train = _positive(series(rows, f"loss/{teacher}"))
        heldout = _positive(series(rows, f"heldout/loss/{teacher}", kind="eval"))
        if train:
            loss_ax.plot(*zip(*train, strict=True), color=color, lw=1.5, label=f"{teacher} train")
        if heldout:
            loss_ax.plot(*zip(*heldout, strict=True), color=color, ls="--", marker="o", ms=4,
                         label=f"{teacher} held-out")
        cosine = series(rows, f"heldout/cos/{teacher}", kind="eval")
        if cosine:
            cos_ax.plot(*zip(*cosine, strict=True), color=color, marker="o", ms=4, label=teacher)
    loss_ax.set(title="loss (train: line, held-out: dashed)", xlabel="step", ylabel="loss")
    cos_ax.set(title="held-out cosine (projected student vs teacher)", xlabel="step",
               ylabel="cosine")
    for ax, log in ((loss_ax, True), (cos_ax, False)):
        if ax.lines:
            if log:
                ax.set_yscale("log")
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
        for step in stage_starts(rows):
            ax.axvline(step, color="gray", lw=0.8, ls=":")
    return figure


def stage_starts(rows: list[dict[str, Any]]) -> list[int]:
    """Steps where a new stage begins (rows with a `stage` field; none without)."""
    starts, last = [], None
    for row in rows:
        stage = row.get("stage")
        if stage is not None and last is not None and stage != last:
            starts.append(int(row["step"]))
        last = stage if stage is not None else last
    return starts


def _positive(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Points a log axis can show (finite and > 0)."""
    return [(s, v) for s, v in points if v > 0 and v != float("inf")]


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    return path
