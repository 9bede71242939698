#!/usr/bin/env bash
# The GPU check: build with CUDA for this card only, run tests/gpu, run the GPU benchmarks (old
# kernels beside new ones), the 7B full-size memory path, compute-sanitizer over small mask
# pooling and INT4 cases, and write a JSON summary. Two device calls cover it:
#   DEADLINE=540 bash scripts/gpu_check.sh                                  # tests + benchmarks
#   DEADLINE=540 STEPS="memory sanitizer sanitizer_int4 sanitizer_decode" bash scripts/gpu_check.sh
#
# Every step gets the smaller of its own limit and the time left before DEADLINE seconds
# (default 400), and steps that no longer fit are skipped and reported, so the script ends
# by itself (summary written) before the device call's own limit kills it. STEPS picks the
# steps after the build (default: tests latency decoder decoder_old int4 decode_ops mask_pool
# osprey, run in that order; also memory, sanitizer, sanitizer_int4, sanitizer_decode). decoder_old times the decode step on
# the previous kernels (RGPT_INT4_KERNEL=nk8i, RGPT_DECODE_STEP=unfused) in the same call as
# decoder. memory writes 7B-shaped random folders (~15 GB in $BIG, default /tmp/rgpt_big),
# builds, checks and loads the bundle on CUDA (issue 22's host RSS + device memory target).
# RUNS sets the decoder and latency benchmarks' timed runs.
# Logs go to build/gpu_check; with $OUT set, $OUT receives summary.json and logs.tgz (two
# files: a device call brings back at most eight).
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=build/gpu_check
rm -rf "$LOGS" && mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEADLINE=${DEADLINE:-400}
STEPS=" ${STEPS:-tests latency decoder decoder_old int4 decode_ops mask_pool osprey} "
status=0
started=$(date +%s)
skipped=()

elapsed() { echo $(( $(date +%s) - started )); }
step() { echo; echo "=== $1 ($(elapsed)s)"; }
# limit WANT: the seconds a step may take, or 0 when fewer than 20 are left (15 kept for the summary)
limit() {
  local left=$(( DEADLINE - $(elapsed) - 15 ))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
# run_step KEY NAME WANT LOG COMMAND...: runs COMMAND under its limit, its output to LOG (tail
# shown), when KEY is build or among STEPS
run_step() {
  local key=$1 name=$2 want=$3 log=$4; shift 4
  [ "$key" = build ] || [[ "$STEPS" == *" $key "* ]] || return 0
  local seconds; seconds=$(limit "$want")
  step "$name (limit ${seconds}s)"
  if [ "$seconds" -eq 0 ]; then echo "skipped: out of time"; skipped+=("$name"); status=1; return; fi
  timeout "$seconds" "$@" >"$log" 2>&1
  local rc=$?
  tail -"${TAIL:-15}" "$log"
  [ $rc -eq 124 ] && echo "!! $name: stopped at its ${seconds}s limit"
  [ $rc -eq 0 ] || { echo "!! $name: exit $rc"; status=1; }
}

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$LOGS/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOGS/device.txt"

export CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=native"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
TAIL=40 run_step build "build (CUDA for this card only)" 240 "$LOGS/build.log" \
  $PY -m pip install -v --no-build-isolation --no-deps -e .
$PY -c "import rgpt_rt._C as C, json; print(json.dumps(C.build_info())); print(json.dumps(C.cuda_runtime_info()))" \
  2>&1 | tee "$LOGS/build_info.txt" || status=1

PER_TEST=()
$PY -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 90)
TAIL=30 run_step tests "tests/gpu" 200 "$LOGS/gpu_tests.log" \
  $PY -m pytest -q -rfE --tb=short -m gpu tests/gpu "${PER_TEST[@]}" --junitxml="$LOGS/gpu_tests.xml"

# GPU benchmarks, the Session's end to end first (each writes its JSON into the logs).
TAIL=30 run_step latency "benchmark latency (7B shape, random weights)" 150 "$LOGS/bench_latency.log" \
  $PY benchmarks/latency.py --preset rgpt-7b --random-weights --device cuda --runs ${RUNS:-10} \
  --json "$LOGS/bench_latency.json"
TAIL=45 run_step decoder "benchmark decoder (7B shape, random weights, INT4 and fp16)" 150 "$LOGS/bench_decoder.log" \
  $PY benchmarks/decoder.py --device cuda --preset rgpt-7b --random-weights --runs ${RUNS:-5} --profile \
  --json "$LOGS/bench_decoder.json"
TAIL=45 RGPT_INT4_KERNEL=nk8i RGPT_DECODE_STEP=unfused run_step decoder_old \
  "benchmark decoder, previous kernels (nk8i GEMV, unfused step)" 150 "$LOGS/bench_decoder_old.log" \
  $PY benchmarks/decoder.py --device cuda --preset rgpt-7b --random-weights --runs ${RUNS:-5} --profile \
  --json "$LOGS/bench_decoder_old.json"
TAIL=30 run_step int4 "benchmark int4 (GEMV, GEMM, dequantise; n16k64 beside nk8i)" 150 "$LOGS/bench_int4.log" \
  $PY benchmarks/int4.py --device cuda --json "$LOGS/bench_int4.json"
