"""The C++ CPU GEMM on layout n16k64 (rgpt_rt._C int4_gemm_n16k64_cpu, the path int4_linear takes
on the CPU for CPU_GEMV_MAX_ROWS < M < CPU_GEMM_MIN_ROWS) against the fp64 reference on the exact
weights W = (q − z)·s, and the CPU dispatch around it.

Tolerance (STYLE.md §4, tests/int4_cases.py): the max error against x @ W.T in fp64 is at most 2×
that of torch's own float32 matmul of the same weights. The kernel sums each group's products
(q − z)·x in fp32 before scaling (the CUDA kernels' arithmetic); summing all K products in one
chain instead was measured up to 3.7× torch's error, so this bound holds by design, not by luck.
A one-hot x reads (q − z)·s back bit for bit (one product per group sum, one exact scaling)."""

import pytest
import torch
from int4_cases import check_int4_output

from rgpt_rt import _C
from rgpt_rt.ops import int4 as int4_ops
from rgpt_rt.ops import int4_layout as layout

PATHS = [True, False] if _C.int4_cpu_has_simd() else [False]
PATH_IDS = ["avx2", "portable"][: len(PATHS)]

SHAPES = {  # id: (N, K, group_size)
    "tiny-qkv-512x256": (512, 256, 128),
    "tiny-gate_up-1536x256": (1536, 256, 128),
    "tiny-down-256x768": (256, 768, 128),
    "odd-N113-K4224": (113, 4096 + 128, 128),
    "N7-K96-g32-half-step": (7, 96, 32),  # K % 64 == 32: the last step's second half is padding
    "N20-K288-g96": (20, 288, 96),  # groups straddle steps and blocks of 256 inputs
    "N300-K512-g64": (300, 512, 64),
    "N18-K768-g256": (18, 768, 256),
}
REAL_SHAPES = {  # LLaMA-7B's: q/k/v/o, stacked q/k/v, stacked gate/up, down (seconds each here)
    "q/k/v/o-4096x4096": (4096, 4096, 128),
    "qkv-12288x4096": (12288, 4096, 128),
    "gate_up-22016x4096": (22016, 4096, 128),
    "down-4096x11008": (4096, 11008, 128),
}


