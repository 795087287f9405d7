#!/usr/bin/env bash
# The GPU checks no CPU machine can do, as one prepared run (issues 7 and 8): bf16 / fp16 correctness, the FSDP
# config on a real GPU, and the H100 rows of the README's Performance section (SD 2.1-sized random-init UNet, 768²).
#
#   bash benchmarks/device_checks.sh [OUT_DIR] [--compile]
#
# Writes at most 7 files into OUT_DIR (default $OUT, else /tmp/d3-device): device.txt, tests.log, benchmarks.log and
# one JSON per benchmark row. Without --compile it takes about 5 minutes on an H100 (most of it building the random
# SD 2.1-sized backbone once); --compile adds the compiled rows (several minutes of compilation).
#
# The lent GPU machines here have torch, transformers, accelerate, safetensors and peft but not diffusers: carry its
# wheel. Once, in the repo root of the calling machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# and name `.whl` in the run's carry. Wheels found in .whl/ are installed into /tmp/site first.
# D3_CHECK_BACKBONE=tiny D3_CHECK_RESOLUTION=64 runs the same script in seconds (a check of the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-/tmp/d3-device}
COMPILE=0
for arg in "$@"; do
  case "$arg" in
    --compile) COMPILE=1 ;;
    *) OUT_DIR=$arg ;;
  esac
done
mkdir -p "$OUT_DIR"
BACKBONE=${D3_CHECK_BACKBONE:-sd21}
RES=${D3_CHECK_RESOLUTION:-768}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 D3_BENCH_CACHE=${D3_BENCH_CACHE:-/tmp/d3-bench-cache}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
} > "$OUT_DIR/device.txt" 2>&1
cat "$OUT_DIR/device.txt"

# 1. correctness in the GPU's precisions (each test compares with fp32; see its docstring) and FSDP on one GPU
python3 -m pytest -q -rs tests/test_low_precision.py tests/test_metrics.py -k "precision or fsdp or gpu" \
  2>&1 | tee "$OUT_DIR/tests.log"

# 2. the README's H100 rows: each benchmark prints both sides, their ratio and the issue's goals (`goal:` lines)
run() {  # name, then the benchmark's arguments
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$OUT_DIR/benchmarks.log"
  python3 "$@" --json "$OUT_DIR/$name.json" 2>&1 | grep -v "it/s" | tee -a "$OUT_DIR/benchmarks.log"
}
run train_b1 benchmarks/train_step.py --backbone "$BACKBONE" --resolution "$RES" --batch_size 1
run infer_b1 benchmarks/inference.py --backbone "$BACKBONE" --resolution "$RES" --batch_size 1
run infer_b8 benchmarks/inference.py --backbone "$BACKBONE" --resolution "$RES" --batch_size 8 --channels_last
if [ "$COMPILE" = 1 ]; then
  run train_b1_compiled benchmarks/train_step.py --backbone "$BACKBONE" --resolution "$RES" --batch_size 1 --channels_last --compile
  run infer_b8_compiled benchmarks/inference.py --backbone "$BACKBONE" --resolution "$RES" --batch_size 8 --channels_last --compile
fi
