#!/usr/bin/env bash
# benchmarks/gpu_check.sh OUTDIR -- the whole GPU check of fused_attn in one go.
#
# For a machine with an NVIDIA GPU and no network, where python3 already has torch, triton, nvcc
# and ninja (e.g. the H200 machine: torch 2.11, triton 3.6, CUDA 13). Everything runs from the
# checkout (PYTHONPATH). Steps (a failing step does not stop the ones after it):
#   0. machine  nvidia-smi, versions, torch.cuda.is_available(); without a CUDA device every step is
#               skipped (summary ok: false) unless GPU_CHECK_WITHOUT_DEVICE=1 (dry runs on a CPU machine)
#   1. build    setup.py build_ext --inplace (fused_attn._C with its CUDA kernels), in the background
#               (GPU_CHECK_SKIP_INSTALL=1: use the checkout as it is)
#   2. tests    tests_triton: the Triton test files compiled for this GPU (no TRITON_INTERPRET),
#               beside the build; then, once the build is done, tests_gpu: pytest -m gpu over
#               tests/, tests/test_cuda_backend.py first (its bad-input tests must not kill the
#               process unseen). Both with FUSED_ATTN_TRITON_AUTOTUNE=0: one config per kernel and
#               key, none timed (correctness; the TMA tests force TMA on, so both load paths run)
#   3. bench    bench_rotary: benchmarks/bench_rotary.py (RoPE against the Hugging Face formula, eager
#               and compiled), only with time to spare beside the sweep's; then bench:
#               python -m fused_attn.bench --shapes quick --baselines eager,sdpa ${BENCH_ARGS} (bf16;
#               the quick set leads with the rows docs/gpu-notes.md predicts; no torch.compile
#               baseline, whose Inductor compiles would take the sweep's minutes; a --shapes or
#               --baselines in BENCH_ARGS wins, e.g. BENCH_ARGS="--baselines eager,sdpa,compile")
#   4. summary  OUTDIR/summary.json and a short table, printed last
#
# Time: one deadline for the whole run, GPU_CHECK_MINUTES (default 8; fractional minutes, e.g. 8.5,
# are taken to the second; anything but a positive number stops the script with one line, and a
# summary.json saying why) from the start less 10 s for the last summary. Each step's limit is
# what is left less a reserve kept for the steps after it (limit_for below), at most its cap; a
# step left under 30 s is skipped, and says so. A step gets its signal (TERM; INT for pytest,
# which then still prints the failures it saw and writes its junit file) 10 s before its limit
# and SIGKILL at it. The reserves, for the planned
# GPU_CHECK_MINUTES=9 call (killed at ~560 s):
#   build + tests_triton  everything but 330 s (the GPU tests' 200 + the sweep's 120 + 10 s for the
#                         backends check): ~190 s; the build takes ~130 s on 8 of the 16 cores
#   tests_gpu             everything but the sweep's 120 s: >= 200 s (it took 64 s for 244 tests
#                         on 2026-11-29; several hundred cases were added since)
#   bench_rotary          at most 90 s, and only what the sweep's 120 s leave (often nothing)
#   bench                 the rest, >= 120 s: --max-minutes ends 45 s before its limit: no case
#                         starts after it, nor an implementation within a case (a quick-set
#                         attention case with autotuning takes up to ~40 s). If the limit still
#                         cuts it, the sweep writes what it timed on the signal, and a complete
#                         bench.json with no fused failure and at least one fused row the oracle
#                         passed makes the step a "soft limit": shown, not a failure of the run
#                         (benchmarks/gpu_check_summary.py)
# With a shorter total the later steps' reserves shrink (at most 65 % of what is left is kept back
# from the build, 50 % from the GPU tests), so the build still gets a share. GPU_CHECK_PLAN=1 prints
# this plan (every step running to its limit) without running anything.
#
# OUTDIR receives at most 8 files (the device tool brings back 8): gpu_check.log, summary.json,
# bench.json, bench.csv, attention_fwd.png, attention_fwd_bwd.png, rotary.json, and build.log when
# the build fails (its error lines and its end, at most 4 MB). summary.json is rewritten (atomically)
# after every step, so a call killed at any point keeps what was done; on SIGTERM/SIGINT the running
# step is stopped and recorded as interrupted, and the summary written. Exit code: 0 when there is
# a CUDA device and every step passed (a test step that collects nothing does not pass; a sweep
# at a soft limit passes, see above), 2 for a GPU_CHECK_MINUTES that is no positive number, else 1.
#
# Checked on a CPU machine with a stand-in python whose long steps hang (tests/test_bench.py runs the
# plan, the SIGTERM and the no-device cases; by hand: GPU_CHECK_MINUTES=4 GPU_CHECK_WITHOUT_DEVICE=1
# PYTHON=hanging-python ends within 4 minutes with every step at its time limit).
set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
PLAN=${GPU_CHECK_PLAN:-}
MINUTES=${GPU_CHECK_MINUTES:-8}
# whole seconds from here on; bash arithmetic takes no fractions (8.5 was a syntax error that
# killed the script before any summary), so awk reads the minutes; empty when not a positive number
TOTAL_S=$(awk -v m="$MINUTES" \
    'BEGIN { if (m ~ /^([0-9]+[.]?[0-9]*|[.][0-9]+)$/ && int(m * 60) >= 1) print int(m * 60) }')
