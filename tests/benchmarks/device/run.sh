#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (one `run` call, carry [".whl"], timeout_s 600), from the repo root:
#   bash tests/benchmarks/device/run.sh
# Installs the carried wheels into /tmp/site, puts the repository on PYTHONPATH (the import
# packages are its top-level folders), then runs every GPU check of this project, each under
# its own time limit so one slow check cannot eat the lease:
#   1. the whole test suite on the GPU machine's torch (the CUDA-only test included: int8
#      batches pinned, shipped and decoded on the device);
#   2. bench_build --large: the build's teacher phase vs the bare ViT-L/14 forward (goal >= 0.9);
#   3. bench_train --preset gpu: training from the cache vs online with ViT-L teachers and a
#      ViT-B student (goal >= 3x);
#   4. bench_encodings: every encoding's cache, its student scored by `dune-train eval` against
#      the fp16 targets, and decode GB/s on the GPU beside one CPU core (the full preset, 3 seeds
#      of fp16, int8, int4, int4h, 4 students at a time; the decode speeds are in its log first,
#      even if training is cut short by the limit). 3 seeds measure the GPU's decode speed and
#      show the full preset runs; they cannot pin a 1% difference (one paired difference
#      carries about 2% of noise on CPU: docs/benchmarks.md), which takes about 40 seeds.
# The limits add up to more than one 600 s call: run the last one on its own with
# ONLY=bench_encodings (or ONLY="tests bench_build bench_train" for the others).
# The benchmarks rewrite their sections of docs/benchmarks.md; it and the logs come back in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -z "${SKIP_INSTALL:-}" ]; then  # SKIP_INSTALL=1: a dry run where the packages are installed
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, zarr, fastcrc, dask; print(torch.__version__, torch.cuda.get_device_name(0), zarr.__version__)" | tee -a "$OUT/gpu.txt"
step() {  # step NAME SECONDS COMMAND...; ONLY="a b" runs only the steps named there
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name (limit ${limit}s)"; local began=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "   rc=$rc in $((SECONDS - began))s"; tail -n 25 "$OUT/$name.log"
}
step tests ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider -x tests
step bench_build ${BUILD_S:-200} python3 tests/benchmarks/bench_build.py --large --images ${BUILD_IMAGES:-256}
step bench_train ${TRAIN_S:-180} python3 tests/benchmarks/bench_train.py --preset gpu
step bench_encodings ${ENCODINGS_S:-240} python3 tests/benchmarks/bench_encodings.py ${ENCODINGS_ARGS:---seeds 3 --jobs 4 --encodings fp16,int8,int4,int4h}
cp docs/benchmarks.md "$OUT/benchmarks.md"
