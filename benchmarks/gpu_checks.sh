#!/usr/bin/env bash
# Every GPU check of issue 14 in one command, from the repository root, in about 8 minutes at most:
#
#     bash benchmarks/gpu_checks.sh
#
# Steps (each under `timeout`, each run even if an earlier one failed; a summary comes at the end):
#   1. sdpa_kernels  which sdpa kernel runs for the base model and PrefixPlus, padded or not (bf16)
#   2. tests         tests/test_devices.py on CUDA: cached generation = recomputation, gradients = float64 reference
#   3. train         benchmarks/run.py --suite train  --device cuda --dtype bfloat16
#   4. decode        benchmarks/run.py --suite decode --device cuda --dtype bfloat16 --repeats 3
# Expected on an H200: well under the budget (the models have ~20M parameters); never run on a GPU yet.
# Everything goes to benchmarks/results_cuda/ (logs in logs/, the summary in gpu_checks_summary.md) and, when $OUT is
# set (the device machine returns only files under it), is copied to $OUT/results_cuda after every step.
#
# Environment:
#   GPU_CHECKS_DEVICE=cpu   dry run on the CPU: the same steps in smoke mode (tiny models, one repeat), written to
#                           ${TMPDIR:-/tmp}/gpu_checks_dryrun unless GPU_CHECKS_OUT is set; checks this script's logic
#   GPU_CHECKS_OUT=DIR      where to write (default benchmarks/results_cuda)
#   GPU_CHECKS_BUDGET_S=N   total seconds for all steps (default 450); each step gets min(its limit, what is left)
#   GPU_CHECKS_TRAIN_ARGS   extra arguments of the train suite, e.g. "--batches 8 32 --seqs 512" (default none)
#   GPU_CHECKS_DECODE_ARGS  extra arguments of the decode suite (default "--repeats 3")
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" # this working tree wins over any installed copy
export HF_HUB_OFFLINE=1
DEVICE="${GPU_CHECKS_DEVICE:-cuda}"
BUDGET="${GPU_CHECKS_BUDGET_S:-450}"
START=$SECONDS
read -r -a TRAIN_ARGS <<<"${GPU_CHECKS_TRAIN_ARGS:-}"
read -r -a DECODE_ARGS <<<"${GPU_CHECKS_DECODE_ARGS:---repeats 3}"

case "$DEVICE" in
cuda)
    RES="${GPU_CHECKS_OUT:-benchmarks/results_cuda}"
    SMOKE=()
    ;;
cpu)
    RES="${GPU_CHECKS_OUT:-${TMPDIR:-/tmp}/gpu_checks_dryrun}"
    SMOKE=(--smoke)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    ;;
*)
    echo "GPU_CHECKS_DEVICE must be cuda or cpu, not '$DEVICE'" >&2
    exit 2
    ;;
esac

# --- the project and a CUDA device ---------------------------------------------------------------------------------
if ! python -c "import peft_prefix_plus, pytest, matplotlib" 2>/dev/null; then
    echo "[gpu_checks] the project or its test extra does not import: pip install -e \".[test]\""
    pip install -e ".[test]" || {
        echo "[gpu_checks] could not install the project and its test extra; install them, then rerun" >&2
        exit 3
    }
fi
if [ "$DEVICE" = cuda ] && [ "$(python -c 'import torch; print(torch.cuda.is_available())')" != True ]; then
    echo "[gpu_checks] no CUDA device: torch $(python -c 'import torch; print(torch.__version__)') reports" \
        "torch.cuda.is_available() = False. Run on a GPU machine, or GPU_CHECKS_DEVICE=cpu for a dry run." >&2
    exit 4
fi
mkdir -p "$RES/logs"

sync_out() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/results_cuda" && cp -r "$RES/." "$OUT/results_cuda/"
    fi
}

SUMMARY=()
# step NAME LIMIT_S COMMAND...: run COMMAND under timeout (its limit or what is left of the budget), log it, record
# how it ended; never stops the script.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("| $name | **skipped**: the ${BUDGET} s budget is spent | 0 |")
        echo "[gpu_checks] $name: skipped, the budget is spent"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "[gpu_checks] $name (at most ${limit} s): $*"
    local began=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" >"$RES/logs/$name.log" 2>&1
    rc=$?
    tail -n 15 "$RES/logs/$name.log"
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="**timed out** after ${limit} s"
    elif [ "$rc" -ne 0 ]; then
        status="**failed** (exit $rc)"
    fi
    SUMMARY+=("| $name | $status | $((SECONDS - began)) |")
    echo "[gpu_checks] $name: $status in $((SECONDS - began)) s"
    sync_out
}

step environment 30 bash -c 'python -c "
import torch, transformers, peft
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"transformers\", transformers.__version__, \"peft\", peft.__version__)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), \"capability\", torch.cuda.get_device_capability(0))
"; command -v nvidia-smi >/dev/null && nvidia-smi || true'
step sdpa_kernels 90 python -m benchmarks.sdpa_kernels --device "$DEVICE" --dtype bfloat16 "${SMOKE[@]}" --out "$RES"
step tests 150 env PREFIX_PLUS_TEST_DEVICE="$DEVICE" \
    python -m pytest -q -p no:cacheprovider -rs tests/test_devices.py --junitxml="$RES/logs/tests.xml"
step train 120 python benchmarks/run.py --suite train --device "$DEVICE" --dtype bfloat16 "${TRAIN_ARGS[@]}" \
    "${SMOKE[@]}" --out "$RES"
step decode 240 python benchmarks/run.py --suite decode --device "$DEVICE" --dtype bfloat16 "${DECODE_ARGS[@]}" \
    "${SMOKE[@]}" --out "$RES"

{
    echo "# GPU checks: summary"
    echo
    echo "\`bash benchmarks/gpu_checks.sh\` (GPU_CHECKS_DEVICE=$DEVICE), $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - START)) s in all."
    echo "Logs of every step are in \`logs/\`; results in \`results.md\` (train, decode) and \`sdpa_kernels.md\`."
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
} >"$RES/gpu_checks_summary.md"
sync_out
echo
cat "$RES/gpu_checks_summary.md"
if grep -q '\*\*' "$RES/gpu_checks_summary.md"; then exit 1; fi
