"""crc32c (Castagnoli, as zarr's `crc32c` codec stores it), from the implementation that is
fastest on the running machine.

A verified random read is one positional read plus one checksum pass over the same bytes, so the
checksum's speed sets how close the reader gets to a bare `pread`. The candidates all compute
the standard CRC-32C (tests check each against zarr's own google-crc32c), but which is fastest
depends on the CPU, so the choice is measured, not fixed:

- `fastcrc` (a dependency): folds with carry-less multiplies (PCLMULQDQ / VPCLMULQDQ on x86,
  PMULL on ARM). About 55 GB/s on one core of a host with AVX-512, but about 14-18 GB/s on this
  project's current machine (AMD EPYC with AVX2 and no AVX-512). Releases the GIL;
- `google` (google-crc32c, zarr's own dependency, always present): the SSE4.2 `crc32`
  instruction on three interleaved streams, about 21-25 GB/s on either host. It releases the
  GIL only for `bytes` of 1 MB or more, so on the reader's buffers it holds it;
- `crc32c` (the ICRAR package, when installed): the SSE4.2 instruction too, releases the GIL.

`crc32c_value` / `crc32c_extend` are the fastest of these on one thread, measured when this
module is first imported (a few hundred microseconds: best of interleaved passes over a 512 KiB
buffer, the size of a small record, so it sits in the L2 cache as a record just read does).
`threaded_crc32c_value` / `threaded_crc32c_extend` are for reader threads that check chunks in
parallel: the fastest implementation that releases the GIL (a GIL-holding one would check one
chunk at a time whatever the thread count). `DUNE_CRC32C=fastcrc|google|crc32c` fixes both
choices, for reproducible benchmarks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import google_crc32c
import numpy as np

from cache_format.errors import ConfigError

#: Anything with the buffer protocol (collections.abc.Buffer needs Python 3.12).
Buffer = Any
#: The environment variable that fixes the implementation (its name, or unset to measure).
ENV_VAR = "DUNE_CRC32C"


class Crc32c(NamedTuple):
    """One implementation: `value(data)`, `extend(crc, data)` (the crc32c of the bytes behind
    `crc` followed by `data`), and whether it releases the GIL on the reader's buffers."""

    name: str
    value: Callable[[Buffer], int]
    extend: Callable[[int, Buffer], int]
    releases_gil: bool


def _available() -> dict[str, Crc32c]:
    """Every implementation installed here, by name."""
    google_value, google_extend = google_crc32c.value, google_crc32c.extend

    # google-crc32c parses its argument as read-only bytes, which refuses buffers that must be
    # released after use (bytearray, memoryview); numpy arrays and bytes pass straight through.
    def google(data: Buffer) -> int:
        try:
            return google_value(data)
        except TypeError:
            return google_value(np.frombuffer(data, np.uint8))

    def google_more(crc: int, data: Buffer) -> int:
        try:
            return google_extend(crc, data)
        except TypeError:
            return google_extend(crc, np.frombuffer(data, np.uint8))

    found = {"google": Crc32c("google", google, google_more, False)}
    try:
        from fastcrc import crc32 as fastcrc32
    except ImportError:  # pragma: no cover - a dependency; platforms without its wheel
        pass
    else:
        iscsi = fastcrc32.iscsi  # CRC-32/ISCSI is CRC-32C

        def fastcrc_extend(crc: int, data: Buffer) -> int:
            return iscsi(data, crc)

        found["fastcrc"] = Crc32c("fastcrc", iscsi, fastcrc_extend, True)
    try:
        from crc32c import crc32c as crc32c_pkg
    except ImportError:
        pass
    else:  # pragma: no cover - not a dependency

        def crc32c_pkg_extend(crc: int, data: Buffer) -> int:
            return crc32c_pkg(data, crc)

        found["crc32c"] = Crc32c("crc32c", crc32c_pkg, crc32c_pkg_extend, True)
    return found


#: Every installed implementation, by name (tests check each one against zarr's).
IMPLEMENTATIONS: dict[str, Crc32c] = _available()


def fastest(candidates: list[Crc32c], nbytes: int = 512 << 10, rounds: int = 5) -> Crc32c:
    """The candidate with the shortest best time over `nbytes` (interleaved rounds, so a
    disturbance on a shared machine hits every candidate alike; only the best pass counts)."""
    if len(candidates) == 1:
        return candidates[0]
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    best = dict.fromkeys(range(len(candidates)), float("inf"))
    for _ in range(rounds):
        for i, impl in enumerate(candidates):
            start = time.perf_counter()
            impl.value(data)
            best[i] = min(best[i], time.perf_counter() - start)
    return candidates[min(best, key=best.__getitem__)]


def choose(env: str | None = None) -> tuple[Crc32c, Crc32c]:
    """(single-thread choice, threaded choice): fixed by `env` (a name in IMPLEMENTATIONS),
    else measured here."""
    if env:
        if env not in IMPLEMENTATIONS:
            raise ConfigError(f"{ENV_VAR}={env!r}: expected one of "
                              f"{sorted(IMPLEMENTATIONS)} (installed), found {env!r}",
                              hint=f"unset {ENV_VAR} to pick the fastest by measurement")
        return IMPLEMENTATIONS[env], IMPLEMENTATIONS[env]
    single = fastest(list(IMPLEMENTATIONS.values()))
    if single.releases_gil:
        return single, single
    releasing = [impl for impl in IMPLEMENTATIONS.values() if impl.releases_gil]
    return single, fastest(releasing) if releasing else single


_SINGLE, _THREADED = choose(os.environ.get(ENV_VAR))
#: crc32c of a bytes-like object (bytes, bytearray, memoryview, C-contiguous numpy array).
crc32c_value: Callable[[Buffer], int] = _SINGLE.value
#: crc32c of the concatenation of the bytes behind `crc` and `data`.
crc32c_extend: Callable[[int, Buffer], int] = _SINGLE.extend
#: The same for threads that check chunks side by side (releases the GIL when any can).
threaded_crc32c_value: Callable[[Buffer], int] = _THREADED.value
threaded_crc32c_extend: Callable[[int, Buffer], int] = _THREADED.extend
#: Which implementations the functions above use.
IMPLEMENTATION: str = _SINGLE.name
THREADED_IMPLEMENTATION: str = _THREADED.name
