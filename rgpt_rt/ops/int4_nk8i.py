"""The previous INT4 kernels, on layout nk8i (format version 1: W = fp16((q − z)·s)), kept callable
until the n16k64 kernels are measured on a GPU (issue 23). benchmarks/int4.py times them beside
int4_linear, and RGPT_INT4_KERNEL=nk8i makes Int4Linear run them on its weight repacked at load,
so a decode can be timed old beside new in one process. No file is written in this layout.

    qweight, scales, zeros = nk8i_tensors(w: Int4Weight)      # the same codes, scales, zeros
    int4_linear_nk8i(x[..., K], qweight, scales, zeros, group_size, bias=None, perm=None,
                     num_threads=None) -> [..., N]
    dequantize_nk8i(qweight, scales, zeros, group_size) -> fp16 [N, K]   (int4_layout.py: the
                     value every path here multiplies by)

Paths, as before n16k64 (csrc/int4/README.md, "Kernels on nk8i"): CPU int4_linear_cpu (float32,
threads over output rows; from CPU_GEMM_MIN_ROWS rows tiled dequantization + torch's GEMM); CUDA
int4_gemv_cuda for M ≤ 8 (split-K through a second kernel into a workspace allocated per call),
int4_dequant_cuda + cuBLAS beyond. Eager only: not a torch.library op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rgpt_rt.ops.int4 import (
    ACT_DTYPES,
    DTYPE_TAGS,
    GEMV_MAX_ROWS,
    aligned,
    check_bias_and_devices,
    cpu_linear,
    dequantize_linear_cuda,
)
from rgpt_rt.ops.int4_layout import check_shape, pack_nk8i

if TYPE_CHECKING:
    from rgpt_rt.ops.int4_format import Int4Weight

GEMV_ROWS_PER_BLOCK = 8  # int4_cuda.cu: kWarps × kRowsPerWarp
MAX_SPLITS = 16


def nk8i_tensors(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight in layout nk8i: (qweight int32 [N, K/8], scales fp16 [N, K/G], zeros uint8
    [N, K/G]), codes in w's packed column order (w.perm still applies to x)."""
    codes, scales, zeros = w.unpack()
    return aligned(pack_nk8i(codes)), scales, zeros


def check_nk8i_args(x, qweight, scales, zeros, bias, group_size) -> tuple[int, int, int]:
    """Validate the arguments of an nk8i linear; return (M, N, K)."""
    if x.dim() != 2 or x.dtype not in ACT_DTYPES:
        raise ValueError(
            f"x must be [M, K] float32, float16 or bfloat16; got {x.dtype} {list(x.shape)}"
        )
    m, k = x.shape
    n = qweight.shape[0]
    check_shape(n, k, group_size)
    groups = k // group_size
    for name, tensor, dtype, shape in (
        ("qweight", qweight, torch.int32, (n, k // 8)),
        ("scales", scales, torch.float16, (n, groups)),
        ("zeros", zeros, torch.uint8, (n, groups)),
    ):
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"nk8i {name} must be {dtype} {list(shape)} for x with K = {k}; "
                f"got {tensor.dtype} {list(tensor.shape)}"
            )
    check_bias_and_devices(x, [qweight, scales, zeros], bias, n)
    return m, n, k


def gemv_splits_nk8i(n: int, k: int, multiprocessors: int) -> int:
    """How many K splits the nk8i GEMV uses: enough blocks for ~4 per SM, each split ≥ 32 chunks."""
    blocks = -(-n // GEMV_ROWS_PER_BLOCK)
    target = 4 * multiprocessors
    if blocks >= target:
        return 1
    return max(1, min(-(-target // blocks), (k // 32) // 32, MAX_SPLITS))


def dequantize_cpu_nk8i(qweight, scales, zeros, group_size, rows=None, out=None, use_simd=True):
    """Rows [r0, r1) of W as float32 [r1 - r0, K], the fp16 values, from contiguous CPU tensors."""
    from rgpt_rt import _C

    r0, r1 = rows or (0, qweight.shape[0])
    k, groups = qweight.shape[1] * 8, scales.shape[1]
    weight = torch.empty(r1 - r0, k, dtype=torch.float32) if out is None else out
    _C.int4_dequant_cpu(
        qweight.data_ptr() + r0 * qweight.stride(0) * 4,
        scales.data_ptr() + r0 * groups * 2,
        zeros.data_ptr() + r0 * groups,
        weight.data_ptr(), r1 - r0, k, group_size, 1, use_simd,
    )  # fmt: skip
    return weight


def linear_cpu_nk8i(x, qweight, scales, zeros, bias, group_size, num_threads, use_simd=True):
    """The nk8i CPU path on checked tensors (x [M, K], the weight contiguous)."""
    from rgpt_rt import _C

    def rows(r0, r1, out):
        return dequantize_cpu_nk8i(qweight, scales, zeros, group_size, (r0, r1), out, use_simd)

    n, weight = qweight.shape[0], (qweight, scales, zeros)
    return cpu_linear(
        _C.int4_linear_cpu, rows, x, weight, bias, n, group_size, num_threads, use_simd
    )


def linear_cuda_nk8i(x, qweight, scales, zeros, bias, group_size, splits=None):
    """The nk8i CUDA path on checked tensors: GEMV for M ≤ 8, else dequantize + cuBLAS."""
    from rgpt_rt import _C

    if not hasattr(_C, "int4_gemv_cuda"):
        raise RuntimeError("rgpt_rt._C was built without CUDA; rebuild with nvcc on PATH")
    m, n, k = x.shape[0], qweight.shape[0], x.shape[1]
    tag = DTYPE_TAGS[x.dtype]
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        if bias is not None:
            bias = bias.to(x.dtype).contiguous()
        if m > GEMV_MAX_ROWS:
            weight, kernel = (qweight, scales, zeros), _C.int4_dequant_cuda
            return dequantize_linear_cuda(kernel, x, weight, bias, n, group_size, stream)
        x = aligned(x)
        if splits is None:
            sms = torch.cuda.get_device_properties(x.device).multi_processor_count
            splits = gemv_splits_nk8i(n, k, sms)
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        partial = (
            torch.empty(splits * m * n, dtype=torch.float32, device=x.device)
            if splits > 1
            else None
        )
        _C.int4_gemv_cuda(
            x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
            0 if bias is None else bias.data_ptr(), out.data_ptr(),
            0 if partial is None else partial.data_ptr(),
            m, n, k, group_size, splits, tag, stream,
        )  # fmt: skip
        return out


def int4_linear_nk8i(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """x [..., K] @ W.T + bias -> [..., N] (x's dtype), W = dequantize_nk8i(...) in layout nk8i."""
    k = qweight.shape[1] * 8
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim; this weight takes K = {k}")
    if perm is not None:
        x = x.index_select(-1, perm)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m, n, _ = check_nk8i_args(x2, qweight, scales, zeros, bias, group_size)
    if m == 0:
        return x.new_empty(*lead, n)
    qweight, scales, zeros = aligned(qweight), scales.contiguous(), zeros.contiguous()
    if x2.is_cuda:
        out = linear_cuda_nk8i(x2, qweight, scales, zeros, bias, group_size)
    else:
        out = linear_cpu_nk8i(x2, qweight, scales, zeros, bias, group_size, num_threads or 0)
    return out.reshape(*lead, n)
