#!/usr/bin/env bash
# The one GPU check: build with CUDA for this card only, run tests/gpu, run the GPU
# benchmarks, and write a JSON summary to $OUT (when set). Meant for a single device call
# of about 6 minutes:  bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
status=0
started=$(date +%s)

step() { echo; echo "=== $1 ($(( $(date +%s) - started ))s)"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/device.txt"

step "build (CUDA for this card only)"
export CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=native"
if ! $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "build failed"; status=1
fi
$PY -c "import rgpt_rt._C as C, json; print(json.dumps(C.build_info())); print(json.dumps(C.cuda_runtime_info()))" | tee "$OUT/build_info.txt" || status=1

step "tests/gpu"
$PY -m pytest -q -m gpu tests/gpu --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# compute-sanitizer over the small mask pooling cases (about 2 minutes together): memcheck
# with torch's caching allocator off, so each tensor is its own allocation and a read past
# one is caught (graph capture needs the cache: those tests are left out), then racecheck
# of the shared-memory reductions.
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$SANITIZER" ]; then
  step "compute-sanitizer memcheck: mask pool (small cases)"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 100 "$SANITIZER" --tool memcheck --error-exitcode 9 \
    $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_mask_pool_cuda.py \
    -k "small and not graph and (float16 or bool or uint8 or pixel or empty or bad_input)" \
    2>&1 | tee "$OUT/sanitizer_memcheck.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  step "compute-sanitizer racecheck: mask pool (small cases)"
  timeout 60 "$SANITIZER" --tool racecheck --error-exitcode 9 \
    $PY -m pytest -q -x -p no:cacheprovider tests/gpu/test_mask_pool_cuda.py \
    -k "small_awkward and float16 and area" 2>&1 | tee "$OUT/sanitizer_racecheck.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "compute-sanitizer not found: mask pool sanitizer runs skipped"; status=1
fi

# GPU benchmarks: each writes its JSON into $OUT (added by the kernel and runtime issues).
for bench in benchmarks/mask_pool.py benchmarks/int4.py; do
  [ -f "$bench" ] || continue
  name=$(basename "$bench" .py)
  step "benchmark $name"
  timeout 120 $PY "$bench" --device cuda --json "$OUT/bench_$name.json" 2>&1 | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
if [ -f benchmarks/latency.py ]; then
  step "benchmark latency (7B shape, random weights)"
  timeout 180 $PY benchmarks/latency.py --preset rgpt-7b --random-weights --device cuda --json "$OUT/bench_latency.json" 2>&1 | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ -f benchmarks/decoder.py ]; then
  step "benchmark decoder (7B shape, random weights; INT4 when rgpt_rt.quant exists)"
  timeout 300 $PY benchmarks/decoder.py --device cuda --preset rgpt-7b --random-weights --runs 5 --json "$OUT/bench_decoder.json" 2>&1 | tail -12
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

step "summary"
$PY - "$OUT" "$status" "$(( $(date +%s) - started ))" <<'PY'
import json, pathlib, sys
out, status, seconds = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
summary = {"ok": status == 0, "seconds": seconds, "device": (out / "device.txt").read_text().strip()}
for path in sorted(out.glob("bench_*.json")):
    summary[path.stem] = json.loads(path.read_text())
log = out / "gpu_tests.log"
summary["gpu_tests"] = log.read_text().strip().splitlines()[-1] if log.exists() else "not run"
for tool in ("memcheck", "racecheck"):
    log = out / f"sanitizer_{tool}.log"
    lines = log.read_text().strip().splitlines() if log.exists() else []
    summary[f"sanitizer_{tool}"] = lines[-1] if lines else "not run"
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: v for k, v in summary.items() if not k.startswith("bench_")}, indent=2))
PY
exit $status