SUMMARY_S=10      # kept for the last summary (it imports torch to print the sweep's table)
GRACE_S=10        # a step's signal comes this long before its limit, SIGKILL at the limit
MIN_STEP_S=30     # a step left less than this is skipped
TESTS_MIN_S=200   # the GPU tests' reserve (see the header)
SWEEP_MIN_S=120   # the sweep's reserve
BETWEEN_S=10      # the backends check and the summaries between the steps
LOG="$OUT/gpu_check.log"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # this run's steps file, junit files, build log: nothing stale
STEPS="$WORK/steps"
: > "$STEPS"
if [ -z "$PLAN" ]; then
    : > "$LOG"
    # this script's files from an earlier run into OUTDIR would pass for this run's
    rm -f "$OUT"/{summary.json,build.log,rotary.json,bench.json,bench.csv,attention_fwd.png,attention_fwd_bwd.png}
else
    LOG=/dev/null
fi
START=$(date +%s)
VCLOCK=$START  # the plan's clock
if [ -z "$TOTAL_S" ]; then  # refused in one line; summary.json says why (one line in the steps file)
    MSG="GPU_CHECK_MINUTES=${MINUTES//[$'\n\r']/ }: expected a positive number of minutes (e.g. 8 or 8.5)"
    echo "error $MSG" >> "$STEPS"
    echo "gpu_check: $MSG" | tee -a "$LOG" >&2
    [ -z "$PLAN" ] && timeout 60 "$PY" benchmarks/gpu_check_summary.py "$OUT" "$WORK" 0 --final 2>&1 | tee -a "$LOG"
    rm -rf "$WORK"
    exit 2
fi
DEADLINE=$(( START + TOTAL_S - SUMMARY_S ))
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
CUR_PID="" CUR_NAME="" CUR_SIG=TERM CUR_T0=0 CUR_LIMIT=0
BUILD_PID="" BUILD_T0=0 BUILD_LIMIT=0 BUILD_END=0

now() { if [ -n "$PLAN" ]; then echo "$VCLOCK"; else date +%s; fi; }
elapsed() { echo $(( $(now) - START )); }
left() { echo $(( DEADLINE - $(now) )); }
say() { echo "=== [$(elapsed) s] $*" | tee -a "$LOG"; }
# record NAME RC SECONDS LIMIT [NOTE]: one line of the steps file (RC '-': the step did not run or finish)
record() { echo "$*" >> "$STEPS"; }

# limit_for CAP RESERVE PCT: what is left, less RESERVE for the steps after this one (but less at most
# PCT % of what is left, so that a short total still gives this step a share), at most CAP
limit_for() {
    local cap=$1 reserve=$2 pct=$3 left keep limit
    left=$(left)
    keep=$(( left * pct / 100 ))
    [ "$reserve" -lt "$keep" ] && keep=$reserve
    limit=$(( left - keep ))
    [ "$limit" -gt "$cap" ] && limit=$cap
    echo "$limit"
}

# summary [--final|--interrupted]: OUTDIR/summary.json from the steps so far (atomically)
summary() {
    [ -n "$PLAN" ] && return 0
    timeout 60 "$PY" benchmarks/gpu_check_summary.py "$OUT" "$WORK" "$(elapsed)" "$@"
}

