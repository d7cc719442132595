#!/usr/bin/env bash
# Every GPU measurement of the device engine in one go (docs/scaling.md, "Fitting on a GPU"): run it on a machine
# with an NVIDIA GPU and a CUDA build of torch, from the repository root, within about 10 minutes.
#   1. which GPU and torch;
#   2. benchmarks/device_fit.py on the realistic production-size network (kurucz25, when $THEPAYNE_KURUCZ5 names
#      payne_kurucz5_nn.pkl; else the line network): agreement of cuda and cpu with the numpy engine, and spectra
#      per second of the local fit against the batch size;
#   3. benchmarks/throughput.py end to end (synthetic apStar files -> thepayne run --device cuda -> the database:
#      PostgreSQL at $THEPAYNE_TEST_POSTGRES_URL when set, else SQLite).
# Output: everything printed, and the same under ${OUT:-gpu-results}/.
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
network=line
if [ -n "${THEPAYNE_KURUCZ5:-}" ] && [ -f "$THEPAYNE_KURUCZ5" ]; then network=kurucz25; fi
python benchmarks/device_fit.py --network "$network" --spectra 512 --repeat 16 --devices cuda,cpu \
  --batch-sizes 64,256,1024,4096,8192 2>&1 | tee "$OUT/device_fit.txt"
backends=sqlite
[ -n "${THEPAYNE_TEST_POSTGRES_URL:-}" ] && backends=postgresql
python benchmarks/throughput.py --spectra 20000 --backends "$backends" --batch-size 4096 \
  --run-option=--device --run-option=cuda --run-option=--processes --run-option="$(( $(nproc) - 1 ))" \
  --json "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt"
