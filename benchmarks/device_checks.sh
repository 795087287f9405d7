#!/usr/bin/env bash
# The GPU checks no CPU machine can do, as one prepared run (issues 7, 8, 12 and 19): bf16 / fp16 correctness, the
# FSDP config on a real GPU, the README's H100 rows (SD 2.1-sized random-init UNet, 768²), whether the README's
# SD 2.1 micro-batch (B=4 at 768²) fits with and without --gradient_checkpointing, the FLUX.1-dev-sized projection
# heads with and without their checkpointing, and the DDP and ZeRO-2 launches.
#
#   bash benchmarks/device_checks.sh [OUT_DIR] [--compile] [--dry-run] [--skip NAME,NAME]
#
# Every step runs on its own (a failure does not stop the others) under a time limit, writes OUT_DIR/NAME.log (and
# NAME.json for benchmarks), and the script ends with one line per step:
#   summary: NAME ok|FAILED|skipped SECONDSs [(a note, e.g. an out-of-memory measurement)]
# and exits 1 when any step FAILED (0 otherwise). OUT_DIR defaults to $OUT, else /tmp/d3-device.
# --dry-run runs every step at tiny size on the CPU (the tiny backbone, 64 px, 1-2 steps): a check of this script,
# run by tests/test_device_checks.py. D3_CHECK_PYTHON picks the interpreter (default python3).
#
# Time on one H100 (estimate, from the README's H100 figures and the step sizes below): building the random SD
# 2.1-sized backbone once ~2 min; tests ~1 min; train_b1 (both sides, 2 warm-up + 2x3 timed steps each) ~1 min;
# infer_b1 + infer_b8 ~1 min; train_b4 and train_b4_ckpt (ours only, 1 + 2 steps each, model load included)
# ~1 min; heads_flux (2.2B parameters, two steps each way) < 0.5 min; the tiny launches ~1 min: about 7-8 min
# in all, below 10. Each step is capped by D3_CHECK_STEP_TIMEOUT (default 300 s; the first SD 2.1 step 420 s).
# --compile adds two compiled rows (several minutes of compilation: not within the 10 minutes).
#
# The lent GPU machines here have torch, transformers, accelerate, safetensors and peft but not diffusers: carry its
# wheel. Once, in the repo root of the calling machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# and name `.whl` in the run's carry. Wheels found in .whl/ are installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT:-/tmp/d3-device}
COMPILE=0
DRY=0
SKIP=","
while [ $# -gt 0 ]; do
  case "$1" in
    --compile) COMPILE=1 ;;
    --dry-run) DRY=1 ;;
    --skip) shift; SKIP=",${1:-},";;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) OUT_DIR=$1 ;;
  esac
  shift
done
mkdir -p "$OUT_DIR"
PY=${D3_CHECK_PYTHON:-python3}
STEP_TIMEOUT=${D3_CHECK_STEP_TIMEOUT:-300}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 D3_BENCH_CACHE=${D3_BENCH_CACHE:-/tmp/d3-bench-cache}
if [ "$DRY" = 1 ]; then
  # tiny sizes on the CPU: the same steps and bookkeeping in seconds each
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  BACKBONE=tiny; RES=64; BIG_RES=64
  TIMING=(--warmup 0 --iterations 1 --rounds 1 --no_flops --num_threads 1)
  INFER=(--warmup 0 --rounds 1 --num_images 2 --num_threads 1)
  HEADS=(--layers 2 --width 32 --tokens 16)
  LAUNCH=(--cpu --num_processes 1); STEPS=2
else
  BACKBONE=${D3_CHECK_BACKBONE:-sd21}; RES=${D3_CHECK_RESOLUTION:-768}; BIG_RES=$RES
  TIMING=(); INFER=(); HEADS=()
  GPUS=$($PY -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
  LAUNCH=(--num_processes "$GPUS")
fi

MP=$OUT_DIR/multi
STEPS=${STEPS:-4}  # optimizer steps of each launch check
# step helpers (run by `step` in a fresh bash, see below)
no_oom() { "$@" && [ -f "${@: -1}" ] && ! grep -q '"OOM"' "${@: -1}"; }  # ran, wrote its JSON (last arg), no OOM
mp_data() {
  mkdir -p "$MP" && $PY -m d3.tiny --output "$MP/backbone" && $PY -m d3.data.synthetic --output "$MP/scenes" \
    --num_scenes 8 --height 64 --width 64 --tasks depth --quiet
}
launch_check() {  # name, config
  $PY -m accelerate.commands.launch --config_file "$2" "${LAUNCH[@]}" train_depth.py \
    --pretrained_model_name_or_path "$MP/backbone" --dataset "$MP/scenes" --output_dir "$MP/$1" --resolution 64 \
    --train_batch_size 2 --max_train_steps "$STEPS" --checkpointing_steps 2 --lr_warmup_steps 0 --report_to none \
    --dataloader_num_workers 0 \
  && $PY infer.py --input "$MP/scenes/rgb" --checkpoint "$MP/$1" --output "$MP/$1-pred" \
  && echo "$1: trained, exported, predicted"
}
NAMES=(); STATUS=(); SECS=(); NOTES=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("${4:-}"); }
step() {  # NAME, then the command; its output goes to OUT_DIR/NAME.log
  local name=$1; shift
  if [[ "$SKIP" == *",$name,"* ]]; then record "$name" skipped 0; return 0; fi
  local start=$SECONDS limit=${STEP_LIMIT:-$STEP_TIMEOUT}
  echo "=== $name: $*"
  # `timeout` runs a fresh bash that gets this script's helpers and settings (functions and arrays do not export)
  if timeout "$limit" bash -c "$(declare -p PY MP LAUNCH OUT_DIR STEPS); $(declare -f no_oom mp_data launch_check); \"\$@\"" \
      _ "$@" > "$OUT_DIR/$name.log" 2>&1; then
    local note=""  # a benchmark that ran but reports out of memory (train_b4: expected, see docs/memory.md)
    grep -q '"OOM"' "$OUT_DIR/$name.json" 2>/dev/null && note="(out of memory reported, see $name.json)"
    record "$name" ok $((SECONDS - start)) "$note"
    grep -E "^\| (ours|official|model only|infer)|peak|heads, |trained, exported" "$OUT_DIR/$name.log" | head -8
  else
    local rc=$?
    record "$name" FAILED $((SECONDS - start))
    echo "$name FAILED (exit $rc$([ $rc = 124 ] && echo ", time limit ${limit}s")); last lines of $name.log:"
    tail -15 "$OUT_DIR/$name.log"
  fi
}
skip() { record "$1" skipped 0; echo "=== $1: skipped ($2)"; }

