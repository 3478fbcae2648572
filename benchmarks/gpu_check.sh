#!/usr/bin/env bash
# benchmarks/gpu_check.sh OUTDIR -- the whole GPU check of fused_attn in one go.
#
# For a machine with an NVIDIA GPU and no network, where python3 already has torch, triton, nvcc
# and ninja (e.g. the H200 machine: torch 2.11, triton 3.6, CUDA 13). Steps, each under its own
# time limit; a failing step does not stop the ones after it:
#   1. build    setup.py build_ext --inplace (fused_attn._C with its CUDA kernels), in the background;
#               everything runs from the checkout (PYTHONPATH)
#   2. tests    the Triton test files (compiled, no TRITON_INTERPRET; they overlap the build), then,
#               once the build is done, pytest -m gpu tests/; both with FUSED_ATTN_TRITON_AUTOTUNE=0:
#               one config per kernel and key, none timed (correctness; the TMA tests force TMA
#               on, so both load paths run)
#   3. bench    benchmarks/bench_rotary.py (RoPE against the Hugging Face formula, eager and compiled;
#               90 s at most, its JSON written after each case), then python -m fused_attn.bench --out OUTDIR (bf16 sweep, fitted to the
#               time left)
#   4. summary  OUTDIR/summary.json and a short table, printed last
# OUTDIR receives at most 7 files: gpu_check.log, bench.json, bench.csv, attention_fwd.png,
# attention_fwd_bwd.png, rotary.json, summary.json. Time limits: the build 240 s (beside the Triton tests), the
# GPU tests 270 s, the Triton test files 170 s (hundreds of kernel variants to compile, 8 workers), the sweep
# what is left of GPU_CHECK_MINUTES (default 8) less 45 s, at most 5 minutes and at least 1.
# Exit code: 0 when every step passed, else 1.
set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
TOTAL_S=$(( ${GPU_CHECK_MINUTES:-8} * 60 ))
LOG="$OUT/gpu_check.log"
STEPS=$(mktemp /tmp/gpu_check_steps.XXXXXX)
: > "$LOG"
: > "$STEPS"
START=$(date +%s)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME LIMIT_S CMD...: run CMD with a time limit, output to the log, record rc and duration.
# The limit sends STEP_SIGNAL (TERM; the test steps use INT, on which pytest still prints the
# failures it has seen so far -- a run cut short keeps its diagnosis)
step() {
    local name=$1 limit=$2
    shift 2
    echo "=== [$(elapsed) s] $name (limit ${limit} s): $*" | tee -a "$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout --signal="${STEP_SIGNAL:-TERM}" --kill-after=20 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    echo "$name $rc $(( $(date +%s) - t0 ))" >> "$STEPS"
    echo "=== [$(elapsed) s] $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
    return $rc
}

# ---- 0. the machine ----------------------------------------------------------------------------
{
    echo "=== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
    "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| gpu', torch.cuda.get_device_name(0) \
if torch.cuda.is_available() else 'NO CUDA DEVICE')" 2>&1
    nvcc --version 2>&1 | tail -n 2
} >> "$LOG" 2>&1

# ---- 1. build the C++/CUDA extension in place, in the background ----------------------------------
# Everything runs from the checkout (PYTHONPATH). The build (~130 s on 8 of the 16 cores) overlaps
# the Triton test files, which do not need fused_attn._C; the GPU tests wait for it.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BUILD_PID=""
if [ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]; then  # GPU_CHECK_SKIP_INSTALL: a dry run, use the checkout as it is
    echo "=== [$(elapsed) s] build (background): setup.py build_ext --inplace" | tee -a "$LOG"
    (
        t0=$(date +%s)
        timeout --kill-after=20 240 env MAX_JOBS="${MAX_JOBS:-8}" FUSED_ATTN_REQUIRE_EXTENSION=1 \
            "$PY" setup.py build_ext --inplace > /tmp/gpu_check_build.log 2>&1
        echo "build $? $(( $(date +%s) - t0 ))" >> "$STEPS"
    ) &
    BUILD_PID=$!
fi

