#!/usr/bin/env bash
# Wall time of `fastppo demo` on an idle CPU and beside one busy process (a Python loop keeping one
# core spinning), for four thread settings: fastppo's own choice (no thread variable set), torch's
# default count (what ran before fastppo chose), the same with OpenMP's passive wait policy, and one
# thread.
# Run it on an otherwise idle machine; other load makes the idle rows meaningless.
#
#   benchmarks/demo_busy.sh [PYTHON]        # PYTHON: an interpreter with fastppo installed
#   STEPS=100 benchmarks/demo_busy.sh       # a shorter demo
set -euo pipefail

PYTHON=${1:-python}
STEPS=${STEPS:-300}
CORES=$(nproc)
THREADS=$(env -u OMP_NUM_THREADS -u MKL_NUM_THREADS "$PYTHON" -c "import torch; print(torch.get_num_threads())")
OUT=$(mktemp -d)
BUSY=""
cleanup() {
    if [[ -n $BUSY ]]; then kill "$BUSY" 2>/dev/null || true; fi
    rm -rf "$OUT"
}
trap cleanup EXIT

demo() {  # demo LABEL [VAR=VALUE ...]: one demo run under those variables, its wall seconds
    local label=$1 start end
    shift
    start=$(date +%s.%N)
    env -u OMP_NUM_THREADS -u MKL_NUM_THREADS "$@" "$PYTHON" -m fastppo demo --no-progress \
        --max-steps "$STEPS" --output-dir "$OUT/run" >"$OUT/log" 2>&1 || { cat "$OUT/log"; exit 1; }
    end=$(date +%s.%N)
    printf '| %-5s | %-28s | %6.1f |\n' "$LOAD" "$label" "$(awk "BEGIN {print $end - $start}")"
}

echo "fastppo demo, $STEPS steps, $CORES cores, torch's default $THREADS threads ($(date -u +%F), $(uname -n)); wall seconds"
echo "| load  | threads                      | wall s |"
echo "|-------|------------------------------|--------|"
for LOAD in idle busy; do
    if [[ $LOAD == busy ]]; then
        "$PYTHON" -c "while True: pass" &
        BUSY=$!
        sleep 1
    fi
    demo "fastppo's choice"
    demo "OMP_NUM_THREADS=$THREADS (before)" OMP_NUM_THREADS="$THREADS"
    demo "OMP_NUM_THREADS=$THREADS, PASSIVE" OMP_NUM_THREADS="$THREADS" OMP_WAIT_POLICY=PASSIVE
    demo "OMP_NUM_THREADS=1" OMP_NUM_THREADS=1
done
