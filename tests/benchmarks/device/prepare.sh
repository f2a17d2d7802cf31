#!/usr/bin/env bash
# Run HERE (a machine with PyPI), from the repository root, before a device session:
# downloads the wheels the GPU machine lacks (its image has Python 3.12, torch, timm, h5py,
# typer, rich, fsspec, hypothesis, pytest, but no zarr, numcodecs, fastcrc or dask) into .whl/,
# which git ignores through .git/info/exclude and the device call carries (`carry: [".whl"]`).
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=${PY:-.venv/bin/python}
WHEELS=(
  zarr==3.1.6 donfig==0.8.1.post1 numcodecs==0.16.6 google-crc32c==1.9.0 fastcrc==0.5.0
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 zict==3.0.0
  tornado==6.6.1 importlib_metadata==8.7.0
)
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "$spec" 2>&1 | grep -v '^WARNING' || true
done
ls .whl
du -sh .whl
