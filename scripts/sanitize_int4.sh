#!/usr/bin/env bash
# Runs the INT4 CPU kernels under AddressSanitizer + UBSan: builds a C++-only wheel with
# RGPT_SANITIZE=ON in a temporary folder and calls rgpt_rt._C.int4_linear_cpu on awkward shapes
# (1..9 rows of x, odd N, group sizes 32..256, both the AVX2 and the portable path, 1..3 threads)
# against dequantize + matmul. Python runs with -S so the sanitized module, not the editable
# install, is imported. Takes a few minutes on 2 cores:  bash scripts/sanitize_int4.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, but still the venv's python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" -C build-dir="$work/build" \
  -C cmake.define.RGPT_SANITIZE=ON -C cmake.define.RGPT_CUDA=OFF . >"$work/log" 2>&1 || { cat "$work/log"; exit 1; }
mkdir -p "$work/site"
(cd "$work/site" && unzip -q "$work"/wheel/rgpt_rt-*.whl)
site_packages=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cd "$work"
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
PYTHONPATH="$work/site:$site_packages" "$PY" -S - <<'PY'
import torch

from rgpt_rt import _C
from rgpt_rt.ops.int4_format import Int4Weight, dequantize

assert _C.__file__.startswith(__import__("os").getcwd()), _C.__file__  # the sanitized build
torch.manual_seed(0)
runs = 0
for n, k, group in [(1, 32, 32), (3, 96, 32), (7, 256, 64), (5, 512, 256), (33, 384, 128)]:
    w = Int4Weight(
        torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32),
        (torch.rand(n, k // group) * 0.02).half(),
        torch.randint(0, 17, (n, k // group), dtype=torch.uint8),
        group, (n, k),
    )
    reference_weight = dequantize(w).double()
    for m in range(1, 10):
        x, bias = torch.randn(m, k), torch.randn(n)
        reference = x.double() @ reference_weight.T + bias.double()
        for simd in (True, False):
            for threads in (1, 2, 3):
                out = torch.empty(m, n)  # exactly sized: a read or write past it is reported
                _C.int4_linear_cpu(
                    x.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(), w.zeros.data_ptr(),
                    bias.data_ptr(), out.data_ptr(), m, n, k, group, threads, simd,
                )
                assert (out.double() - reference).abs().max() < 1e-3, (n, k, group, m, simd)
                runs += 1
print(f"int4_linear_cpu under ASan + UBSan: {runs} runs clean (AVX2 path here: {_C.int4_cpu_has_simd()})")
PY
