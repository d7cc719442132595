#!/usr/bin/env bash
# Every GPU measurement of the device engine in one go (docs/scaling.md, "Fitting on a GPU"): run it on a machine
# with an NVIDIA GPU and a CUDA build of torch, from the repository root; it takes about 5 minutes on an H200.
#   1. which GPU and torch, and the CUDA cases of the device engine's tests (when pytest is installed);
#   2. benchmarks/device_fit.py on a production-size network ($THEPAYNE_NETWORK: a name of benchmarks/networks.py
#      or a network .pkl; default kurucz25 when $THEPAYNE_KURUCZ5 names payne_kurucz5_nn.pkl, else line):
#      agreement with the numpy engine, spectra per second of the local fit against the batch size, and the whole
#      fit with the spectra prepared by $(nproc)-1 worker processes; with TensorFloat-32 products too, and the
#      solver's Jacobian shifted both ways (one correlation per chip, a gather per tap);
#   3. benchmarks/throughput.py end to end (synthetic apStar files of that network -> thepayne run --device cuda
#      -> the database: PostgreSQL at $THEPAYNE_TEST_POSTGRES_URL when set; else, with $THEPAYNE_PGSERVER_WHEEL
#      naming a downloaded `pgserver` wheel, a throwaway server from it (benchmarks/throwaway_postgres.sh); else
#      SQLite).
# Each step stops after $THEPAYNE_STEP_SECONDS (default 240) so that one stuck step cannot use up a GPU lease.
# Output: everything printed, and the same under ${OUT:-gpu-results}/. A dry run on a CPU (small, to check the script):
#   THEPAYNE_DEVICE=cpu THEPAYNE_FIT_SPECTRA=16 THEPAYNE_REPEAT=2 THEPAYNE_BATCH_SIZES=16 THEPAYNE_E2E_SPECTRA=200 \
#     bash benchmarks/gpu_measurements.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python - <<'PY' | tee "$OUT/device.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i))
PY
if python -c "import pytest" 2>/dev/null; then
  timeout "${THEPAYNE_STEP_SECONDS:-240}" python -m pytest -q -p no:cacheprovider tests/unit/test_device_fit.py \
    tests/unit/test_device_starts.py -k cuda 2>&1 | tee "$OUT/cuda_tests.txt" || echo "CUDA tests: exit status $?"
fi
network=${THEPAYNE_NETWORK:-line}
if [ -z "${THEPAYNE_NETWORK:-}" ] && [ -n "${THEPAYNE_KURUCZ5:-}" ] && [ -f "$THEPAYNE_KURUCZ5" ]; then
  network=kurucz25
fi
workers=$(( $(nproc) - 1 ))
device=${THEPAYNE_DEVICE:-cuda}
step=${THEPAYNE_STEP_SECONDS:-240}
timeout "$step" python benchmarks/device_fit.py --network "$network" --spectra "${THEPAYNE_FIT_SPECTRA:-512}" \
  --repeat "${THEPAYNE_REPEAT:-16}" --devices "$device" --tf32 --shift-methods correlation,gather --batch-sizes "${THEPAYNE_BATCH_SIZES:-256,1024,2048,4096,8192}" \
  --processes "$workers" 2>&1 | tee "$OUT/device_fit.txt" || echo "device_fit.py stopped: exit status $?"
model=$network
case "$network" in
  *.pkl) ;;
  line) model=demo ;;  # built in code, no file: the end-to-end run uses the bundled demonstration network
  *) model=$(python -c "import sys; sys.path.insert(0, 'benchmarks'); from networks import load_network; \
print(load_network('$network').path)") ;;
esac
if [ -z "${THEPAYNE_TEST_POSTGRES_URL:-}" ] && [ -n "${THEPAYNE_PGSERVER_WHEEL:-}" ]; then
  THEPAYNE_TEST_POSTGRES_URL=$(timeout 180 bash benchmarks/throwaway_postgres.sh "$THEPAYNE_PGSERVER_WHEEL" \
    "${THEPAYNE_PG_PORT:-5432}")
  export THEPAYNE_TEST_POSTGRES_URL
fi
backends=sqlite
[ -n "${THEPAYNE_TEST_POSTGRES_URL:-}" ] && backends=postgresql
timeout "$step" python benchmarks/throughput.py --spectra "${THEPAYNE_E2E_SPECTRA:-6000}" --model "$model" --backends "$backends" \
  --batch-size 2048 --run-option=--device --run-option="$device" --run-option=--processes --run-option="$workers" \
  --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt" || echo "throughput.py stopped: exit status $?"