def random_packed(n, k, group_size, max_zero=16, scale=0.02):
    """Random codes, scales and zeros, packed: (qweight, scales, zeros), exact W fp32 [N, K]."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // group_size) * scale + scale / 100).half()
    zeros = torch.randint(0, max_zero + 1, (n, k // group_size), dtype=torch.uint8)
    packed = layout.pack(codes, scales, zeros, group_size)
    return packed, layout.dequantize(*packed, n, k, group_size)


def gemm(x, packed, n, k, group_size, bias=None, threads=1, simd=True):
    """out [M, N] = x [M, K] @ W.T + bias through int4_gemm_n16k64_cpu (float32)."""
    out = torch.empty(x.shape[0], n)
    _C.int4_gemm_n16k64_cpu(
        x.data_ptr(), *(t.data_ptr() for t in packed), 0 if bias is None else bias.data_ptr(),
        out.data_ptr(), x.shape[0], n, k, group_size, threads, simd,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("simd", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("m", [10, 17, 33, 51, 64])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_gemm_matches_the_reference(shape, m, simd):
    n, k, group = SHAPES[shape]
    packed, weight = random_packed(n, k, group)
    x, bias = torch.randn(m, k), torch.randn(n)
    check_int4_output(gemm(x, packed, n, k, group, bias, simd=simd), x, weight, bias)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(name, marks=[] if i == 0 else pytest.mark.slow)
        for i, name in enumerate(REAL_SHAPES)
    ],
)
def test_gemm_matches_the_reference_on_the_7b_shapes(shape):
    n, k, group = REAL_SHAPES[shape]
    packed, weight = random_packed(n, k, group)
    x = torch.randn(40, k)
    check_int4_output(gemm(x, packed, n, k, group, simd=PATHS[0]), x, weight)


@pytest.mark.parametrize("simd", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("m", [1, 8, 65, 130, 200])
def test_every_row_count_and_chunks_of_64_rows(m, simd):
    # one row, less than a vector of 8, and the chunks of 64 rows past the first (+ remainders)
    n, k, group = 61, 640, 128
    packed, weight = random_packed(n, k, group)
    x = torch.randn(m, k)
    check_int4_output(gemm(x, packed, n, k, group, simd=simd), x, weight)


@pytest.mark.parametrize("simd", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("group", [32, 64, 96, 128, 256])
def test_one_hot_rows_read_the_exact_weight_back(group, simd):
    # subnormal, tiny and large scales and zero = 16: each output is one product (q − z)·1 in its
    # group's sum, then · s, exactly
    n, k = 40, 768
    packed, _ = random_packed(n, k, group)
    qweight, scales, zeros = packed
    scales[0, 0, :4] = torch.tensor([2**-24, 3 * 2**-20, 1000.0, 0.1], dtype=torch.float16)
    weight = layout.dequantize(qweight, scales, zeros, n, k, group)
    eye = torch.eye(k)
    out = torch.cat(
        [gemm(eye[i : i + 48], packed, n, k, group, simd=simd) for i in range(0, k, 48)]
    )
    assert torch.equal(out.T, weight)


def test_threads_and_paths_agree():
    # each tile is one thread's, summed in a fixed order: thread counts give the same bits; the
    # portable and AVX2 paths agree within the tolerance (FMA against separate multiply-adds)
    n, k, group = 300, 1024, 128
    packed, weight = random_packed(n, k, group)
    x = torch.randn(37, k)
    one = gemm(x, packed, n, k, group, threads=1, simd=PATHS[0])
    assert torch.equal(one, gemm(x, packed, n, k, group, threads=2, simd=PATHS[0]))
    check_int4_output(gemm(x, packed, n, k, group, threads=2, simd=False), x, weight)


def test_bad_arguments_are_refused():
    packed, _ = random_packed(32, 256, 128)
    x = torch.randn(12, 256)
    with pytest.raises(ValueError, match="multiple of group_size"):
        gemm(x, packed, 32, 256, 96)
    with pytest.raises(ValueError, match="positive multiple of 32"):
        gemm(x, packed, 32, 256, 48)


@pytest.mark.parametrize(
    "m, expected",
    [
        (int4_ops.CPU_GEMV_MAX_ROWS, "gemv"),
        (int4_ops.CPU_GEMV_MAX_ROWS + 1, "gemm"),
        (int4_ops.CPU_GEMM_MIN_ROWS - 1, "gemm"),
        (int4_ops.CPU_GEMM_MIN_ROWS, "torch"),
    ],
)
def test_int4_linear_takes_the_gemm_for_prefill_rows(m, expected, monkeypatch):
    # which kernel int4_linear calls for M rows, and RGPT_INT4_KERNEL=n16k64-dequant turning the
    # GEMM off (the GEMV below 32 rows, torch's GEMM from there: the paths before issue 24)
    calls = []
    monkeypatch.setattr(
        int4_ops, "cpu_gemm", lambda *a: calls.append("torch") or torch.zeros(m, 40)
    )
    for name, path in (("int4_linear_n16k64_cpu", "gemv"), ("int4_gemm_n16k64_cpu", "gemm")):
        monkeypatch.setattr(_C, name, lambda *a, path=path: calls.append(path))
    packed, _ = random_packed(40, 256, 128)
    int4_ops.linear_cpu(torch.randn(m, 256), *packed, None, 40, 128, 1)
    assert calls == [expected]
    calls.clear()
    monkeypatch.setenv("RGPT_INT4_KERNEL", "n16k64-dequant")
    int4_ops.linear_cpu(torch.randn(m, 256), *packed, None, 40, 128, 1)
    assert calls == ["gemv" if m < int4_ops.CPU_DEQUANT_GEMM_MIN_ROWS else "torch"]
