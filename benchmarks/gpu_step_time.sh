#!/usr/bin/env bash
# The GPU speed benchmark in one go: DeiT-S/224, batch 256, bf16, every method eager (about
# 1.5 minutes on an H200), then CutMix and MergeMix (clean) compiled, where compiling MergeMix's
# two forwards and two backwards dominates (3.5 minutes in the first H200 run). Writes
# benchmarks/results/step_time_cuda{,_compiled}.{json,md}; the compiled run writes its step
# times before the mask work and the evaluation throughput. PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
common=(--device cuda --model deit_small_patch16_224 --img-size 224 --batch-size 256 --amp bfloat16 --merge-num 98)
timeout 150 "$py" benchmarks/step_time.py "${common[@]}" --steps 20
timeout 330 "$py" benchmarks/step_time.py "${common[@]}" --warmup 2 --steps 10 --compile \
    --methods cutmix mergemix --mergemix-configs clean,merge
