"""The run's metrics log: `metrics.jsonl`, one JSON object per logged step.

`metrics.jsonl` holds one JSON object per line:
- training rows (`"kind": "train"`): `step`, `epoch`, `lr`, `loss` (the total), one
  `loss/<teacher>` per teacher (that teacher's mean loss over the samples it had, before
  dropping), `images_per_s`, `elapsed_s`;
- held-out rows (`"kind": "eval"`): `step`, `heldout/loss`, `heldout/loss/<teacher>` and
  `heldout/cos/<teacher>` (mean per-token cosine between the projected student and the
  normalized teacher tokens).
Plain lines, so `jq`, pandas (`read_json(lines=True)`) or a CI diff read them without this code.
On resume the rows after the checkpoint's step are dropped: the resumed run writes them again.
Each row then goes to the run's sinks (`train.sinks`: TensorBoard, W&B), never instead of it.
`series` and `first_last` read one metric back (the curves, the CLI's and the demo's summaries);
`train.curves` draws the rows, `train.progress` shows them while training runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from train.sinks import MetricSink

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends rows to `run_dir/metrics.jsonl`; only the main process should own one."""

    def __init__(
        self, run_dir: str | Path, resume_step: int | None = None,
        sinks: Sequence[MetricSink] = (),
    ) -> None:
        self.sinks = list(sinks)
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
        """Append one row and flush it (a killed run keeps every row logged so far), then hand
        it to each sink."""
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, allow_nan=True) + "\n")
        for sink in self.sinks:
            sink.write(row)

    def close(self) -> None:
        """Close the sinks (the JSONL file is closed after every row already)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


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


def first_last(rows: list[dict[str, Any]], key: str, kind: str = "train") -> tuple[float, float]:
    """First and last logged value of a metric (NaN when never logged)."""
    points = series(rows, key, kind)
    return (points[0][1], points[-1][1]) if points else (math.nan, math.nan)
