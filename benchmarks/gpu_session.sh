#!/usr/bin/env bash
# One GPU session, start to finish, inside ~9 minutes (see benchmarks/GPU.md for the device call):
#   install (carried wheels + this repo, no deps) -> versions -> GPU tests -> benchmarks at full
#   sizes -> results bundled into $OUT -> a short table printed last.
# Every stage is time-boxed against one overall budget; a stage that would not fit is skipped and
# says so. Choose stages with STAGES="tests step memory kernels profile" (default: all, that order).
# Run from the repository root: bash benchmarks/gpu_session.sh
set -uo pipefail

BUDGET_S=${BUDGET_S:-540}          # whole session, seconds
RESERVE_S=20                       # kept for bundling the results
STAGES=${STAGES:-"tests step memory kernels profile"}
MODEL=${MODEL:-qwen2.5-1.5b}       # the issue's target shape
OUT=${OUT:-/tmp/fastppo-gpu-out}   # set by the device tool; files here come back (8 at most)
RESULTS=/tmp/fastppo-results       # the benchmark results; bundled into $OUT/results.tar.gz
PROFILE=/tmp/fastppo-profile       # the profiled step (a run of its own); bundled into $OUT/traces.tar.gz
SITE=/tmp/site
REPO=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)
mkdir -p "$OUT" "$RESULTS" "$PROFILE"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TRITON_INTERPRET=0          # tests/conftest.py defaults it to 1 (CPU); here Triton runs on the GPU
export TOKENIZERS_PARALLELISM=false
# -P: never put the current folder on sys.path (the checkout's kernels/ would shadow Hugging Face's).
PY="python3 -P"

left() { echo $((BUDGET_S - RESERVE_S - ($(date +%s) - START))); }

# stage NAME SECONDS COMMAND...: run COMMAND with at most SECONDS (less if the budget is short).
stage() {
  local name=$1 want=$2; shift 2
  local have; have=$(left)
  if [[ " $STAGES " != *" $name "* && $name != install && $name != versions ]]; then return 0; fi
  if (( have < 30 )); then echo "=== $name: SKIPPED (only ${have}s of budget left)"; return 0; fi
  local limit=$(( want < have ? want : have ))
  echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  local t0; t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' (TIMED OUT)')"
  return 0
}

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$REPO"/.whl/*.whl || return 1
  # This repository, built with the image's setuptools, onto the same path (no deps: the image has them).
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$REPO" || return 1
}

versions() {
  nvidia-smi
  $PY - <<'EOF'
import importlib.metadata as md, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for name in ("fastppo", "triton", "transformers", "trl", "liger-kernel", "bitsandbytes", "accelerate", "peft",
             "datasets", "pyarrow", "fsspec", "huggingface-hub", "matplotlib", "rich"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
import fastppo.kernels, trl  # fail here, loudly, rather than in every stage
EOF
}

session() {
  echo "=== install"
  install || { echo "install FAILED: are the wheels carried? (carry: [\".whl\"], see benchmarks/GPU.md)"; return 1; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  stage versions 60 versions

  cd "$REPO"  # pytest reads pyproject.toml (importlib mode) from here; -P keeps the root off sys.path
  stage tests 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests/ ${GPU_TESTS:-}
  cd /tmp
  stage step 200 $PY -m fastppo.benchmarks.suite step --model "$MODEL" --out "$RESULTS"
  stage memory 130 $PY -m fastppo.benchmarks.bench_memory --model "$MODEL" --budget-s 55 --out "$RESULTS"
  stage kernels 150 $PY -m fastppo.benchmarks.suite kernels --out "$RESULTS"
  # A run of its own (never the README's figures): a smaller model and short completions keep the
  # trace of a whole step readable.
  stage profile 80 $PY -m fastppo.benchmarks.bench_step --model qwen2.5-0.5b --completion-len 64 --timed-steps 1 \
    --trainers fastppo,trl --profile --out "$PROFILE"

  echo "=== bundle"
  $PY -m fastppo.benchmarks.plots --results "$RESULTS" >/dev/null
  $PY -m fastppo.benchmarks.report --results "$RESULTS" --write "$RESULTS/report.md" >/dev/null
  tar -czf "$OUT/results.tar.gz" -C "$RESULTS" .
  # Traces apart: a file over 16 MiB does not come back, and the results must.
  tar -czf "$OUT/traces.tar.gz" -C "$PROFILE" .
  cp "$RESULTS/report.md" "$OUT/" 2>/dev/null
  for f in "$RESULTS"/plot-step-*.png "$RESULTS"/plot-memory-*.png "$PROFILE"/*.top-kernels.txt; do
    [[ -f $f ]] && (( $(ls "$OUT" | wc -l) < 8 )) && cp "$f" "$OUT/"
  done
  ls -la "$OUT"
  echo "=== results ($(( $(date +%s) - START ))s in all)"
  $PY -m fastppo.benchmarks.report --results "$RESULTS" --readme-block
}

# session.log counts as one of the 8 files that come back.
session 2>&1 | tee "$OUT/session.log"