if [ "$DRY" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "installing .whl/ failed"; exit 1; }
fi

{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__); torch.cuda.is_available() and print('total_memory', torch.cuda.get_device_properties(0).total_memory, 'bytes')"
} > "$OUT_DIR/device.txt" 2>&1
cat "$OUT_DIR/device.txt"

# 1. correctness in the GPU's precisions (each test compares with fp32; see its docstring) and FSDP on one GPU
#    (on the CPU, i.e. in the dry run, these tests skip themselves)
step tests $PY -m pytest -q -rs -p no:cacheprovider tests/test_low_precision.py tests/test_metrics.py \
  -k "precision or fsdp or gpu"

# 2. the README's H100 rows: each benchmark prints both sides, their ratio and the issue's goals (`goal:` lines)
STEP_LIMIT=$((STEP_TIMEOUT + 120)) step train_b1 $PY benchmarks/train_step.py --backbone "$BACKBONE" \
  --resolution "$RES" --batch_size 1 "${TIMING[@]}" --json "$OUT_DIR/train_b1.json"
step infer_b1 $PY benchmarks/inference.py --backbone "$BACKBONE" --resolution "$RES" --batch_size 1 \
  "${INFER[@]}" --json "$OUT_DIR/infer_b1.json"
step infer_b8 $PY benchmarks/inference.py --backbone "$BACKBONE" --resolution "$RES" --batch_size 8 --channels_last \
  "${INFER[@]}" --json "$OUT_DIR/infer_b8.json"
if [ "$COMPILE" = 1 ]; then
  step train_b1_compiled $PY benchmarks/train_step.py --backbone "$BACKBONE" --resolution "$RES" --batch_size 1 \
    --channels_last --compile "${TIMING[@]}" --json "$OUT_DIR/train_b1_compiled.json"
  step infer_b8_compiled $PY benchmarks/inference.py --backbone "$BACKBONE" --resolution "$RES" --batch_size 8 \
    --channels_last --compile "${INFER[@]}" --json "$OUT_DIR/infer_b8_compiled.json"
fi

# 3. memory (issue 19, docs/memory.md): SD 2.1 at B=4, 768², ours only. Without --gradient_checkpointing the
#    estimate is ~91 GB on one GPU: the step measures it and, if it runs out of memory, says so on its summary line
#    (still ok: a measurement); with --gradient_checkpointing (~51 GB) running out of memory FAILS the step. Then the
#    FLUX.1-dev heads alone (25 x 3072 at 2304 tokens x 3 timesteps), with and without their checkpointing
#    (estimated peak above weights: ~45 GB plain, ~15 GB checkpointed, gradients and autocast copies included).
B4=(--backbone "$BACKBONE" --resolution "$BIG_RES" --batch_size 4 --skip_reference --no_flops)
[ "$DRY" = 0 ] && B4+=(--warmup 1 --iterations 2 --rounds 1)
step train_b4 $PY benchmarks/train_step.py "${B4[@]}" "${TIMING[@]}" --json "$OUT_DIR/train_b4.json"
step train_b4_ckpt no_oom $PY benchmarks/train_step.py "${B4[@]}" --gradient_checkpointing "${TIMING[@]}" \
  --json "$OUT_DIR/train_b4_ckpt.json"
step heads_flux $PY benchmarks/heads_step.py "${HEADS[@]}" --json "$OUT_DIR/heads_flux.json"

# 4. the multi-process configs on the GPU(s) at hand (issue 12): 4 optimizer steps of the tiny backbone through
#    `accelerate launch` with configs/multi_gpu.yaml (plain DDP, bf16) and, when the deepspeed package is importable,
#    configs/deepspeed_zero2.yaml; each run's exported model must then load and predict. What is checked is the
#    launch, the checkpoint and the export under each config, not speed. One GPU shows nothing cross-rank.
rm -rf "$MP"
step mp_data mp_data
step ddp_bf16 launch_check ddp_bf16 configs/multi_gpu.yaml
if $PY -c "import deepspeed" >/dev/null 2>&1; then
  step zero2 launch_check zero2 configs/deepspeed_zero2.yaml
else
  skip zero2 "no deepspeed package on this machine"
fi

echo "=== summary ($([ "$DRY" = 1 ] && echo "dry run, CPU, tiny sizes" || echo "$BACKBONE at ${RES}²"); logs in $OUT_DIR)"
failed=0
for i in "${!NAMES[@]}"; do
  echo "summary: ${NAMES[$i]} ${STATUS[$i]} ${SECS[$i]}s${NOTES[$i]:+ ${NOTES[$i]}}"
  [ "${STATUS[$i]}" = FAILED ] && failed=1
done
exit $failed
