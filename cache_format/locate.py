"""Finding caches: what is at a path, and every cache under a folder (read-only, no zarr arrays).

A cache is a zarr v3 group whose root metadata (`zarr.json`) holds the manifest attribute; these
helpers look at that document only, so `dune-cache ls` stays fast on folders of large caches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, Literal

import zarr

from cache_format.locations import is_url
from cache_format.manifest import ROOT_ATTR


def probe_cache(path: str) -> Literal["absent", "cache", "other"]:
    """"absent": nothing there (or an empty folder); "cache": a dune-distill cache; "other":
    something that must not be written into (a non-empty folder, a zarr node without the
    manifest). A URL with nothing at it is "absent"."""
    local = not is_url(path)
    if local and (not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))):
        return "absent"
    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.NodeTypeValidationError):
        return "other" if local else "absent"
    return "cache" if ROOT_ATTR in group.attrs else "other"


def find_caches(folder: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, stored manifest as JSON) of every cache under `folder`, sorted by path, without
    looking inside caches (their arrays are not caches)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "zarr.json" not in files:
            continue
        try:
            with open(os.path.join(root, "zarr.json"), encoding="utf-8") as f:
                attrs = json.load(f).get("attributes", {})
        except (OSError, ValueError):
            continue
        if ROOT_ATTR in attrs:
            yield root, attrs[ROOT_ATTR]
            dirs[:] = []