TAIL=20 run_step decode_ops "benchmark fused decode ops (add_rms_norm, rope_kv_append, attention, silu_mul)" 60 \
  "$LOGS/bench_decode_ops.log" $PY benchmarks/decode_ops.py --device cuda --json "$LOGS/bench_decode_ops.json"
TAIL=14 run_step mask_pool "benchmark mask_pool" 60 "$LOGS/bench_mask_pool.log" \
  $PY benchmarks/mask_pool.py --device cuda --json "$LOGS/bench_mask_pool.json"
TAIL=20 run_step osprey "benchmark Osprey-7B stages (1024 image tokens), random weights" 120 \
  "$LOGS/bench_osprey.log" $PY benchmarks/osprey_stages.py --preset osprey-7b --device cuda \
  --runs ${RUNS:-5} --json "$LOGS/bench_osprey.json"
TAIL=20 run_step memory "7B full-size path: folders, build, --check, load + describe on CUDA" 420 \
  "$LOGS/bench_memory.log" $PY benchmarks/memory.py --work "${BIG:-/tmp/rgpt_big}" --device cuda \
  --threads "$(nproc)" --json "$LOGS/bench_memory.json"

# compute-sanitizer: memcheck over the small mask pooling cases with torch's caching allocator
# off, so each tensor is its own allocation and a read past one is caught (graph capture needs
# the cache: those tests are left out), then racecheck of its shared-memory reductions; then
# memcheck of the INT4 GEMV on split-K and tiny shapes (a split's last chunks, rows past N).
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [[ "$STEPS" == *" sanitizer"* ]] && [ ! -x "$SANITIZER" ]; then
  echo "compute-sanitizer not found: sanitizer runs skipped"; skipped+=(sanitizer); status=1
elif [[ "$STEPS" == *" sanitizer"* ]]; then
  TAIL=8 PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step sanitizer "compute-sanitizer memcheck: mask pool (small cases)" 180 \
    "$LOGS/sanitizer_memcheck.log" "$SANITIZER" --tool memcheck --error-exitcode 9 \
    $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_mask_pool_cuda.py \
    -k "small and not graph and (float16 or bool or uint8 or pixel or empty or bad_input)"
  TAIL=8 run_step sanitizer "compute-sanitizer racecheck: mask pool (small cases)" 60 \
    "$LOGS/sanitizer_racecheck.log" "$SANITIZER" --tool racecheck --error-exitcode 9 \
    $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_mask_pool_cuda.py -k "small_awkward and float16 and area"
  TAIL=8 PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step sanitizer_int4 "compute-sanitizer memcheck: INT4 GEMV (split-K, tiny)" 60 \
    "$LOGS/sanitizer_int4.log" "$SANITIZER" --tool memcheck --error-exitcode 9 \
    $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_int4_cuda.py -k "split_k or (tiny and not 128)"
  TAIL=8 PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step sanitizer_int4 "compute-sanitizer memcheck: INT4 GEMM" 90 \
    "$LOGS/sanitizer_int4_gemm.log" "$SANITIZER" --tool memcheck --error-exitcode 9 \
    $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_int4_gemm_cuda.py -k "split_k or one_hot or N7 or bad"
fi
if [[ "$STEPS" == *" sanitizer_decode "* ]] && [ -x "$SANITIZER" ]; then
  # the split-KV attention: shared memory and an atomic combine
  TAIL=8 PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step sanitizer_decode "compute-sanitizer memcheck: decode attention" 90 \
    "$LOGS/sanitizer_decode.log" "$SANITIZER" --tool memcheck --error-exitcode 9 \
    $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_decode_fused_cuda.py -k "decode_attention_cuda and (tiny or hd96)"
  TAIL=8 run_step sanitizer_decode "compute-sanitizer racecheck: decode attention" 90 \
    "$LOGS/sanitizer_decode_race.log" "$SANITIZER" --tool racecheck --error-exitcode 9 \
    $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_decode_fused_cuda.py -k "decode_attention_cuda and tiny"
fi

step "summary"
$PY - "$LOGS" "$status" "$(elapsed)" "${skipped[@]}" <<'PY'
import json, pathlib, sys
import xml.etree.ElementTree as ET

logs, status, seconds, skipped = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
summary = {"ok": status == 0, "seconds": seconds, "skipped": skipped,
           "device": (logs / "device.txt").read_text().strip()}
for path in sorted(logs.glob("bench_*.json")):
    summary[path.stem] = json.loads(path.read_text())
def last_line(name):
    path = logs / name
    lines = path.read_text().strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "not run"
summary["gpu_tests"] = last_line("gpu_tests.log")
failures = {}
if (logs / "gpu_tests.xml").exists():
    for case in ET.parse(logs / "gpu_tests.xml").getroot().iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failures[f"{case.get('classname')}::{case.get('name')}"] = (bad.get("message") or "")[:400]
summary["gpu_test_failures"] = failures
for tool in ("memcheck", "racecheck", "int4", "int4_gemm", "decode", "decode_race"):
    summary[f"sanitizer_{tool}"] = last_line(f"sanitizer_{tool}.log")
(logs / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
print(json.dumps({k: v for k, v in summary.items() if not k.startswith("bench_")}, indent=2))
PY
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$LOGS/summary.json" "$OUT/summary.json"
  tar czf "$OUT/logs.tgz" -C "$LOGS" .
fi
exit $status
