"""`dune-heads compare`: one table, encoders x tasks, from head run folders.

Each run folder's `results.json` (heads/fit.py) says which encoder, which data, which task and
the best head's val metrics. Rows are encoders (in the order first seen), columns are
"<task> <data> <metric>" for the metrics each task reports; a cell an encoder has no run for is
empty. The same table is written as JSON (`compare.json`: the columns, the rows, and where each
number came from) and markdown (`compare.md`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from cache_format.errors import ConfigError
from heads.metrics import HIGHER_IS_BETTER

SHORT = {"classification": "cls", "segmentation": "seg", "depth": "depth"}
REPORTED = {"classification": ("top1", "top5"), "segmentation": ("miou", "pixel_acc"),
            "depth": ("rmse", "abs_rel", "delta1")}


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders among `paths`: each path is a run folder or a folder holding run folders."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            runs.append(p)
        elif p.is_dir():
            runs += sorted(r.parent for r in p.rglob("results.json"))
        else:
            raise ConfigError(f"compare: {p} is neither a run folder nor a folder of runs")
    if not runs:
        raise ConfigError(f"compare: no results.json under {paths}",
                          hint="pass the --out folders of `dune-heads fit`")
    return runs


def compare_runs(paths: list[str]) -> dict[str, Any]:
    """The comparison as plain data: columns, rows {encoder, values}, sources."""
    columns: list[str] = []
    rows: dict[str, dict[str, float]] = {}
    sources: dict[str, dict[str, str]] = {}
    for run in find_runs(paths):
        res = json.loads((run / "results.json").read_text())
        encoder, task, data = res["encoder"]["name"], res["task"], res["data"]["name"]
        for metric in REPORTED[task]:
            column = f"{task} {data} {metric}"
            if column not in columns:
                columns.append(column)
            rows.setdefault(encoder, {})[column] = float(res["metrics"][metric])
            sources.setdefault(encoder, {})[column] = str(run)
    return {"columns": columns,
            "rows": [{"encoder": e, "values": v} for e, v in rows.items()],
            "sources": sources,
            "higher_is_better": {c: HIGHER_IS_BETTER[c.rsplit(" ", 1)[1]] for c in columns}}


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def to_markdown(table: dict[str, Any]) -> str:
    """GitHub-flavoured markdown of the comparison."""
    cols = table["columns"]
    arrows = ["↑" if table["higher_is_better"][c] else "↓" for c in cols]
    lines = ["| encoder | " + " | ".join(f"{c} {a}" for c, a in zip(cols, arrows, strict=True))
             + " |", "| --- |" + " --- |" * len(cols)]
    for row in table["rows"]:
        lines.append(f"| {row['encoder']} | "
                     + " | ".join(_cell(row["values"].get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def to_rich(table: dict[str, Any], title: str = "frozen-encoder heads (val)") -> Table:
    """A rich table; the best value of each column in bold."""
    out = Table(title=title)
    out.add_column("encoder", no_wrap=True)
    cols = table["columns"]
    best = {}
    for c in cols:
        values = [r["values"][c] for r in table["rows"] if c in r["values"]]
        best[c] = (max if table["higher_is_better"][c] else min)(values) if values else None
        task, rest = c.split(" ", 1)
        data, metric = rest.rsplit(" ", 1)
        arrow = " ↑" if table["higher_is_better"][c] else " ↓"
        # two short header lines keep the table inside an 80-column terminal
        out.add_column(f"{data}\n{SHORT.get(task, task)} {metric}{arrow}", justify="right")
    for row in table["rows"]:
        cells = []
        for c in cols:
            v = row["values"].get(c)
            text = _cell(v)
            cells.append(f"[bold]{text}[/bold]" if v is not None and v == best[c] else text)
        out.add_row(row["encoder"], *cells)
    return out


def write_comparison(table: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write compare.json and compare.md under `out`; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "compare.json", out / "compare.md"
    json_path.write_text(json.dumps(table, indent=2) + "\n")
    md_path.write_text(to_markdown(table))
    return json_path, md_path