# the device tool brings back files of at most 16 MiB: keep a runaway log's start and end
cap_log() {
    local size
    size=$(stat -c %s "$LOG" 2>/dev/null || echo 0)
    if [ "$size" -gt $(( 15 << 20 )) ]; then
        { head -c $(( 4 << 20 )) "$LOG"; printf '\n[... %s bytes cut ...]\n' "$size"; tail -c $(( 10 << 20 )) "$LOG"; } \
            > "$WORK/log" && mv "$WORK/log" "$LOG"
    fi
}

# save_build_log HOW: OUTDIR/build.log from a failed or stopped build: its error lines (and around
# them) and its end, at most 4 MB (the device tool brings back files of at most 16 MiB)
save_build_log() {
    {
        echo "== build: $1; lines with 'error' or 'FAILED:' (and around them)"
        grep -n -i -E -B3 -A12 'error|FAILED:' "$WORK/build.log" | head -n 4000
        echo "== the last 300 lines"
        tail -n 300 "$WORK/build.log"
    } 2>&1 | head -c $(( 4 << 20 )) > "$OUT/build.log"
}

# shellcheck disable=SC2317 # stop_group and on_signal run from the trap
# stop_group PID SIGNAL: the step's timeout passes SIGNAL on to the step's process group (timeout
# leads its own group); whatever of the group is still there after 8 s is killed
stop_group() {
    local pid=$1 sig=$2
    [ -n "$pid" ] || return 0
    kill -s "$sig" "$pid" 2>/dev/null
    for _ in $(seq 16); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null
    kill -KILL "$pid" 2>/dev/null
    return 0
}

# shellcheck disable=SC2317
on_signal() {
    trap '' TERM INT
    local sig=$1 t
    t=$(date +%s)
    say "gpu_check: SIG$sig: stopping ${CUR_NAME:-} ${BUILD_PID:+build}; writing the summary"
    [ -n "$CUR_PID" ] && record "$CUR_NAME" - $(( t - CUR_T0 )) "$CUR_LIMIT" "interrupted (SIG$sig)"
    [ -n "$BUILD_PID" ] && record build - $(( t - BUILD_T0 )) "$BUILD_LIMIT" "interrupted (SIG$sig)"
    summary --interrupted >> "$LOG" 2>&1  # at once: a SIGKILL may follow soon
    [ -n "$CUR_PID" ] && kill -s "$CUR_SIG" "$CUR_PID" 2>/dev/null
    [ -n "$BUILD_PID" ] && kill -TERM "$BUILD_PID" 2>/dev/null
    stop_group "$CUR_PID" "$CUR_SIG"
    stop_group "$BUILD_PID" TERM
    [ -n "$BUILD_PID" ] && save_build_log "stopped by SIG$sig after $(( t - BUILD_T0 )) s"
    summary --interrupted 2>&1 | tee -a "$LOG"  # again: with the junit file pytest wrote on its way out
    cap_log
    rm -rf "$WORK"
    exit 1
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# run_step NAME LIMIT SIGNAL CMD...: CMD under LIMIT (SIGNAL at LIMIT - GRACE_S, SIGKILL at LIMIT),
# output to the log, in the background with a wait (so that the trap runs at once on a signal)
run_step() {
    local name=$1 limit=$2 sig=$3 rc t0
    shift 3
    if [ "$limit" -lt "$MIN_STEP_S" ]; then
        record "$name" - 0 "$(( limit > 0 ? limit : 0 ))" "skipped: $(( limit > 0 ? limit : 0 )) s left for it"
        say "$name: skipped (only $limit s left for it)"
        summary >> "$LOG" 2>&1
        return 0
    fi
    say "$name (limit $limit s): $*"
    if [ -n "$PLAN" ]; then
        VCLOCK=$(( VCLOCK + limit ))
        record "$name" 0 "$limit" "$limit" plan
        return 0
    fi
    t0=$(date +%s)
    timeout --signal="$sig" --kill-after="$GRACE_S" "$(( limit - GRACE_S ))" "$@" >> "$LOG" 2>&1 &
    CUR_PID=$! CUR_NAME=$name CUR_SIG=$sig CUR_T0=$t0 CUR_LIMIT=$limit
    wait "$CUR_PID"
    rc=$?
    CUR_PID=""
    record "$name" "$rc" $(( $(date +%s) - t0 )) "$limit"
    say "$name: exit $rc after $(( $(date +%s) - t0 )) s"
    summary >> "$LOG" 2>&1
    return "$rc"
}

# ---- 0. the machine ----------------------------------------------------------------------------
if [ -n "$PLAN" ]; then
    VCLOCK=$(( VCLOCK + 5 ))
    record cuda 1 plan
else
    {
        echo "=== machine"
        timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
        timeout 20 nvcc --version 2>&1 | tail -n 2
    } >> "$LOG" 2>&1
    # versions to the log; "cuda 0|1 NAME" (torch.cuda.is_available()) to the steps file
    CUDA_LINE=$(timeout 60 "$PY" -c "import sys, torch, triton
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton',
      triton.__version__, file=sys.stderr)
ok = torch.cuda.is_available()
print('cuda', int(ok), torch.cuda.get_device_name(0) if ok else '')" 2>> "$LOG")
    case "$CUDA_LINE" in
        "cuda "*) record "$CUDA_LINE" ;;
        *) record cuda 0 ;;
    esac
