"""The on-disk contract of a DUNE teacher-token cache: layout, encodings, manifest, reader, writer."""
