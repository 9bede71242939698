"""The tensor-core W4A16 GEMM on layout n16k64 (rgpt_rt._C int4_gemm_n16k64_cuda: the prefill of a
question, M = 9..64 rows) against the exact formula in fp64 on the weights of
rgpt_rt/ops/int4_layout.py, through the binding and through int4_linear; the split-K workspace it
shares with the GEMV; CUDA-graph capture.

Tolerance (STYLE.md §4, tests/int4_cases.py): the max error against x @ W.T in fp64 is at most 2×
that of torch's own same-precision matmul (x @ W.to(x.dtype).T: cuBLAS, fp32 accumulation) on the
same GPU. The kernel's products (q − z)·x are exact and its sums fp32, then × s per group, so it
rounds less than torch does on W rounded to fp16/bf16. A one-hot x reads (q − z)·s back rounded
once to x's dtype, bit for bit. Not yet run on a GPU (written without one: issue 24)."""

import functools

import pytest
import torch
from int4_cases import check_int4_output, one_hot_readback, random_packed

from rgpt_rt import _C
from rgpt_rt.ops import int4 as int4_ops
from rgpt_rt.ops import int4_linear
from rgpt_rt.ops.int4_format import Int4Weight, dequantize
from rgpt_rt.runtime.int4_linear import Int4Linear

DEVICE = "cuda"
TAGS = {torch.float16: 1, torch.bfloat16: 2}  # int4.h Int4DType
DTYPES = list(TAGS)
DTYPE_IDS = ["fp16", "bf16"]
pytestmark = pytest.mark.skipif(
    not hasattr(_C, "int4_gemm_n16k64_cuda"),
    reason="rgpt_rt._C has no n16k64 CUDA GEMM: rebuild with nvcc (`make install`)",
)

SHAPES = {  # id: (N, K, group_size)
    "q/k/v/o-4096x4096": (4096, 4096, 128),
    "qkv-stacked-12288x4096": (12288, 4096, 128),
    "gate_up-stacked-22016x4096": (22016, 4096, 128),
    "down-4096x11008": (4096, 11008, 128),
    "N113-K4224": (113, 4096 + 128, 128),
    "N64-K4224-small-N": (64, 4096 + 128, 128),  # split-K
    "N7-K96-g32-half-step": (7, 96, 32),  # K % 64 == 32: the last step's second half is padding
    "N20-K288-g96": (20, 288, 96),  # groups that straddle steps
    "N300-K512-g64": (300, 512, 64),
    "N136-K768-g256": (136, 768, 256),  # a group spans two stages
}


@functools.cache
def weight_of(shape: str):
    """random_packed for a SHAPES entry, made once per session (the 7B ones take a moment)."""
    n, k, group = SHAPES[shape]
    return random_packed(n, k, group)


