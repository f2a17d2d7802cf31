"""The reliability suite's table: docs/reliability.md is written here, never by hand.

Every test in tests/reliability/ is a scenario: its docstring's first paragraph says what is done to
the cache and what must happen. At the end of a session that ran every test file of this folder
(and deselected none of its tests), the scenarios, their trials and their outcomes are written
to docs/reliability.md. A test may add `trials` (an int) and `detail` (a short text) with
pytest's `record_property`; otherwise a test counts one trial per parametrized case.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TABLE = HERE.parents[1] / "docs" / "reliability.md"
_ROWS: dict[str, dict] = {}
_DESELECTED: list[str] = []


def _function_of(item: pytest.Item) -> tuple[str, str]:
    """(file, function name) of a test item, parametrization stripped."""
    path = Path(str(item.path)).name
    return path, getattr(item, "originalname", item.name)


def _scenario(item: pytest.Item) -> str:
    """The first paragraph of the test's docstring, on one line (else the test's name)."""
    doc = (getattr(item, "function", None).__doc__ or "").strip()  # type: ignore[union-attr]
    if not doc:
        return item.name.replace("_", " ")
    return " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())


def pytest_deselected(items: list[pytest.Item]) -> None:
    _DESELECTED.extend(str(i.path) for i in items if HERE in Path(str(i.path)).parents)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if HERE not in Path(str(item.path)).parents:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        file, name = _function_of(item)
        row = _ROWS.setdefault(f"{file}::{name}", {
            "file": file, "name": name, "scenario": _scenario(item), "cases": 0,
            "trials": 0, "outcomes": defaultdict(int), "details": []})
        props = dict(report.user_properties)
        row["cases"] += 1
        row["trials"] += int(props.get("trials", 1))
        row["outcomes"][report.outcome] += 1
        if "detail" in props:
            row["details"].append(str(props["detail"]))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    files = {p.name for p in HERE.glob("test_*.py")}
    ran = {row["file"] for row in _ROWS.values()}
    if not _ROWS or _DESELECTED or ran != files:
        return  # a partial run would write a partial table
    lines = [
        "# Reliability: what the suite does to a cache, and what happens",
        "",
        "Written by `tests/reliability/conftest.py` at the end of every run of the whole "
        "reliability suite (`make test` runs it); do not edit by hand. Each row is one test of "
        "`tests/reliability/`: its scenario (the docstring's first paragraph), how many trials it "
        "ran and their outcome.",
        "",
        "| scenario | test | trials | result |",
        "| --- | --- | --- | --- |",
    ]
    for key in sorted(_ROWS):
        row = _ROWS[key]
        outcomes = row["outcomes"]
        if outcomes.get("failed"):
            result = f"FAILED ({outcomes['failed']} of {row['cases']})"
        elif outcomes.get("skipped") and not outcomes.get("passed"):
            result = "skipped"
        else:
            result = "passed"
        if row["details"]:
            result += ": " + "; ".join(row["details"])
        scenario = row["scenario"].replace("|", "\\|")
        lines.append(f"| {scenario} | `{row['file']}::{row['name']}` | {row['trials']} | "
                     f"{result.replace('|', '/')} |")
    TABLE.write_text("\n".join(lines) + "\n", encoding="utf-8")
