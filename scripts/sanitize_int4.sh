#!/usr/bin/env bash
# Runs the INT4 CPU kernels under AddressSanitizer + UBSan: builds a C++-only wheel with
# RGPT_SANITIZE=ON in a temporary folder and calls rgpt_rt._C's n16k64 kernels
# (int4_linear_n16k64_cpu, int4_dequant_n16k64_cpu) and the previous nk8i one (int4_linear_cpu)
# on awkward shapes (1..9 rows of x, odd N, group sizes 32..256, both the AVX2 and the portable
# path, 1..3 threads, every tensor exactly sized) against dequantize + matmul. Python runs with -S
# so the sanitized module, not the editable install, is imported. Takes a few minutes on 2 cores:
#   bash scripts/sanitize_int4.sh
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
from rgpt_rt.ops import int4_layout as layout

assert _C.__file__.startswith(__import__("os").getcwd()), _C.__file__  # the sanitized build
torch.manual_seed(0)
runs = 0
for n, k, group in [(1, 32, 32), (3, 96, 32), (7, 256, 64), (5, 512, 256), (33, 384, 128), (20, 288, 96)]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group) * 0.02).half()
    zeros = torch.randint(0, 17, (n, k // group), dtype=torch.uint8)
    packed = [t.clone() for t in layout.pack(codes, scales, zeros, group)]  # exactly sized
    old = (layout.pack_nk8i(codes), scales, zeros)
    weights = {
        "n16k64": (_C.int4_linear_n16k64_cpu, packed, layout.dequantize_plain(codes, scales, zeros, group)),
        "n16k64 gemm": (_C.int4_gemm_n16k64_cpu, packed, layout.dequantize_plain(codes, scales, zeros, group)),
        "nk8i": (_C.int4_linear_cpu, old, layout.dequantize_nk8i(*old, group).float()),
    }
    for simd in (True, False):
        for threads in (1, 2, 3):
            for rows in ((0, n), (n // 3, n)):
                out = torch.empty(rows[1] - rows[0], k)
                _C.int4_dequant_n16k64_cpu(
                    *(t.data_ptr() for t in packed), out.data_ptr(), n, k, group, *rows, threads, simd
                )
                assert torch.equal(out, weights["n16k64"][2][rows[0] : rows[1]]), (n, k, group, rows)
                runs += 1
    for m in (*range(1, 10), 10, 33, 70):  # the GEMV's rows, and the GEMM's
        x, bias = torch.randn(m, k), torch.randn(n)
        for name, (kernel, tensors, weight) in weights.items():
            reference = x.double() @ weight.double().T + bias.double()
            for simd in (True, False):
                for threads in (1, 2, 3):
                    out = torch.empty(m, n)  # exactly sized: a read or write past it is reported
                    kernel(
                        x.data_ptr(), *(t.data_ptr() for t in tensors), bias.data_ptr(),
                        out.data_ptr(), m, n, k, group, threads, simd,
                    )
                    assert (out.double() - reference).abs().max() < 1e-3, (name, n, k, group, m, simd)
                    runs += 1
print(f"INT4 CPU kernels under ASan + UBSan: {runs} runs clean (AVX2 path here: {_C.int4_cpu_has_simd()})")
PY
