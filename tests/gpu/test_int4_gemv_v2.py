"""The n16k64 INT4 kernels on CUDA (rgpt_rt._C int4_gemv_n16k64_cuda, int4_dequant_n16k64_cuda)
against the exact weights W = (q − z)·s of rgpt_rt/ops/int4_layout.py, through the bindings
(int4_linear and Int4Linear over them: tests/gpu/test_int4_cuda.py).

Tolerances (STYLE.md §4): fp16 and bf16 x: the max error against the fp64 reference at most 2×
that of torch's own same-precision matmul (x @ W.to(x.dtype).T, fp32 accumulation) on the same
GPU. fp32 x: the kernel splits x into three bf16 parts and sums on the tensor cores, whose fp32
accumulation is not IEEE round-to-nearest, so the bound is 2^-20 × (Σ_k |x_k · W[n, k]| + |bias|)
per output (16× fp32's unit roundoff). The dequantized weights and one-hot reads are exact."""

import pytest
import torch
from int4_cases import check_int4_output, one_hot_readback, random_packed

from rgpt_rt import _C

DEVICE = "cuda"
TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # int4.h Int4DType
pytestmark = pytest.mark.skipif(
    not hasattr(_C, "int4_gemv_n16k64_cuda"),
    reason="rgpt_rt._C has no n16k64 CUDA kernels: rebuild with nvcc (`make install`)",
)


def multiprocessors() -> int:
    return torch.cuda.get_device_properties(DEVICE).multi_processor_count


_workspaces: dict[int, torch.Tensor] = {}


def workspace(nbytes: int) -> torch.Tensor:
    """A zeroed workspace of at least nbytes, kept (the kernel leaves its counters zero)."""
    if nbytes > _workspaces.get(0, torch.empty(0)).numel():
        _workspaces[0] = torch.zeros(max(nbytes, 1 << 20), dtype=torch.uint8, device=DEVICE)
    return _workspaces[0]


def gemv(x, packed, n, k, group_size, bias=None, splits=None):
    """out [M, N] = x [M, K] @ W.T + bias through int4_gemv_n16k64_cuda."""
    qweight, scales, zeros = packed
    m = x.shape[0]
    if splits is None:
        splits = _C.int4_gemv_n16k64_splits(n, k, multiprocessors())
    space = workspace(_C.int4_gemv_n16k64_workspace_bytes(m, n, splits))
    out = torch.empty(m, n, dtype=x.dtype, device=DEVICE)
    _C.int4_gemv_n16k64_cuda(
        x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        0 if bias is None else bias.data_ptr(), out.data_ptr(), space.data_ptr(),
        m, n, k, group_size, splits, TAGS[x.dtype], torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    return out


def check(out, x, weight, bias=None):
    check_int4_output(out, x, weight, bias, tensor_cores=x.dtype == torch.float32)


SHAPES = {  # id: (N, K, group_size)
    "q/k/v/o-4096x4096": (4096, 4096, 128),
    "qkv-fused-12288x4096": (12288, 4096, 128),
    "gate_up-fused-22016x4096": (22016, 4096, 128),
    "down-4096x11008": (4096, 11008, 128),
    "lm_head-32000x4096": (32000, 4096, 128),
    "N113-K4224": (113, 4096 + 128, 128),
    "N64-K4224-small-N": (64, 4096 + 128, 128),
    "N7-K96-g32-half-step": (7, 96, 32),
    "N20-K288-g96": (20, 288, 96),
    "N300-K512-g64": (300, 512, 64),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_gemv_matches_the_reference(shape, m, dtype):
    n, k, group = SHAPES[shape]
    packed, weight = random_packed(n, k, group)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    check(gemv(x, packed, n, k, group), x, weight)


@pytest.mark.parametrize("dtype", list(TAGS), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m", range(1, 9))
def test_every_row_count_with_bias(m, dtype):
    n, k, group = 301, 1024, 128
    packed, weight = random_packed(n, k, group)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    out = gemv(x, packed, n, k, group, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    check(out, x, weight, bias)


def test_bf16_activations_beyond_fp16_range():
    # bf16 x stays bf16 in the MMA: values past fp16's 65504 and below its normal range are fine
    n, k = 64, 512
    packed, weight = random_packed(n, k)
    x = (torch.randn(2, k, device=DEVICE) * 1e6).bfloat16()
    x[1] *= 1e-12
    check(gemv(x, packed, n, k, 128), x, weight)


@pytest.mark.parametrize("dtype", list(TAGS), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_gemv_reads_the_exact_weight_back(dtype, group):
    # one-hot rows of x: each output is 1·W[n, k] = (q − z)·s, rounded once to x's dtype
    # (subnormal and large scales, zero = 16 included)
    out, weight = one_hot_readback(gemv, 40, 512, group, dtype, rows=8)
    assert torch.equal(out.T, weight.to(dtype))


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16])
def test_split_k_is_deterministic_and_leaves_the_counters_zero(splits):
    n, k, group = 64, 4096 + 128, 128
    packed, weight = random_packed(n, k, group)
    x = torch.randn(4, k, device=DEVICE).half()
    bias = torch.randn(n, device=DEVICE).half()
    first = gemv(x, packed, n, k, group, bias, splits=splits)
    check(first, x, weight, bias)
    for _ in range(3):
        assert torch.equal(gemv(x, packed, n, k, group, bias, splits=splits), first)
    tiles = -(-n // 16)
    assert not workspace(0)[: 4 * tiles].any()  # the last block of each tile reset its counter


@pytest.mark.parametrize("dtype", list(TAGS), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", ["N113-K4224", "N7-K96-g32-half-step", "N20-K288-g96"])
def test_dequantize_kernel_is_exact(shape, dtype):
    n, k, group = SHAPES[shape]
    packed, weight = random_packed(n, k, group)
    qweight, scales, zeros = packed
    out = torch.empty(n, k, dtype=dtype, device=DEVICE)
    _C.int4_dequant_n16k64_cuda(
        qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(),
        n, k, group, TAGS[dtype], torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    assert torch.equal(out, weight.to(dtype))  # fp16/bf16: the exact value rounded once


def test_cuda_graph_capture_and_replay_with_split_k():
    n, k = 4096, 4096
    packed, weight = random_packed(n, k)
    static_x = torch.randn(1, k, device=DEVICE).half()
    splits = 3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            gemv(static_x, packed, n, k, 128, splits=splits)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = gemv(static_x, packed, n, k, 128, splits=splits)
    for _ in range(3):
        static_x.copy_(torch.randn(1, k, device=DEVICE).half())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, gemv(static_x, packed, n, k, 128, splits=splits))
        check(static_out, static_x, weight)


def test_bad_arguments_are_refused():
    n, k = 32, 256
    packed, _ = random_packed(n, k)
    x = torch.randn(9, k, device=DEVICE).half()
    with pytest.raises(ValueError, match="M must be in 1..8"):
        gemv(x, packed, n, k, 128)
    unaligned = torch.randn(2 * k + 1, device=DEVICE).half()[1:].view(2, k)
    with pytest.raises(ValueError, match="16-byte aligned"):
        gemv(unaligned, packed, n, k, 128)
    with pytest.raises(ValueError, match="multiple of group_size"):
        gemv(x[:1], packed, n, k, 96)
