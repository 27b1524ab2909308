#!/usr/bin/env bash
# One GPU call, start to finish, inside one time budget (benchmarks/GPU.md fits it to the lease):
#   install (the carried wheels, fastppo's own prebuilt) -> versions (no CUDA device: stop, failed)
#   -> the gate (the kernel GPU tests; failing, or running no test: stop and bundle what a fix on
#   the CPU needs) -> kernel benchmarks, target case first -> the GRPO step against TRL -> the other
#   GPU tests -> memory search -> a profiled step -> results bundled into $OUT -> a table last.
# Every stage is time-boxed against the budget; a stage that would not fit is skipped and says so,
# and every benchmark writes its results file as it goes, so a stage stopped at its limit keeps
# what it measured. Stage groups, chosen with STAGES (default: the first call's, "tests kernels"):
#   tests (the gate first, the other GPU tests after the benchmarks), kernels, step, memory, profile
# Run from the repository root: bash benchmarks/gpu_session.sh
set -uo pipefail

BUDGET_S=${BUDGET_S:-480}          # whole call, seconds
RESERVE_S=20                       # kept for bundling the results
STAGES=${STAGES:-"tests kernels"}
MODEL=${MODEL:-qwen2.5-1.5b}       # the issue's target shape
# The step job of a short call: fastppo and TRL (one timed step each after a warm-up), then the
# rollout table (bench_rollout), TRL's default generate first (the ratios' base), the static sampler
# (its compile, ~1-1.5 min, is the unknown) next; estimated ~200 s of the stage's 240 (none measured).
STEP_ARGS=${STEP_ARGS:-"--trainers fastppo,trl --samplers trl-generate,static,continuous-batching,generate,trl-continuous-batching --timed-steps 1"}
OUT=${OUT:-/tmp/fastppo-gpu-out}   # set by the device tool; files here come back (8 at most)
RESULTS=/tmp/fastppo-results       # the benchmark results; bundled into $OUT/results.tar.gz
PROFILE=/tmp/fastppo-profile       # the profiled step (a run of its own); bundled into $OUT/traces.tar.gz
# The path must contain 'site-packages': dill (datasets' fingerprinting) pickles a module by value
# when its file lies anywhere else, and Dataset.from_dict then fails with a PicklingError.
SITE=/tmp/fastppo-gpu/site-packages
REPO=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TRITON_INTERPRET=0          # tests/conftest.py defaults it to 1 (CPU); here Triton runs on the GPU
export TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=/tmp/fastppo-triton-cache  # TTIR, PTX, cubin: bundled when the gate fails
# The copy on the device has no git history: the caller passes the commit (GPU.md), else it is read here.
export FASTPPO_COMMIT=${FASTPPO_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || true)}
# -P: never put the current folder on sys.path (the checkout's kernels/ would shadow Hugging Face's).
PY="python3 -P"

# A machine kept warm still holds the last call's results; its Triton cache (keyed by source hash)
# is kept, so a second call does not compile every kernel again inside its short budget.
rm -rf "$RESULTS" "$PROFILE"
mkdir -p "$OUT" "$RESULTS" "$PROFILE"

left() { echo $((BUDGET_S - RESERVE_S - ($(date +%s) - START))); }

# stage GROUP NAME SECONDS COMMAND...: run COMMAND (a program, not a shell function: `timeout` runs
# programs) with at most SECONDS, less if the budget is short, when GROUP is in STAGES. Returns
# COMMAND's exit code (0 when not run because GROUP is not chosen, 1 when skipped for time).
stage() {
  local group=$1 name=$2 want=$3; shift 3
  local have; have=$(left)
  if [[ " $STAGES " != *" $group "* ]]; then return 0; fi
  if (( have < 30 )); then echo "=== $name: SKIPPED (only ${have}s of budget left)"; return 1; fi
  local limit=$(( want < have ? want : have ))
  echo "=== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  local t0; t0=$(date +%s)
  # SIGINT first: the benchmarks catch it and keep what they measured; KILL 15 s later
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' (TIMED OUT)')"
  return $rc
}

