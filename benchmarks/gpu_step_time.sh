#!/usr/bin/env bash
# The GPU speed benchmark in one go: DeiT-S/224, batch 256, bf16, every method eager (about
# 1.5 minutes on an H200), then CutMix and MergeMix (clean and none) compiled, where compiling
# the merged model dominates (over 4 minutes in the first H200 run, which hit its limit). Writes
# benchmarks/results/step_time_cuda{,_compiled}.{json,md}. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
common=(--device cuda --model deit_small_patch16_224 --img-size 224 --batch-size 256 --amp bfloat16 --merge-num 98)
timeout 150 "$py" benchmarks/step_time.py "${common[@]}" --steps 20
timeout 330 "$py" benchmarks/step_time.py "${common[@]}" --steps 15 --compile --methods cutmix mergemix \
    --mergemix-configs clean,merge none,merge
