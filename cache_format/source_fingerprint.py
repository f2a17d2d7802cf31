"""The content fingerprint of a source image: a 64-bit checksum of its encoded file's bytes.

The builder records one per image in the dataset's `index_rows` (layout.py) while it reads the
file anyway; stage two recomputes it from the bytes it reads to replay a view and refuses an image
whose content changed since the cache was built (a same-size replacement replays the same view
parameters, so nothing else would notice that the cached tokens describe another picture).

The purpose is to catch files replaced or edited by accident, not by an adversary, so a CRC is
enough and speed decides: CRC-64/XZ (the ECMA-182 polynomial, reflected; check value
0x995DC9BBDF1939FA for b"123456789") from `fastcrc`, already a dependency for the crc32c of
checksum.py, runs at several GB/s on one core here: at most 0.1% of decoding the image, where
hashlib.blake2b(digest_size=8) costs up to 8.6% and sha256 up to 2.7% (docs/benchmarks.md,
`bench_source_fingerprints`).

The manifest names the algorithm per dataset (`DatasetFingerprint.source_fingerprint`), so a
later change of algorithm is detected rather than read as changed images; "" means the dataset
has no fingerprints (caches built before them, upgraded version-1 caches, heads' feature caches).
"""

from __future__ import annotations

from typing import Any

#: The algorithm this code computes, as the manifest names it.
ALGORITHM = "crc64-xz"
#: Every algorithm this code can check (a cache naming another one was written by a newer
#: dune-distill).
KNOWN_ALGORITHMS: tuple[str, ...] = (ALGORITHM,)

try:
    from fastcrc import crc64 as _fastcrc64
except ImportError:  # pragma: no cover - fastcrc is a dependency; platforms without its wheel
    _fastcrc64 = None


def _crc64_table() -> tuple[int, ...]:
    """The byte table of the reflected ECMA-182 polynomial (the slow path's)."""
    poly, table = 0xC96C5795D7870F42, []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE: tuple[int, ...] | None = None


def _crc64_xz_slow(data: Any) -> int:
    """CRC-64/XZ one byte at a time (same value as fastcrc's; used only without fastcrc)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _crc64_table()
    crc, table = 0xFFFFFFFFFFFFFFFF, _TABLE
    for byte in bytes(memoryview(data).cast("B")):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def fingerprint(data: Any) -> int:
    """The fingerprint (`ALGORITHM`) of an encoded image file's bytes, as an unsigned 64-bit int."""
    if _fastcrc64 is not None:
        return int(_fastcrc64.xz(bytes(data) if not isinstance(data, bytes) else data))
    return _crc64_xz_slow(data)


def hex_of(value: int) -> str:
    """A fingerprint as 16 hex digits, for messages."""
    return f"{int(value):016x}"