install() {
  # fastppo comes prebuilt (GPU.md builds .whl/fastppo-*.whl beside the others): no source build here.
  if ! compgen -G "$REPO/.whl/fastppo-*.whl" >/dev/null; then
    echo "no fastppo wheel in .whl/ (benchmarks/GPU.md, step 1)"
    return 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$REPO"/.whl/*.whl || return 1
  # A wheel built before the last edit would measure other code than the commit it is reported as:
  # every module of the checkout must be in it, byte for byte, and it must hold no other.
  local pair src dst file stale=0
  for pair in fastppo:fastppo kernels:fastppo/kernels benchmarks:fastppo/benchmarks; do
    src=$REPO/${pair%%:*} dst=$SITE/${pair#*:}
    while IFS= read -r file; do
      cmp -s "$src/$file" "$dst/$file" || { echo "stale fastppo wheel: $dst/$file differs from the checkout"; stale=1; }
    done < <(cd "$src" && find . -name '*.py' -not -path '*/__pycache__/*')
    while IFS= read -r file; do
      case $pair in fastppo:*) [[ $file == ./kernels/* || $file == ./benchmarks/* ]] && continue ;; esac
      [[ -f $src/$file ]] || { echo "stale fastppo wheel: $dst/$file is not in the checkout"; stale=1; }
    done < <(cd "$dst" && find . -name '*.py' -not -path '*/__pycache__/*')
  done
  return $stale
}

versions() {
  timeout 20 nvidia-smi
  timeout 60 $PY - <<'EOF'
import importlib.metadata as md, os, sys, torch
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: nothing measured here would be a GPU figure")
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

# tests_ran JUNIT_XML: succeeds when the file exists and records at least one test that ran (not skipped).
tests_ran() {
  $PY - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    suites = list(ET.parse(sys.argv[1]).getroot().iter("testsuite"))
except (OSError, ET.ParseError) as error:
    sys.exit(f"no JUnit record: {error}")
ran = sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites)
print(f"{ran} tests ran")
sys.exit(0 if ran > 0 else 1)
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
  if [[ ${GATE_FAILED:-0} == 1 ]]; then  # what a fix on the CPU needs: the compiled kernels' stages
    tar -czf "$OUT/triton-cache.tar.gz" -C "$TRITON_CACHE_DIR" . 2>/dev/null
  fi
  cp "$RESULTS/report.md" "$OUT/" 2>/dev/null
  for f in "$RESULTS"/plot-step-*.png "$RESULTS"/plot-memory-*.png "$PROFILE"/*.top-kernels.txt; do
    [[ -f $f ]] && (( $(ls "$OUT" | wc -l) < 8 )) && cp "$f" "$OUT/"
  done
  ls -la "$OUT"
}

session() {
  echo "=== install"
  install || { echo "install FAILED: are the wheels carried and fresh? (carry: [\".whl\"], GPU.md step 1)"; return 1; }
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  echo "=== versions"
  versions || { echo "versions FAILED: stopping, nothing measured"; return 1; }

  cd "$REPO"  # pytest reads pyproject.toml (importlib mode) from here; -P keeps the root off sys.path
  local gate_files=(tests/kernels/test_token_logprobs.py tests/kernels/test_ppo_loss_backends.py)
  local pytest_gpu=($PY -m pytest -q -m gpu -p no:cacheprovider)
  # The gate: the compiled kernels against float64 at the target shapes. Nothing is measured on
  # kernels that fail it, nor after a gate that ran no test.
  if [[ " $STAGES " == *" tests "* ]]; then
    # 150 s: a cold Triton cache compiles some 25 kernel variants first (~2 s each offline)
    stage tests gate 150 "${pytest_gpu[@]}" --junitxml="$RESULTS/junit-gate.xml" "${gate_files[@]}"
    local gate_rc=$?
    if (( gate_rc != 0 )) || ! tests_ran "$RESULTS/junit-gate.xml"; then
      echo "=== gate FAILED (exit $gate_rc): stopping here; the Triton cache comes back for the fix"
      GATE_FAILED=1
      bundle
      return 1
    fi
  fi
  cd /tmp
  stage kernels token_logprobs 120 $PY -m fastppo.benchmarks.bench_token_logprobs --out "$RESULTS"
  stage kernels policy_loss 90 $PY -m fastppo.benchmarks.bench_policy_loss --out "$RESULTS"
  stage kernels linear_loss 110 $PY -m fastppo.benchmarks.bench_linear_loss --out "$RESULTS"
  # shellcheck disable=SC2086  # STEP_ARGS is a list of flags
  stage step step 240 $PY -m fastppo.benchmarks.bench_step --model "$MODEL" $STEP_ARGS --out "$RESULTS"
  cd "$REPO"
  # The small GPU run of the step/memory code is left out: the step and memory stages run it in full.
  # shellcheck disable=SC2086  # GPU_TESTS: more test files
  stage tests tests 100 "${pytest_gpu[@]}" --junitxml="$RESULTS/junit-tests.xml" -k "not step_and_memory" \
    "${gate_files[@]/#/--ignore=}" tests/ ${GPU_TESTS:-}
  cd /tmp
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
