#!/usr/bin/env bash
# one-off GPU re-check of this session's fixes (see the session notes); OUT=$1
set -u
OUT=$1; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
unset TRITON_INTERPRET
S=$(date +%s); el() { echo $(( $(date +%s) - S )); }
LOG=$OUT/recheck.log; : > "$LOG"
( MAX_JOBS=8 FUSED_ATTN_REQUIRE_EXTENSION=1 timeout 220 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo "build rc $? at $(el) s" >> "$OUT/build.log" ) &
BUILD=$!
echo "== [$(el)] triton tests" | tee -a "$LOG"
timeout -s INT -k 10 100 env FUSED_ATTN_TRITON_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -n 8 --timeout=90 \
  tests/test_triton_layer_norm.py tests/test_triton_feed_forward.py tests/test_triton_attention.py \
  -k "layer_norm or column_chunks or wide_layer or tma_path or additive or dropout_with_mask" >> "$LOG" 2>&1
echo "== [$(el)] triton tests rc $?" | tee -a "$LOG"
tail -n 25 "$LOG" | grep -E "passed|failed|FAILED|ERROR" | tail -n 15
echo "== [$(el)] probe" | tee -a "$LOG"
timeout -k 5 40 env FUSED_ATTN_TRITON_AUTOTUNE=0 python3 .scratch/probe.py "$OUT" >> "$LOG" 2>&1
echo "== [$(el)] probe rc $?" | tee -a "$LOG"
grep -E "^(mask_f32|overhead)" "$LOG" | cut -c1-220
echo "== [$(el)] waiting for the build" | tee -a "$LOG"
wait $BUILD; tail -n 3 "$OUT/build.log" | tee -a "$LOG"
echo "== [$(el)] cuda tests" | tee -a "$LOG"
timeout -s INT -k 10 60 python3 -m pytest -q -p no:cacheprovider -rfE --tb=short -n 4 --timeout=55 -m gpu tests/test_cuda_backend.py \
  -k "raw_op or sanitizer or attention_matches_reference" >> "$LOG" 2>&1
echo "== [$(el)] cuda tests rc $?" | tee -a "$LOG"
tail -n 30 "$LOG" | grep -E "passed|failed|FAILED|ERROR|crashed" | tail -n 12
python3 .scratch/badop.py cpu 2>&1 | tail -n 2 | tee -a "$LOG"
if ! timeout 20 python3 .scratch/badop.py cuda >> "$LOG" 2>&1; then
  echo "== [$(el)] cuda bad-input op crashed; cuda-gdb backtrace" | tee -a "$LOG"
  timeout 45 cuda-gdb -q -batch -ex run -ex bt --args python3 .scratch/badop.py cuda > "$OUT/gdb.log" 2>&1
  grep -E "^#|signal" "$OUT/gdb.log" | head -n 30
else
  tail -n 1 "$LOG"
fi
LEFT=$(( 300 - $(el) ))
echo "== [$(el)] bench (${LEFT} s left)" | tee -a "$LOG"
if [ "$LEFT" -gt 45 ]; then
  timeout -k 15 $(( LEFT - 10 )) python3 -m fused_attn.bench --out "$OUT/bench" --ops attention --shapes quick \
    --passes fwd,fwd+bwd --baselines sdpa --backend triton --no-memory --no-plots --budget 0.05 \
    --max-minutes "$(awk "BEGIN {print ($LEFT - 30) / 60}")" >> "$LOG" 2>&1
  echo "== [$(el)] bench rc $?" | tee -a "$LOG"
  python3 - "$OUT/bench/bench.json" <<'PY'
import json, sys
try:
    b = json.load(open(sys.argv[1]))
except Exception as e:
    print("no bench.json", e); raise SystemExit
for r in b["rows"]:
    sp = r.get("speedup") or {}
    print(f"{r['pass']:7s} {r['shape']:26s} {r['impl']:14s} {r['median_ms']:8.3f} ms {r['throughput']:6.0f} TF/s",
          " ".join(f"{k}={v:.2f}" for k, v in sp.items() if k.startswith("sdpa")))
PY
fi
echo "== done at $(el) s"