# ---- 2. tests ------------------------------------------------------------------------------------
# -v: one line per test as it finishes, so a step cut short still says what passed and failed
PYTEST_ARGS=(-v -p no:cacheprovider -rfE --tb=short)
# 8 workers: the Triton files compile hundreds of kernel variants, each on one core (16 here)
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS+=(-n 8); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout=120); fi
# the Triton test files, compiled for this GPU (their *_aot.py twins check compilation on CPU machines)
TRITON_TESTS=$(ls tests/*triton*.py 2>/dev/null | grep -v -e conftest -e '_aot\.py$' || true)
if [ -n "$TRITON_TESTS" ]; then
    # shellcheck disable=SC2086 - a list of file names without spaces
    STEP_SIGNAL=INT step tests_triton 170 env FUSED_ATTN_TRITON_AUTOTUNE=0 "$PY" -m pytest "${PYTEST_ARGS[@]}" -m "not gpu" $TRITON_TESTS \
        --junitxml=/tmp/gpu_check_tests_triton.xml
else
    echo "=== no tests/*triton*.py files" | tee -a "$LOG"
fi
if [ -n "$BUILD_PID" ]; then
    wait "$BUILD_PID"
    tail -n 5 /tmp/gpu_check_build.log >> "$LOG"
    echo "=== [$(elapsed) s] build: $(grep '^build ' "$STEPS" | tail -n 1)" | tee -a "$LOG"
fi
"$PY" -c "import fused_attn, json; print('backends:', json.dumps({n: b['available'] or b['reasons'] \
for n, b in fused_attn.available_backends().items()}))" 2>&1 | tee -a "$LOG"
# every GPU-marked test (the CUDA backend's first: its bad-input tests must not crash the process)
STEP_SIGNAL=INT step tests_gpu 270 env FUSED_ATTN_TRITON_AUTOTUNE=0 "$PY" -m pytest "${PYTEST_ARGS[@]}" -m gpu tests/ --junitxml=/tmp/gpu_check_tests_gpu.xml

# ---- 3. the rotary benchmark, then the sweep: whatever is left of the total, at most 5 minutes ----
step bench_rotary 90 "$PY" benchmarks/bench_rotary.py --out "$OUT/rotary.json"
LEFT=$(( TOTAL_S - $(elapsed) - 45 ))
BENCH_S=$(( LEFT < 300 ? LEFT : 300 ))
if [ "$BENCH_S" -lt 60 ]; then BENCH_S=60; fi
# the sweep stops starting new cases after --max-minutes (its time shared between the ops), and
# writes what it has on SIGTERM; the hard limit leaves it 25 s more for the last case and the files
step bench $(( BENCH_S + 25 )) "$PY" -m fused_attn.bench --out "$OUT" --budget 0.05 \
    --max-minutes "$(awk "BEGIN {print ($BENCH_S - 20) / 60}")" ${BENCH_ARGS:-}

# ---- 4. summary ------------------------------------------------------------------------------------
"$PY" - "$OUT" "$STEPS" "$(elapsed)" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, os, sys
import xml.etree.ElementTree as ET

out, steps_file, elapsed = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = {}
for line in open(steps_file):
    name, rc, seconds = line.split()
    steps[name] = {"exit": int(rc), "seconds": int(seconds), "ok": int(rc) == 0}
    if name.startswith("tests") and int(rc) == 5:  # pytest: no tests collected (none marked yet)
        steps[name].update(ok=True, note="no tests collected")
for name in ("tests_gpu", "tests_triton"):
    path = f"/tmp/gpu_check_{name}.xml"
    if name in steps and os.path.exists(path):
        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        steps[name].update(counts)
bench = {}
bench_path = os.path.join(out, "bench.json")
if os.path.exists(bench_path):
    bench = json.load(open(bench_path))
summary = {"ok": all(s["ok"] for s in steps.values()) and "bench" in steps, "elapsed_s": elapsed,
           "steps": steps, "machine": bench.get("machine"), "ceilings": bench.get("ceilings"),
           "bench_not_run": len(bench.get("not_run", [])), "bench_summary": bench.get("summary", []),
           "triton_autotuner_choices": bench.get("triton_autotuner_choices", {})}
rotary_path = os.path.join(out, "rotary.json")
if os.path.exists(rotary_path):
    summary["rotary"] = json.load(open(rotary_path))["rows"]
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1, default=str)

print("\n== gpu_check steps ==")
for name, s in steps.items():
    extra = "" if "tests" not in s else \
        f"  {s['passed']} passed, {s['failures']} failed, {s['errors']} errors, {s['skipped']} skipped"
    print(f"{name:13s} {'ok    ' if s['ok'] else 'FAILED'} exit {s['exit']:3d}  {s['seconds']:4d} s{extra}"
          f"{'  (' + s['note'] + ')' if 'note' in s else ''}")
if bench:
    try:
        from fused_attn.bench import format_summary
        print()
        print(format_summary(bench.get("summary", []), bench.get("ceilings", {}), bench["machine"]))
    except Exception as exc:  # the bench summary is in bench.json anyway
        print(f"(could not format the bench summary: {exc})")
print(f"\ngpu_check: {'OK' if summary['ok'] else 'FAILED'} in {elapsed} s; files in {out}: "
      + ", ".join(sorted(f for f in os.listdir(out) if not f.startswith("."))))
PYEOF
rm -f "$STEPS"
FAILED=$("$PY" -c "import json,sys; print(0 if json.load(open(sys.argv[1]))['ok'] else 1)" "$OUT/summary.json" 2>/dev/null || echo 1)
exit "$FAILED"