fi
CUDA_OK=$(awk '$1 == "cuda" {print $2}' "$STEPS")
say "torch.cuda.is_available(): $([ "$CUDA_OK" = 1 ] && echo True || echo False)"
# the Triton test files, compiled for this GPU (their *_aot.py twins check compilation on CPU machines)
TRITON_TESTS=()
for f in tests/*triton*.py; do
    case "$f" in *conftest*|*_aot.py) ;; *) [ -e "$f" ] && TRITON_TESTS+=("$f") ;; esac
done
# the steps a passing run must have run (bench_rotary may be skipped for time)
REQUIRED="$([ -z "${GPU_CHECK_SKIP_INSTALL:-}" ] && echo "build ")$([ ${#TRITON_TESTS[@]} -gt 0 ] && echo "tests_triton ")tests_gpu bench"
record required "$REQUIRED"
if [ "$CUDA_OK" != 1 ] && [ -z "${GPU_CHECK_WITHOUT_DEVICE:-}" ]; then
    for name in $REQUIRED; do record "$name" - 0 0 "skipped: no CUDA device"; done
    say "no CUDA device: nothing to check (GPU_CHECK_WITHOUT_DEVICE=1 runs the steps anyway)"
    summary --final 2>&1 | tee -a "$LOG"
    rm -rf "$WORK"
    exit 1
fi
summary >> "$LOG" 2>&1

# ---- 1. build the C++/CUDA extension in place, in the background ----------------------------------
# It overlaps the Triton test files, which do not need fused_attn._C; the GPU tests wait for it.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
FIRST_RESERVE=$(( TESTS_MIN_S + SWEEP_MIN_S + BETWEEN_S ))
if [ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
    BUILD_LIMIT=$(limit_for 240 "$FIRST_RESERVE" 65)
    if [ "$BUILD_LIMIT" -lt "$MIN_STEP_S" ]; then
        run_step build "$BUILD_LIMIT" TERM true  # records the skip
    else
        say "build (background, limit $BUILD_LIMIT s): setup.py build_ext --inplace"
        BUILD_T0=$(now)
        if [ -n "$PLAN" ]; then
            BUILD_END=$(( VCLOCK + BUILD_LIMIT ))
        else
            timeout --kill-after="$GRACE_S" "$(( BUILD_LIMIT - GRACE_S ))" env MAX_JOBS="${MAX_JOBS:-8}" \
                FUSED_ATTN_REQUIRE_EXTENSION=1 "$PY" setup.py build_ext --inplace > "$WORK/build.log" 2>&1 &
            BUILD_PID=$!
        fi
    fi
fi

# ---- 2. tests ------------------------------------------------------------------------------------
# -v: one line per test as it finishes, so a step cut short still says what passed and failed
PYTEST_ARGS=(-v -p no:cacheprovider -rfE --tb=short)
# 8 workers: the Triton files compile hundreds of kernel variants, each on one core (16 here)
if [ -z "$PLAN" ] && timeout 30 "$PY" -c "import xdist" 2>/dev/null; then PYTEST_ARGS+=(-n 8); fi
if [ -z "$PLAN" ] && timeout 30 "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_ARGS+=(--timeout=120); fi
if [ ${#TRITON_TESTS[@]} -gt 0 ]; then
    run_step tests_triton "$(limit_for 200 "$FIRST_RESERVE" 65)" INT env FUSED_ATTN_TRITON_AUTOTUNE=0 \
        "$PY" -m pytest "${PYTEST_ARGS[@]}" -m "not gpu" "${TRITON_TESTS[@]}" --junitxml="$WORK/junit_tests_triton.xml"
else
    say "no tests/*triton*.py files"
fi
if [ -n "$PLAN" ] && [ "$BUILD_END" -gt 0 ]; then
    [ "$BUILD_END" -gt "$VCLOCK" ] && VCLOCK=$BUILD_END
    record build 0 "$BUILD_LIMIT" "$BUILD_LIMIT" plan
    echo "=== [$(( BUILD_END - START )) s] build: done (plan)"
elif [ -n "$BUILD_PID" ]; then
    wait "$BUILD_PID"
    rc=$?
    BUILD_PID=""
    record build "$rc" $(( $(date +%s) - BUILD_T0 )) "$BUILD_LIMIT"
    if [ "$rc" = 0 ]; then
        tail -n 5 "$WORK/build.log" >> "$LOG"
    else
        save_build_log "exit $rc (limit $BUILD_LIMIT s)"
        tail -n 20 "$WORK/build.log" >> "$LOG"
    fi
    say "build: exit $rc after $(( $(date +%s) - BUILD_T0 )) s$([ "$rc" = 0 ] || echo "; its errors in build.log")"
    summary >> "$LOG" 2>&1
fi
if [ -n "$PLAN" ]; then
    VCLOCK=$(( VCLOCK + 5 ))
else
    timeout 60 "$PY" -c "import fused_attn, json; print('backends:', json.dumps({n: b['available'] or b['reasons'] \
for n, b in fused_attn.available_backends().items()}))" 2>&1 | tee -a "$LOG"
fi
# every GPU-marked test, the CUDA backend's file first (pytest keeps the order of the files it is
# given, where a folder would be collected in name order)
GPU_TESTS=(tests/test_cuda_backend.py)
for f in tests/test_*.py; do [ "$f" = tests/test_cuda_backend.py ] || GPU_TESTS+=("$f"); done
run_step tests_gpu "$(limit_for 270 "$SWEEP_MIN_S" 50)" INT env FUSED_ATTN_TRITON_AUTOTUNE=0 "$PY" -m pytest \
    "${PYTEST_ARGS[@]}" -m gpu "${GPU_TESTS[@]}" --junitxml="$WORK/junit_tests_gpu.xml"

# ---- 3. the rotary benchmark (with time to spare), then the sweep: the rest ----------------------
run_step bench_rotary "$(limit_for 90 "$SWEEP_MIN_S" 100)" TERM "$PY" benchmarks/bench_rotary.py --out "$OUT/rotary.json"
BENCH_S=$(limit_for 100000 0 0)
# the sweep stops starting work (cases, and implementations within one) after --max-minutes (shared
# between the ops) and writes what it has on SIGTERM; 45 s before the signal leave the last case
# (autotuning included) time to end. No torch.compile baseline by default (its compiles would take
# the sweep's time); later flags win, so BENCH_ARGS="--baselines eager,sdpa,compile" brings it back
# shellcheck disable=SC2086 # BENCH_ARGS: more arguments
run_step bench "$BENCH_S" TERM "$PY" -m fused_attn.bench --out "$OUT" --budget 0.05 --shapes quick \
    --baselines eager,sdpa --max-minutes "$(awk "BEGIN {m = ($BENCH_S - $GRACE_S - 45) / 60; print (m > 0.25 ? m : 0.25)}")" ${BENCH_ARGS:-}

# ---- 4. summary ------------------------------------------------------------------------------------
if [ -n "$PLAN" ]; then
    echo "=== [$(elapsed) s] end of the plan (total $TOTAL_S s)"
    cat "$STEPS"
    rm -rf "$WORK"
    exit 0
fi
summary --final 2>&1 | tee -a "$LOG"
rc=$?
cap_log
rm -rf "$WORK"
exit "$rc"
