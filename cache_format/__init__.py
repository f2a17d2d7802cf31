"""The on-disk contract of a DUNE teacher-token cache: layout, encodings, manifest, I/O.

Writers use `CacheWriter` (precompute/), readers `open_cache` (train/, tools). The format is
described for people in docs/cache-format.md. Import each name from the module that defines it
(`cache_format.reader.open_cache`, `cache_format.writer.CacheWriter`, ...): this package
re-exports nothing.
"""
