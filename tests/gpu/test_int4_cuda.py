"""int4_linear on CUDA (layout n16k64: the tensor-core GEMV for M ≤ 8 with and without split-K,
dequantize + cuBLAS for more rows) against the fp64 reference, exactness of the dequantization,
the preallocated GEMV workspace under CUDA graphs, Int4Linear; then the previous kernels (layout
nk8i, rgpt_rt/ops/int4_nk8i.py), kept for timing beside them. The kernels alone, through the
bindings: tests/gpu/test_int4_gemv_v2.py.

Tolerances (STYLE.md §4, tests/int4_cases.py): at most 2× the error of torch's own
same-precision matmul of the same weights on the same GPU; fp32 x through the n16k64 GEMV (bf16
parts on the tensor cores): 2^-20 × Σ|x·W| per output. The nk8i part passed on an NVIDIA H200
(2026-11-27); the n16k64 part has not run on a GPU yet."""

import pytest
import torch
from int4_cases import check_int4_output

from rgpt_rt import _C
from rgpt_rt.ops import int4 as int4_ops
from rgpt_rt.ops import int4_linear
from rgpt_rt.ops.int4_format import Int4Weight, dequantize
from rgpt_rt.ops.int4_layout import dequantize_nk8i
from rgpt_rt.ops.int4_nk8i import int4_linear_nk8i, linear_cuda_nk8i
from rgpt_rt.quant import quantize_rtn
from rgpt_rt.runtime.int4_linear import Int4Linear

