"""The on-disk contract of a DUNE teacher-token cache: layout, encodings, manifest, I/O.

Writers use `CacheWriter` (precompute/), readers `open_cache` (train/, tools). The format is
described for people in docs/cache-format.md.
"""

from cache_format.encodings import (
    EncodingSpec,
    decode_tokens,
    decode_tokens_torch,
    encode_tokens,
    fit_calibration,
)
from cache_format.manifest import (
    FORMAT_VERSION,
    STATUS_CODES,
    STATUS_OK,
    DatasetFingerprint,
    Manifest,
    TeacherFingerprint,
    keys_sha256,
    status_code,
    status_name,
)
from cache_format.reader import (
    CacheReader,
    EncodedTokens,
    OpenSettings,
    SampleIndex,
    ShardBlock,
    VerifyReport,
    open_cache,
)
from cache_format.stats import ChannelStats
from cache_format.writer import CacheWriter

__all__ = [
    "FORMAT_VERSION",
    "STATUS_CODES",
    "STATUS_OK",
    "CacheReader",
    "CacheWriter",
    "ChannelStats",
    "DatasetFingerprint",
    "EncodedTokens",
    "EncodingSpec",
    "Manifest",
    "OpenSettings",
    "SampleIndex",
    "ShardBlock",
    "TeacherFingerprint",
    "VerifyReport",
    "decode_tokens",
    "decode_tokens_torch",
    "encode_tokens",
    "fit_calibration",
    "keys_sha256",
    "open_cache",
    "status_code",
    "status_name",
]
