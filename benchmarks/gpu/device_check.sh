#!/usr/bin/env bash
# The prepared one-GPU check of issues 5, 10 and 23, in one go (about 8 minutes on an H100/H200):
#   1. SiT-XL/2, 256 px latents, bf16: bare eager, flowrail eager, bare torch.compile, flowrail train.compile=true,
#      each at batch 64 and at the batch data.batch_size=auto picks; MFU against 989.4 TFLOP/s (issue 23); flowrail
#      with train.engine=torch (one worker; ENGINE=deepspeed for DeepSpeed's engine)
#   2. with FLUX=1: one FLUX.1-shaped fine-tune step: LoRA (ZeRO-2) and full fine-tune (ZeRO-3, FLUX-width slice)
# Usage (repo root, on the GPU machine):  OUT=/tmp/gpu bash benchmarks/gpu/device_check.sh   (run timeout_s >= 600)
# On a CPU machine:  DRY_RUN=1 OUT=/tmp/gpu bash benchmarks/gpu/device_check.sh  (tiny SiT, a few steps: plumbing only)
# Python packages the machine lacks may be put in .whl/ (wheels, and deepspeed's sdist); they are installed first.
set -u
OUT=${OUT:-/tmp/flowrail-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MLFLOW_ALLOW_FILE_STORE=true RAY_DEDUP_LOGS=0
if [ -d .whl ]; then
  t0=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
    --target /tmp/site .whl/*.whl .whl/*.tar.gz 2>&1 | grep -v "^  " | tail -5
  export PYTHONPATH=/tmp/site:$PWD
  echo "install: $(( $(date +%s) - t0 )) s"
else
  export PYTHONPATH=$PWD
fi
if [ -n "${DRY_RUN:-}" ]; then
  timeout "${SIT_TIMEOUT:-900}" python3 benchmarks/gpu/run.py --dry-run --batch 4 auto --steps 3 --warmup 1 \
    --flowrail-steps 6 --compile --engine "${ENGINE:-torch}" --tracking-uri "file://$OUT/mlruns" --out "$OUT" > "$OUT/sit.log" 2>&1
  echo "dry run rc=$?"; grep -E "^\||^- |flowrail windows|largest batch|failed|Error" "$OUT/sit.log" | tail -25
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, ray, deepspeed, diffusers, mlflow, pydantic; print('torch', torch.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'diffusers', diffusers.__version__, 'mlflow', mlflow.__version__)" 2>&1 | tail -2
timeout "${SIT_TIMEOUT:-500}" python3 benchmarks/gpu/run.py --batch 64 auto --steps 20 --flowrail-steps 40 --compile \
  --engine "${ENGINE:-torch}" \
  --tracking-uri "file:///tmp/flowrail-mlruns" --out "$OUT" > "$OUT/sit.log" 2>&1
echo "sit rc=$?"; grep -E "^\||^- |flowrail windows|largest batch|failed|Error|error" "$OUT/sit.log" | tail -30
[ -n "${FLUX:-}" ] || exit 0
for mode in lora full; do
  timeout "${FLUX_TIMEOUT:-90}" python3 benchmarks/flux/gpu_step.py --mode $mode > "$OUT/flux_$mode.log" 2>&1
  rc=$?; echo "flux $mode rc=$rc"; grep -E "^\||last loss|Error|error" "$OUT/flux_$mode.log" | tail -6
  if [ $rc -ne 0 ]; then  # once more, smaller (full) or with synchronous launches to name the failing kernel (lora)
    if [ $mode = full ]; then extra="--double 3 --single 6"; else extra="--warmup 1 --steps 2"; fi
    CUDA_LAUNCH_BLOCKING=1 timeout 70 python3 benchmarks/flux/gpu_step.py --mode $mode $extra \
      > "$OUT/flux_${mode}_retry.log" 2>&1
    echo "flux $mode retry ($extra, CUDA_LAUNCH_BLOCKING=1) rc=$?"
    grep -E "^\||last loss|Error|error|File \"/work" "$OUT/flux_${mode}_retry.log" | tail -12
  fi
done