DEVICE = "cuda"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def random_weight(n, k, group_size=128, max_zero=16, scale=0.02):
    """Random codes, scales and zeros, packed on the GPU."""
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=DEVICE)
    scales = (torch.rand(n, k // group_size, device=DEVICE) * scale + scale / 100).half()
    zeros = torch.randint(0, max_zero + 1, (n, k // group_size), dtype=torch.uint8, device=DEVICE)
    return Int4Weight.pack(codes, scales, zeros, group_size)


def check(out, x, weight, bias=None):
    """out against x @ weight.T + bias (the module docstring's tolerances)."""
    gemv_fp32 = x.dtype == torch.float32 and x.shape[0] <= int4_ops.GEMV_MAX_ROWS
    check_int4_output(out, x, weight, bias, tensor_cores=gemv_fp32)


def test_the_build_has_the_int4_kernels():
    for name in ("int4_gemv_n16k64_cuda", "int4_dequant_n16k64_cuda", "int4_gemv_cuda"):
        assert hasattr(_C, name), name


SHAPES = {  # id: (N, K, group_size)
    "4096x4096": (4096, 4096, 128),
    "up-11008x4096": (11008, 4096, 128),
    "down-4096x11008": (4096, 11008, 128),
    "vocab-32000x4096": (32000, 4096, 128),
    "K4096+128-N113": (113, 4096 + 128, 128),
    "tiny-7x96-g32": (7, 96, 32),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("m", [1, 3, 8, 9, 128])
def test_int4_linear_fp16_shapes_and_rows(shape, m):
    n, k, group = SHAPES[shape]
    w = random_weight(n, k, group)
    x = torch.randn(m, k, device=DEVICE).half()
    check(int4_linear(x, w), x, dequantize(w))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("m", [1, 2, 4, 5, 6, 7, 8, 17])
def test_dtypes_and_bias(dtype, m):
    w = random_weight(301, 1024, 128)
    x = torch.randn(m, 1024, device=DEVICE).to(dtype)
    bias = torch.randn(301, device=DEVICE).to(dtype)
    out = int4_linear(x, w, bias)
    assert out.dtype == dtype and out.shape == (m, 301)
    check(out, x, dequantize(w), bias)


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16])
def test_split_k_through_the_shared_workspace(splits):
    w = random_weight(64, 4096 + 128, 128)
    x = torch.randn(4, 4096 + 128, device=DEVICE).half()
    bias = torch.randn(64, device=DEVICE).half()
    args = (w.qweight, w.scales, w.zeros, bias, 64, 128)
    first = int4_ops.linear_cuda(x, *args, splits=splits)
    check(first, x, dequantize(w), bias)
    assert torch.equal(int4_ops.linear_cuda(x, *args, splits=splits), first)  # deterministic
    space = int4_ops.gemv_workspace(DEVICE, 0)
    assert not space[:16].any()  # the counters are left zero for the next launch


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("rows", [8, 256], ids=["gemv", "dequantize+cublas"])
def test_one_hot_rows_read_the_exact_weight_back(dtype, rows):
    # each output is one product 1·w: the GEMV must return (q − z)·s bit for bit, rounded once
    # to x's dtype (subnormal and large scales, zero = 16 included); so must dequantize + cuBLAS
    k = 256
    w = random_weight(40, k, 64)
    w.scales[0, 0, :4] = torch.tensor(
        [2**-24, 3 * 2**-20, 1000.0, 0.1], dtype=torch.float16, device=DEVICE
    )
    eye = torch.eye(k, device=DEVICE).to(dtype)
    out = torch.cat([int4_linear(eye[i : i + rows], w) for i in range(0, k, rows)])
    assert torch.equal(out.T, dequantize(w).to(dtype))


def test_unaligned_x_and_act_order():
    w = random_weight(96, 512, 128)
    buffer = torch.randn(3 * 512 + 1, device=DEVICE).half()
    x = buffer[1:].view(3, 512)  # starts 2 bytes past an aligned address
    check(int4_linear(x, w), x, dequantize(w))
    perm = torch.randperm(512, device=DEVICE)
    wp = Int4Weight(w.qweight, w.scales, w.zeros, 128, (96, 512), perm)
    check(int4_linear(x, wp), x, dequantize(wp))


def test_a_layer_made_on_the_gpu_is_captured_without_a_warm_up(monkeypatch):
    # Int4Linear reserves the GEMV workspace when made on the device (M = 8, its split-K plan),
    # so a CUDA graph captured before any call allocates nothing and replays with split-K
    weight = random_weight(4096, 4096)  # split-K on an H100 / H200
    static_x = torch.randn(8, 4096, device=DEVICE).half()
    int4_linear(static_x, weight)  # loads the kernel (lazy module loading), then a fresh start:
    monkeypatch.setattr(int4_ops, "_GEMV_WORKSPACES", {})
    layer = Int4Linear(weight)
    space = int4_ops.gemv_workspace(DEVICE, 0)
    splits = int4_ops.gemv_splits(4096, 4096, torch.cuda.current_device())
    assert space.numel() >= _C.int4_gemv_n16k64_workspace_bytes(8, 4096, splits)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    assert int4_ops.gemv_workspace(DEVICE, 0) is space  # not reallocated
    for _ in range(3):
        static_x.copy_(torch.randn(8, 4096, device=DEVICE).half())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, layer(static_x))


def test_cuda_graph_capture_and_replay_after_a_warm_up():
    w = random_weight(4096, 4096)
    static_x = torch.randn(1, 4096, device=DEVICE).half()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up outside the graph (first-call work, allocator)
            int4_linear(static_x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = int4_linear(static_x, w)
    for _ in range(3):
        static_x.copy_(torch.randn(1, 4096, device=DEVICE).half())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, int4_linear(static_x, w))


def test_opcheck_on_cuda():
    w = random_weight(64, 256, 64)
    for m in (2, 12):
        x = torch.randn(m, 256, device=DEVICE).half()
        torch.library.opcheck(
            torch.ops.rgpt_rt.int4_linear.default,
            (x, w.qweight, w.scales, w.zeros, None, 64, 64, 0),
        )


def test_int4_linear_module_moved_to_cuda():
    linear = torch.nn.Linear(512, 256)
    layer = Int4Linear.from_linear(linear)
    x = torch.randn(4, 512)
    gpu = layer.to(DEVICE)(x.to(DEVICE)).cpu()  # its workspace is made at the first call
    check(gpu, x, dequantize(layer.weight_int4).cpu(), layer.bias.cpu())
    assert torch.equal(
        quantize_rtn(linear.weight.to(DEVICE)).qweight.cpu(), layer.qweight_n16k64.cpu()
    )


# --- the previous kernels (layout nk8i), kept for timing beside n16k64 ----------------------------
def random_nk8i(n, k, group_size=128, max_zero=16, scale=0.02):
    """Random nk8i tensors on the GPU (any 32-bit code pattern) and their fp16 weight."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, device=DEVICE)
    scales = (torch.rand(n, k // group_size, device=DEVICE) * scale + scale / 100).half()
    zeros = torch.randint(0, max_zero + 1, (n, k // group_size), dtype=torch.uint8, device=DEVICE)
    return (qweight, scales, zeros), dequantize_nk8i(qweight, scales, zeros, group_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 5, 8, 17])
@pytest.mark.parametrize("shape", ["up-11008x4096", "K4096+128-N113"])
def test_nk8i_matches_the_reference(shape, m, dtype):
    n, k, group = SHAPES[shape]
    packed, weight = random_nk8i(n, k, group)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    check(int4_linear_nk8i(x, *packed, group, bias), x, weight.float(), bias)


@pytest.mark.parametrize("splits", [1, 2, 7, 16])
def test_nk8i_split_k(splits):
    packed, weight = random_nk8i(64, 4096 + 128, 128)
    x = torch.randn(4, 4096 + 128, device=DEVICE).half()
    bias = torch.randn(64, device=DEVICE).half()
    check(linear_cuda_nk8i(x, *packed, bias, 128, splits=splits), x, weight.float(), bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_nk8i_gemv_reads_the_fp16_weight_back_exactly(dtype):
    k = 256
    (qweight, scales, zeros), _ = random_nk8i(40, k, 64)
    scales[0] = torch.tensor([2**-24, 3 * 2**-20, 1000.0, 0.1], dtype=torch.float16, device=DEVICE)
    weight = dequantize_nk8i(qweight, scales, zeros, 64)
    eye = torch.eye(k, device=DEVICE).to(dtype)
    out = torch.cat(
        [int4_linear_nk8i(eye[i : i + 8], qweight, scales, zeros, 64) for i in range(0, k, 8)]
    )
    assert torch.equal(out.T, weight.to(dtype))


def test_the_env_var_runs_the_previous_kernels_in_a_captured_graph(monkeypatch):
    monkeypatch.setenv("RGPT_INT4_KERNEL", "nk8i")
    layer = Int4Linear(random_weight(4096, 4096))
    assert layer.kernel == "nk8i"
    static_x = torch.randn(1, 4096, device=DEVICE).half()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(static_x)  # the nk8i split-K workspace is allocated per call: warm up first
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, layer(static_x))
    check(static_out, static_x, dequantize(layer.weight_int4).half().float())
