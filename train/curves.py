"""Loss curves: one PNG per teacher, drawn with PIL from the rows of `metrics.jsonl`.

The training loss is a blue line, the held-out loss red dots; no plotting library is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from train.metrics import series


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
