"""How a manifest differs from what a caller expects: `FieldDifference` (one dotted field, the
expected and the found value) and `compare_fields`, the recursive comparison of JSON-like
values that `Manifest.differences` runs field by field (its own module: the resume check,
the pre-flight and `dune-train eval` report the same differences the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldDifference:
    """One manifest field that differs: its dotted path, the expected and the found value."""

    path: str
    expected: Any
    found: Any
    missing_entry: bool = False  # a named teacher / dataset the cache does not hold
    note: str = ""

    def __str__(self) -> str:
        if self.missing_entry:
            return f"cache manifest {self.path}: expected present, found absent{self.note}"
        return f"cache manifest field {self.path}: expected {self.expected!r}, found {self.found!r}"


def compare_fields(path: str, expected: Any, found: Any, out: list[FieldDifference]) -> None:
    """Recursive equality of JSON-like values; appends each innermost differing key to `out`."""
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in sorted(set(expected) | set(found)):
            if key not in found or key not in expected:
                out.append(FieldDifference(f"{path}.{key}", expected.get(key, "<absent>"),
                                           found.get(key, "<absent>")))
            else:
                compare_fields(f"{path}.{key}", expected[key], found[key], out)
        return
    if isinstance(expected, list | tuple) and isinstance(found, list | tuple):
        if not _equal(expected, found):
            out.append(FieldDifference(path, list(expected), list(found)))
        return
    if not _equal(expected, found):
        out.append(FieldDifference(path, expected, found))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)
