"""Shared by the benchmarks: describe the machine and replace one section of docs/benchmarks.md.

Each benchmark owns one section between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers, so
benchmarks run at different times (and on different machines) never overwrite each other.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"


def machine_description() -> str:
    """One line naming the CPU (or GPU), core count, memory, torch version and git commit."""
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        # Hosts named alike differ in vector units, which move CPU rates by tens of percent
        # (the crc32c pass, the student's matmuls): name the widest one.
        flags = next((set(line.split(":", 1)[1].split()) for line in info
                      if line.startswith("flags")), set())
        names = {"avx512f": "AVX-512", "avx2": "AVX2", "sse4_2": "SSE4.2"}
        widest = next((name for flag, name in names.items() if flag in flags), None)
        if widest:
            cpu += f" ({widest})"
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip() or "uncommitted"
        # Benchmarks often run before their change is committed: say so rather than name a
        # commit whose code did not run.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py", "*.toml"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()
        if dirty:
            commit += " with uncommitted changes"
    except OSError:
        commit = "unknown"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {gpu}, torch {torch.__version__}, "
        f"commit {commit}, {_dt.date.today().isoformat()}"
    )


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section `name` of docs/benchmarks.md with `body`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
