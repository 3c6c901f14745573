#!/usr/bin/env bash
# The GPU speed benchmark in one go: DeiT-S/224, batch 256, bf16. First every method eager (about
# 1.5 minutes; it also counts each method's launched ops per forward and backward), then CutMix and
# MergeMix `clean` compiled with CUDA-graph replay (reduce-overhead:
# about 3 minutes on an H200, 80 s of it compiling MergeMix). MergeMix `none` compiles two graphs
# (the partial read-out pass and the training pass) and needs about 2 minutes more:
# CONFIGS="clean,merge none,merge" adds it, with COMPILED_TIMEOUT=500; CONFIGS="none,merge" times it
# alone (the mask work is then a share of its step). COMPILE_MODE=default
# compiles without CUDA graphs. Writes benchmarks/results/step_time_cuda{,_compiled[_MODE]}.{json,md};
# the compiled run writes its step times and compile figures (counters, seconds by phase) before the
# mask work and the evaluation throughput, so a run stopped by its time limit keeps them. PYTHON picks
# the interpreter; EAGER=0 skips the eager run.
# SCOPE=blocks compiles block by block (step_time.py --compile-scope blocks, an experiment: on the
# CPU it did not shorten MergeMix's compile) and writes step_time_cuda_compiled[_MODE]_blocks.{json,md}.
# MERGE_EVERY=2 times MergeMix and merged evaluation merging in every 2nd block only; "1 2" times
# both schedules side by side, with about twice the compile time (step_time.py --merge-every; files
# gain _every2 or _every1-2). PROP_ATTN="on off" times them with ToMe's proportional attention and
# without it side by side (labels gain ,noprop; files _prop-on-off), PROP_ATTN=off without it only
# (_noprop): each setting compiles its own graphs. MERGE_AB_REF=FILE first times the merge op and a merged DeiT-S,
# eager, against an older merge.py (benchmarks/merge_ab.py, about a minute; the device's copy of
# the tree has no git history, so pass a file: git show COMMIT:src/mergemix/merge.py > FILE in a
# carried folder) and writes benchmarks/results/merge_ab_cuda.json.
# CACHE=cold-warm runs the compiled step twice on fresh Inductor and Triton caches of its own: the first
# compiles from nothing, the second finds the first's kernels, as a resumed or repeated training run
# does (files gain _cache-cold and _cache-warm).
# A failed step does not stop the later ones; the script then exits 1, naming the failed steps on stderr.
set -uo pipefail
if (( $# )); then
    if [[ "$1" == -h || "$1" == --help ]]; then
        echo "usage: $0  (no arguments: the settings are the environment variables below)"
        sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"
        exit 0
    fi
    echo "error: $0 takes no arguments, got '$*': it reads its settings from environment variables (see --help)" >&2
    exit 2
fi
case "${CACHE:-}" in  # checked before any step runs
    "") tags=("") ;;
    cold-warm) tags=(cache-cold cache-warm) ;;
    *) echo "error: CACHE must be cold-warm or unset, got '$CACHE'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
failed=()
# Run one step; a failure is recorded, not fatal, so that the later steps still use the GPU session.
step() {
    local name=$1 code
    shift
    "$@"
    code=$?
    if (( code == 124 )); then
        failed+=("$name (timed out)")
    elif (( code )); then
        failed+=("$name (exit $code)")
    fi
}
read -r -a every <<< "${MERGE_EVERY:-1}"
read -r -a prop <<< "${PROP_ATTN:-on}"
common=(--device cuda --model deit_small_patch16_224 --img-size 224 --batch-size 256 --amp bfloat16 --merge-num 98
        --merge-every "${every[@]}" --prop-attn "${prop[@]}")
if [[ -n "${MERGE_AB_REF:-}" ]]; then
    step merge_ab timeout 150 "$py" benchmarks/merge_ab.py --ref "$MERGE_AB_REF" --device cuda \
        --dtype bfloat16 --batch-size 256 --model deit_small_patch16_224 --model-batch-size 256 \
        --out benchmarks/results/merge_ab_cuda.json
fi
if [[ "${EAGER:-1}" == 1 ]]; then
    step eager timeout 200 "$py" benchmarks/step_time.py "${common[@]}" --steps 20
fi
mode=${COMPILE_MODE:-reduce-overhead}
read -r -a configs <<< "${CONFIGS:-clean,merge}"
if [[ -n "${CACHE:-}" ]]; then
    cache=$(mktemp -d)
    trap 'rm -rf "$cache"' EXIT
    export TORCHINDUCTOR_CACHE_DIR=$cache/inductor TRITON_CACHE_DIR=$cache/triton
fi
for tag in "${tags[@]}"; do
    step "compiled${tag:+ $tag}" timeout "${COMPILED_TIMEOUT:-300}" "$py" benchmarks/step_time.py "${common[@]}" \
        --warmup 3 --steps 10 --compile --compile-mode "$mode" --compile-scope "${SCOPE:-model}" \
        --methods cutmix mergemix --mergemix-configs "${configs[@]}" ${tag:+--tag "$tag"}
done
if (( ${#failed[@]} )); then
    printf -v list '%s, ' "${failed[@]}"
    echo "$0: failed steps: ${list%, }" >&2
    exit 1
fi
