"""crc32c (Castagnoli, as zarr's `crc32c` codec stores it), from the fastest implementation here.

A verified random read is one positional read plus one checksum pass over the same bytes, so the
checksum's speed sets how close the reader gets to a bare `pread`. Implementations, in order of
preference (all compute the same standard CRC-32C; tests check them against zarr's own
google-crc32c):

- `fastcrc` (a dependency): folds with carry-less multiplies (PCLMULQDQ / VPCLMULQDQ on x86,
  PMULL on ARM), about 55 GB/s on one core of the development machine (AMD EPYC, AVX-512), and
  releases the GIL, so reader threads check in parallel;
- `crc32c`: the SSE4.2 `crc32` instruction, about 26 GB/s, releases the GIL;
- `google_crc32c` (zarr's own dependency, always present): about 26 GB/s, holds the GIL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import google_crc32c

#: Anything with the buffer protocol (collections.abc.Buffer needs Python 3.12).
Buffer = Any

#: crc32c of a bytes-like object (bytes, bytearray, memoryview, C-contiguous numpy array).
crc32c_value: Callable[[Buffer], int]
#: crc32c of the concatenation of the bytes behind `crc` and `data`.
crc32c_extend: Callable[[int, Buffer], int]
#: Which implementation the two functions above use.
IMPLEMENTATION: str

try:
    from fastcrc import crc32 as _fastcrc32
except ImportError:  # pragma: no cover - fastcrc is a dependency; platforms without its wheel
    try:
        from crc32c import crc32c as _crc32c_pkg
    except ImportError:
        crc32c_value = google_crc32c.value
        crc32c_extend = google_crc32c.extend
        IMPLEMENTATION = "google-crc32c"
    else:
        crc32c_value = _crc32c_pkg

        def crc32c_extend(crc: int, data: Buffer) -> int:
            return _crc32c_pkg(data, crc)

        IMPLEMENTATION = "crc32c"
else:
    crc32c_value = _fastcrc32.iscsi  # CRC-32/ISCSI is CRC-32C

    def crc32c_extend(crc: int, data: Buffer) -> int:
        return _fastcrc32.iscsi(data, crc)

    IMPLEMENTATION = "fastcrc"