def gemm(x, packed, n, k, group_size, bias=None, splits=None):
    """out [M, N] = x [M, K] @ W.T + bias through int4_gemm_n16k64_cuda and the shared workspace."""
    m = x.shape[0]
    index = torch.cuda.current_device()
    if splits is None:
        splits = int4_ops.gemm_splits(m, n, k, group_size, index)
    partial = _C.int4_gemm_n16k64_partial_bytes(m, n, splits)
    space = int4_ops.gemv_workspace(DEVICE, partial).data_ptr()
    out = torch.empty(m, n, dtype=x.dtype, device=DEVICE)
    _C.int4_gemm_n16k64_cuda(
        x.data_ptr(), *(t.data_ptr() for t in packed), 0 if bias is None else bias.data_ptr(),
        out.data_ptr(), space, space + int4_ops.COUNTER_BYTES, m, n, k, group_size, splits,
        TAGS[x.dtype], torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [9, 16, 17, 33, 51, 64])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_gemm_matches_the_reference(shape, m, dtype):
    n, k, group = SHAPES[shape]
    packed, weight = weight_of(shape)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    check_int4_output(gemm(x, packed, n, k, group), x, weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", range(9, 65))
def test_every_row_count_with_bias(m, dtype):
    n, k, group = 301, 1024, 128
    packed, weight = random_packed(n, k, group)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    out = gemm(x, packed, n, k, group, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    check_int4_output(out, x, weight, bias)


@pytest.mark.parametrize("m", [1, 8, 65, 128, 200, 640])
def test_any_row_count_runs_as_blocks_of_64_rows(m):
    # the kernel takes any M (blocks in z take 64 rows each): what the benchmark times past 64
    n, k, group = 4096, 4096, 128
    packed, weight = random_packed(n, k, group)
    x = torch.randn(m, k, device=DEVICE).half()
    check_int4_output(gemm(x, packed, n, k, group), x, weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group", [32, 64, 96, 128, 256])
def test_one_hot_rows_read_the_exact_weight_back(dtype, group):
    # each output is (q − z)·1 in its group's sum, then · s in fp32 (exact), rounded once to x's
    # dtype: subnormal and large scales, zero = 16 included
    out, weight = one_hot_readback(gemm, 40, 768, group, dtype, rows=48)
    assert torch.equal(out.T, weight.to(dtype))


def test_bf16_activations_beyond_fp16_range():
    n, k = 64, 512
    packed, weight = random_packed(n, k)
    x = (torch.randn(20, k, device=DEVICE) * 1e6).bfloat16()
    x[10:] *= 1e-12
    check_int4_output(gemm(x, packed, n, k, 128), x, weight)


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 8, 16])
def test_split_k_is_deterministic_and_leaves_the_counters_zero(splits):
    n, k, group = 200, 4096 + 128, 128
    packed, weight = random_packed(n, k, group)
    x = torch.randn(40, k, device=DEVICE).half()
    bias = torch.randn(n, device=DEVICE).half()
    first = gemm(x, packed, n, k, group, bias, splits=splits)
    check_int4_output(first, x, weight, bias)
    for _ in range(3):
        assert torch.equal(gemm(x, packed, n, k, group, bias, splits=splits), first)
    assert not int4_ops.gemv_workspace(DEVICE, 0)[: int4_ops.COUNTER_BYTES].any()


def test_gemv_and_gemm_share_the_workspace_across_weights():
    # split-K launches of weights with different N, GEMV and GEMM interleaved: each one's partial
    # sums start after every counter, so none corrupts a counter another one relies on
    shapes = [(64, 8192), (4096, 4096), (512, 8192), (136, 4096)]
    weights = [random_packed(n, k) for n, k in shapes]
    for _ in range(2):
        for (n, k), (packed, weight) in zip(shapes, weights):
            for m, splits in ((4, 3), (24, 4)):
                x = torch.randn(m, k, device=DEVICE).half()
                args = (*packed, None, n, 128)
                path = "gemv" if m <= int4_ops.GEMV_MAX_ROWS else "gemm"
                out = int4_ops.linear_cuda(x, *args, splits=splits, path=path)
                check_int4_output(out, x, weight)
    assert not int4_ops.gemv_workspace(DEVICE, 0)[: int4_ops.COUNTER_BYTES].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_int4_linear_takes_the_gemm_up_to_its_bound(dtype, monkeypatch):
    # 9..GEMM_MAX_ROWS rows go through the GEMM (fp16/bf16 x), more through dequantize + cuBLAS;
    # RGPT_INT4_KERNEL=n16k64-dequant takes the latter for every M > 8 (the path before issue 24)
    assert int4_ops.prefill_path(9, dtype) == "gemm"
    assert int4_ops.prefill_path(int4_ops.GEMM_MAX_ROWS, dtype) == "gemm"
    assert int4_ops.prefill_path(int4_ops.GEMM_MAX_ROWS + 1, dtype) == "dequant"
    assert int4_ops.prefill_path(20, torch.float32) == "dequant"
    w = Int4Weight.pack(
        torch.randint(0, 16, (96, 512), dtype=torch.uint8, device=DEVICE),
        (torch.rand(96, 4, device=DEVICE) * 0.02).half(),
        torch.randint(0, 17, (96, 4), dtype=torch.uint8, device=DEVICE),
        128,
    )
    for m in (9, 40, 64, 65):
        x = torch.randn(m, 512, device=DEVICE).to(dtype)
        check_int4_output(int4_linear(x, w), x, dequantize(w))
    monkeypatch.setenv("RGPT_INT4_KERNEL", "n16k64-dequant")
    assert int4_ops.prefill_path(20, dtype) == "dequant"


def test_a_layer_made_on_the_gpu_captures_a_prefill_without_a_warm_up(monkeypatch):
    # Int4Linear reserves the split-K workspace for every GEMM row count when made on the device,
    # so a CUDA graph of a 33-row prefill captured before any call allocates nothing
    packed, weight = random_packed(4096, 4096)
    w = Int4Weight(*packed, 128, (4096, 4096))
    static_x = torch.randn(33, 4096, device=DEVICE).half()
    int4_linear(static_x, w)  # loads the kernel (lazy module loading), then a fresh start:
    monkeypatch.setattr(int4_ops, "_GEMV_WORKSPACES", {})
    layer = Int4Linear(w)
    space = int4_ops.gemv_workspace(DEVICE, 0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    assert int4_ops.gemv_workspace(DEVICE, 0) is space  # not reallocated
    for _ in range(3):
        static_x.copy_(torch.randn(33, 4096, device=DEVICE).half())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, layer(static_x))
        check_int4_output(static_out, static_x, weight)


def test_bad_arguments_are_refused():
    n, k = 32, 256
    packed, _ = random_packed(n, k)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        x = torch.randn(12, k, device=DEVICE)
        _C.int4_gemm_n16k64_cuda(
            x.data_ptr(), *(t.data_ptr() for t in packed), 0, x.data_ptr(), 0, 0,
            12, n, k, 128, 1, 0, torch.cuda.current_stream().cuda_stream,
        )  # fmt: skip
    unaligned = torch.randn(12 * k + 1, device=DEVICE).half()[1:].view(12, k)
    with pytest.raises(ValueError, match="16-byte aligned"):
        gemm(unaligned, packed, n, k, 128, splits=1)
    with pytest.raises(ValueError, match="split-K takes at most 64 rows"):
        gemm(torch.randn(65, k, device=DEVICE).half(), packed, n, k, 128, splits=2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        gemm(torch.randn(12, k, device=DEVICE).half(), packed, n, k, 96, splits=1)
