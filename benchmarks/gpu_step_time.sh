#!/usr/bin/env bash
# The GPU speed benchmark in one go: DeiT-S/224, batch 256, bf16. First the compiled run: CutMix
# and MergeMix `clean` and `none` (compiling MergeMix's graphs dominates: 171 s of warm-up for
# `clean` in the first H200 run, 116 s once both passes shared one graph); then every method
# eager (about 1.5 minutes on an H200). Writes
# benchmarks/results/step_time_cuda{_compiled,}.{json,md}; the compiled run writes its step
# times before the mask work and the evaluation throughput. PYTHON picks the interpreter;
# EAGER=0 skips the eager run; COMPILE_MODE=reduce-overhead (say) compiles in that mode.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
common=(--device cuda --model deit_small_patch16_224 --img-size 224 --batch-size 256 --amp bfloat16 --merge-num 98)
mode=()
[[ -n "${COMPILE_MODE:-}" ]] && mode=(--compile-mode "$COMPILE_MODE")
timeout "${COMPILED_TIMEOUT:-400}" "$py" benchmarks/step_time.py "${common[@]}" --warmup 2 --steps 10 --compile "${mode[@]}" \
    --methods cutmix mergemix --mergemix-configs clean,merge none,merge
[[ "${EAGER:-1}" == 1 ]] && timeout 150 "$py" benchmarks/step_time.py "${common[@]}" --steps 20
