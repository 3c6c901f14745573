#!/usr/bin/env bash
# The GPU speed benchmark in one go (under 5 minutes on one H100/H200): DeiT-S/224, batch 256,
# bf16, every method eager, then CutMix and MergeMix compiled. Writes
# benchmarks/results/step_time_cuda{,_compiled}.{json,md}. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
common=(--device cuda --model deit_small_patch16_224 --img-size 224 --batch-size 256 --amp bfloat16 --merge-num 98)
timeout 150 "$py" benchmarks/step_time.py "${common[@]}" --steps 20
timeout 270 "$py" benchmarks/step_time.py "${common[@]}" --steps 15 --compile --methods cutmix mergemix
