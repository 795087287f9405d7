#!/usr/bin/env bash
# The GPU checks no CPU machine can do, as one prepared run (issues 7, 8 and 12): bf16 / fp16 correctness, the FSDP
# config on a real GPU, DDP and ZeRO-2 launches, and the H100 rows of the README's Performance section (SD 2.1-sized
# random-init UNet, 768²).
#
#   bash benchmarks/device_checks.sh [OUT_DIR] [--compile]
#
# Writes at most 8 files into OUT_DIR (default $OUT, else /tmp/d3-device): device.txt, tests.log, benchmarks.log,
# multi.log and one JSON per benchmark row. Without --compile it takes about 5 minutes on an H100 (most of it building the random
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

# 3. the multi-process configs on the GPU(s) at hand (issue 12): 4 optimizer steps of the tiny backbone through
#    `accelerate launch` with configs/multi_gpu.yaml (plain DDP, bf16) and, when the deepspeed package is importable,
#    configs/deepspeed_zero2.yaml; each run's exported model must then load and predict. The tiny backbone keeps this
#    to seconds: what is checked is the launch, the checkpoint and the export under each config, not speed.
GPUS=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")
MP=/tmp/d3-multi
rm -rf "$MP" && mkdir -p "$MP"
python3 -m d3.tiny --output "$MP/backbone" > /dev/null && python3 -m d3.data.synthetic --output "$MP/scenes" \
  --num_scenes 16 --height 64 --width 64 --tasks depth --quiet > /dev/null
launch_check() {  # name, config
  local name=$1 config=$2
  echo "=== $name: $config on $GPUS GPU(s)" | tee -a "$OUT_DIR/multi.log"
  accelerate launch --config_file "$config" --num_processes "$GPUS" train_depth.py \
    --pretrained_model_name_or_path "$MP/backbone" --dataset "$MP/scenes" --output_dir "$MP/$name" --resolution 64 \
    --train_batch_size 2 --max_train_steps 4 --checkpointing_steps 2 --lr_warmup_steps 0 --report_to none \
    >> "$OUT_DIR/multi.log" 2>&1 \
  && python3 infer.py --input "$MP/scenes/rgb" --checkpoint "$MP/$name" --output "$MP/$name-pred" \
    >> "$OUT_DIR/multi.log" 2>&1 \
  && echo "$name: trained, exported, predicted" | tee -a "$OUT_DIR/multi.log" \
  || echo "$name: FAILED (see multi.log)" | tee -a "$OUT_DIR/multi.log"
}
launch_check ddp_bf16 configs/multi_gpu.yaml
if python3 -c "import deepspeed" 2>/dev/null; then
  launch_check zero2 configs/deepspeed_zero2.yaml
else
  echo "zero2: skipped (no deepspeed package on this machine)" | tee -a "$OUT_DIR/multi.log"
fi
