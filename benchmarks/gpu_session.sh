#!/usr/bin/env bash
# One GPU call, start to finish, inside ~9 minutes (see benchmarks/GPU.md for the device calls):
#   install (carried wheels + this repo, no deps) -> versions -> GPU tests -> kernel benchmarks ->
#   step and memory benchmarks -> a profiled step -> results bundled into $OUT -> a table printed last.
# Every stage is time-boxed against one overall budget; a stage that would not fit is skipped and
# says so, and every benchmark writes its results file as it goes, so a stage stopped at its limit
# keeps what it measured. Choose stages with STAGES (default: all, in this order):
#   tests kernels step memory profile
# The whole list does not fit one call: GPU.md splits it into STAGES="tests kernels" and
# STAGES="step memory profile".
# Run from the repository root: bash benchmarks/gpu_session.sh
set -uo pipefail

BUDGET_S=${BUDGET_S:-540}          # whole call, seconds
RESERVE_S=20                       # kept for bundling the results
STAGES=${STAGES:-"tests kernels step memory profile"}
MODEL=${MODEL:-qwen2.5-1.5b}       # the issue's target shape
OUT=${OUT:-/tmp/fastppo-gpu-out}   # set by the device tool; files here come back (8 at most)
RESULTS=/tmp/fastppo-results       # the benchmark results; bundled into $OUT/results.tar.gz
PROFILE=/tmp/fastppo-profile       # the profiled step (a run of its own); bundled into $OUT/traces.tar.gz
SITE=/tmp/site
REPO=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)
rm -rf "$RESULTS" "$PROFILE"       # a machine kept warm between calls still holds the last call's
mkdir -p "$OUT" "$RESULTS" "$PROFILE"

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TRITON_INTERPRET=0          # tests/conftest.py defaults it to 1 (CPU); here Triton runs on the GPU
export TOKENIZERS_PARALLELISM=false
# The copy on the device has no git history: the caller passes the commit (GPU.md), else it is read here.
export FASTPPO_COMMIT=${FASTPPO_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || true)}
# -P: never put the current folder on sys.path (the checkout's kernels/ would shadow Hugging Face's).
PY="python3 -P"

left() { echo $((BUDGET_S - RESERVE_S - ($(date +%s) - START))); }

# stage GROUP NAME SECONDS COMMAND...: run COMMAND (a program, not a shell function: `timeout` runs
# programs) with at most SECONDS, less if the budget is short, when GROUP is in STAGES.
stage() {
  local group=$1 name=$2 want=$3; shift 3
  local have; have=$(left)
  if [[ " $STAGES " != *" $group "* ]]; then return 0; fi
  if (( have < 30 )); then echo "=== $name: SKIPPED (only ${have}s of budget left)"; return 0; fi
  local limit=$(( want < have ? want : have ))
  echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  local t0; t0=$(date +%s)
  # SIGINT first: the benchmarks catch it and keep what they measured; KILL 15 s later
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
  timeout 20 nvidia-smi
  timeout 60 $PY - <<'EOF'
import importlib.metadata as md, os, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
      "| commit", os.environ.get("FASTPPO_COMMIT") or "?")
for name in ("fastppo", "triton", "transformers", "trl", "liger-kernel", "bitsandbytes", "accelerate", "peft",
             "datasets", "pyarrow", "fsspec", "huggingface-hub", "numpy", "matplotlib", "rich"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} MISSING")
import fastppo.kernels, trl  # fail here, loudly, rather than in every stage
EOF
}

bundle() {
  echo "=== bundle"
  timeout 60 $PY -m fastppo.benchmarks.plots --results "$RESULTS" >/dev/null
  timeout 60 $PY -m fastppo.benchmarks.report --results "$RESULTS" --write "$RESULTS/report.md" >/dev/null
  tar -czf "$OUT/results.tar.gz" -C "$RESULTS" .
  # Traces apart, and only under 15 MiB: a file over 16 MiB does not come back, and the rest must.
  tar -czf "$OUT/traces.tar.gz" -C "$PROFILE" .
  if (( $(stat -c %s "$OUT/traces.tar.gz") > 15 * 2**20 )); then
    echo "traces.tar.gz over 15 MiB: dropped (the top-kernel summaries still come back)"
    tar -czf "$OUT/traces.tar.gz" -C "$PROFILE" --exclude='*.trace.json.gz' .
  fi
  cp "$RESULTS/report.md" "$OUT/" 2>/dev/null
  for f in "$RESULTS"/plot-step-*.png "$RESULTS"/plot-memory-*.png "$PROFILE"/*.top-kernels.txt; do
    [[ -f $f ]] && (( $(ls "$OUT" | wc -l) < 8 )) && cp "$f" "$OUT/"
  done
  ls -la "$OUT"
}

session() {
  echo "=== install"
  install || { echo "install FAILED: are the wheels carried? (carry: [\".whl\"], see benchmarks/GPU.md)"; return 1; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  echo "=== versions"
  versions

  cd "$REPO"  # pytest reads pyproject.toml (importlib mode) from here; -P keeps the root off sys.path
  # The small GPU run of the step/memory code is left out: the step and memory stages run it in full.
  stage tests tests 100 $PY -m pytest -q -m gpu -p no:cacheprovider -k "not step_and_memory" tests/ ${GPU_TESTS:-}
  cd /tmp
  stage kernels token_logprobs 140 $PY -m fastppo.benchmarks.bench_token_logprobs --out "$RESULTS"
  stage kernels policy_loss 100 $PY -m fastppo.benchmarks.bench_policy_loss --out "$RESULTS"
  stage kernels linear_loss 130 $PY -m fastppo.benchmarks.bench_linear_loss --out "$RESULTS"
  stage step step 240 $PY -m fastppo.benchmarks.bench_step --model "$MODEL" --out "$RESULTS"
  stage memory memory 170 $PY -m fastppo.benchmarks.bench_memory --model "$MODEL" --budget-s 140 --out "$RESULTS"
  # A run of its own (never the README's figures): a smaller model and short completions keep the
  # trace of a whole step readable and small.
  stage profile profile 75 $PY -m fastppo.benchmarks.bench_step --model qwen2.5-0.5b --completion-len 16 \
    --timed-steps 1 --trainers fastppo,trl --profile --out "$PROFILE"

  bundle
  echo "=== results ($(( $(date +%s) - START ))s in all)"
  timeout 30 $PY -m fastppo.benchmarks.report --results "$RESULTS" --readme-block
}

# session.log counts as one of the 8 files that come back.
session 2>&1 | tee "$OUT/session.log"
