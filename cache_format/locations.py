"""What a location string is: a local path or a URL, and how a local one is made absolute.

Caches, dataset roots and checkpoints may be local paths or fsspec URLs (`s3://bucket/cache`,
`memory://x`, `file:///data/cache`). Every module that must tell them apart asks here, so that
the rule (a URL starts with `scheme://`; `file://` names a local path) exists once.
"""

from __future__ import annotations

import os
import re

# RFC 3986 scheme: a letter, then letters, digits, '+', '-' or '.'; followed by "://".
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location: str) -> bool:
    """True for `scheme://...` (including `file://`), False for a plain local path."""
    return bool(_URL_RE.match(location))


def local_path(location: str) -> str | None:
    """The absolute local path of a plain path or a `file://` URL; None for any other URL."""
    if location.startswith("file://"):
        return os.path.abspath(location.removeprefix("file://"))
    if is_url(location):
        return None
    return os.path.abspath(location)


def absolute_path(path: str, base: str | os.PathLike[str] | None = None) -> str:
    """`path` made absolute against `base` (default: the current directory), `~` expanded.

    URLs and the empty string ("not set") pass through unchanged. Symlinks are kept as written
    (the path is normalized, not resolved), so a config stores the path its user gave.
    """
    if not path or is_url(path):
        return path
    expanded = os.path.expanduser(path)
    if not os.path.isabs(expanded):
        expanded = os.path.join(os.fspath(base) if base is not None else os.getcwd(), expanded)
    return os.path.normpath(expanded)
