"""W4A16 linear: x @ W.T with W an INT4 weight in layout nk8i (rgpt_rt/ops/int4_format.py).

    int4_linear(x[..., K], w: Int4Weight, bias=None, *, num_threads=None) -> [..., N]
    int4_linear_reference(x[..., K], w, bias=None) -> [..., N]     (dequantize, matmul in fp64)

x is fp32, fp16 or bf16; the result has x's dtype. The weight values are exactly dequantize(w)
(fp16((q − z)·s)) on every path; products accumulate in fp32.

Paths (the op `torch.ops.rgpt_rt.int4_linear` takes the packed tensors, this wrapper unpacks):
  CPU   csrc/int4/int4_cpu.cpp on float32 (fp16/bf16 x is widened here, the output rounded
        back), threaded over output rows: num_threads, default torch.get_num_threads().
  CUDA  M ≤ 8 rows: the GEMV kernel (split-K into an fp32 workspace when N is small);
        M > 8: dequantize into a workspace in x's dtype and torch.matmul (cuBLAS). bf16 x then
        multiplies weights rounded to bf16 (what a bf16 matmul of the dequantized weight does).
The op allocates its outputs and workspaces here and launches on the current stream, so it can
be captured in a CUDA graph; register_fake lets torch.compile trace through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rgpt_rt.ops.int4_format import Int4Weight

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # int4.h Int4DType
# CUDA: rows of x handled by the GEMV kernel; more go to dequantize + matmul. (The GEMV's time
# grows with its rows: on an H200, two 8-row GEMVs for 16 rows were slower than dequantize +
# cuBLAS; benchmarks/RESULTS.md.)
GEMV_MAX_ROWS = 8
GEMV_ROWS_PER_BLOCK = 8  # int4_cuda.cu: kWarps × kRowsPerWarp
MAX_SPLITS = 16


def check_int4_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
) -> tuple[int, int, int]:
    """Validate the op's arguments; return (M, N, K). Raises ValueError saying what is wrong."""
    if x.dim() != 2:
        raise ValueError(f"int4_linear op takes x as [M, K]; got {list(x.shape)}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(
            f"qweight must be int32 [N, K/8]; got {qweight.dtype} {list(qweight.shape)}"
        )
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.shape[1] * 8 != k:
        raise ValueError(f"x has K = {k} features but the weight has {qweight.shape[1] * 8} inputs")
    if group_size <= 0 or group_size % 32 != 0:
        raise ValueError(f"group_size {group_size} must be a positive multiple of 32")
    if k % group_size != 0:
        raise ValueError(f"K = {k} is not a multiple of group_size {group_size}")
    groups = k // group_size
    if scales.dtype != torch.float16 or tuple(scales.shape) != (n, groups):
        raise ValueError(
            f"scales must be float16 [{n}, {groups}]; got {scales.dtype} {list(scales.shape)}"
        )
    if zeros.dtype != torch.uint8 or tuple(zeros.shape) != (n, groups):
        raise ValueError(
            f"zeros must be uint8 [{n}, {groups}]; got {zeros.dtype} {list(zeros.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}]; got {list(bias.shape)}")
    tensors = [x, qweight, scales, zeros] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(
            f"int4_linear inputs are on several devices {sorted({str(t.device) for t in tensors})}"
        )
    return m, n, k


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous with a 16-byte aligned start (the CUDA kernels load 16 bytes at a time)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def gemv_splits(n: int, k: int, multiprocessors: int) -> int:
    """How many K splits the GEMV uses: enough blocks for ~4 per SM, each split ≥ 32 chunks."""
    blocks = -(-n // GEMV_ROWS_PER_BLOCK)
    target = 4 * multiprocessors
    if blocks >= target:
        return 1
    return max(1, min(-(-target // blocks), (k // 32) // 32, MAX_SPLITS))


# Below this many weight bytes per thread one thread is faster: starting threads costs more
# than the work, and they fight torch's own OpenMP threads for the cores.
MIN_BYTES_PER_THREAD = 1 << 20


def cpu_threads(n: int, k: int, requested: int) -> int:
    """Threads for an [N, K] INT4 weight: `requested` when given (> 0); else torch's count,
    capped so that each thread reads at least MIN_BYTES_PER_THREAD of packed weight."""
    if requested > 0:
        return requested
    return max(1, min(torch.get_num_threads(), (n * k // 2) // MIN_BYTES_PER_THREAD))


# From this many rows of x on (a prefill), the CPU multiplies with torch's GEMM: W is dequantized
# to float32 a tile of rows at a time into a buffer that stays in cache, instead of the GEMV
# kernel dequantizing all of W again for every 4 rows of x.
CPU_GEMM_MIN_ROWS = 32
CPU_GEMM_TILE_BYTES = 1 << 19


def dequantize_cpu(qweight, scales, zeros, group_size, rows=None, out=None, use_simd=True):
    """Rows [r0, r1) of W as float32 [r1 - r0, K] (all of W by default), the exact fp16 values
    the kernels use, from the packed CPU tensors; into `out` when given."""
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
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


def _cpu_gemm(x32, qweight, scales, zeros, bias, group_size, use_simd):
    # out^T [N, M] = W x^T, one tile of W's rows at a time, each tile's rows a contiguous slice
    n, k = qweight.shape[0], x32.shape[1]
    rows = min(n, max(16, CPU_GEMM_TILE_BYTES // (4 * k)))
    bias32 = None if bias is None else bias.to(torch.float32)
    if rows == n:  # one tile: the GEMM writes out [M, N] directly
        weight = dequantize_cpu(qweight, scales, zeros, group_size, use_simd=use_simd)
        return torch.nn.functional.linear(x32, weight, bias32)
    tile = torch.empty(rows, k, dtype=torch.float32)
    out_t = torch.empty(n, x32.shape[0], dtype=torch.float32)
    x_t = x32.t()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        weight = dequantize_cpu(
            qweight, scales, zeros, group_size, (r0, r1), tile[: r1 - r0], use_simd
        )
        torch.mm(weight, x_t, out=out_t[r0:r1])
    out = out_t.t()
    return (out + bias32 if bias32 is not None else out).contiguous()


def linear_cpu(x, qweight, scales, zeros, bias, group_size, num_threads, use_simd=True):
    """int4_linear on CPU tensors already checked (x [M, K]): the GEMV kernel, or from
    CPU_GEMM_MIN_ROWS rows on, tiled dequantization + torch's GEMM."""
    from rgpt_rt import _C

    m, n, k = x.shape[0], qweight.shape[0], x.shape[1]
    x32 = x.to(torch.float32).contiguous()
    if m >= CPU_GEMM_MIN_ROWS:
        return _cpu_gemm(x32, qweight, scales, zeros, bias, group_size, use_simd).to(x.dtype)
    num_threads = cpu_threads(n, k, num_threads)
    out = torch.empty(m, n, dtype=torch.float32)
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    _C.int4_linear_cpu(
        x32.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        0 if bias32 is None else bias32.data_ptr(), out.data_ptr(),
        m, n, k, group_size, num_threads, use_simd,
    )  # fmt: skip
    return out.to(x.dtype)


def _cuda(x, qweight, scales, zeros, bias, group_size, splits=None):
    from rgpt_rt import _C

    if not hasattr(_C, "int4_gemv_cuda"):
        raise RuntimeError(
            "rgpt_rt._C was built without CUDA; rebuild with nvcc on PATH to run int4_linear on a GPU"
        )
    m, n, k = x.shape[0], qweight.shape[0], x.shape[1]
    tag = DTYPE_TAGS[x.dtype]
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        if bias is not None:
            bias = bias.to(x.dtype).contiguous()
        if m > GEMV_MAX_ROWS:  # prefill: dequantize into a workspace, then cuBLAS
            weight = torch.empty(n, k, dtype=x.dtype, device=x.device)
            _C.int4_dequant_cuda(
                qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), weight.data_ptr(),
                n, k, group_size, tag, stream,
            )  # fmt: skip
            return torch.nn.functional.linear(x, weight, bias)
        x = aligned(x)
        if splits is None:
            splits = gemv_splits(
                n, k, torch.cuda.get_device_properties(x.device).multi_processor_count
            )
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


def int4_linear_eager(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    num_threads: int,
) -> torch.Tensor:
    """x [M, K] @ W.T + bias -> [M, N] (x's dtype); W = (qweight int32 [N, K/8] nk8i,
    scales fp16 [N, K/G], zeros uint8 [N, K/G]). num_threads: CPU threads, 0 = torch's.
    The body of the rgpt_rt::int4_linear op, callable without the dispatcher (eager calls
    skip its ~40 µs of custom-op overhead, which on small layers is more than the kernel)."""
    m, n, _ = check_int4_args(x, qweight, scales, zeros, bias, group_size)
    if m == 0:
        return x.new_empty(0, n)
    qweight, scales, zeros = aligned(qweight), scales.contiguous(), zeros.contiguous()
    if x.is_cuda:
        return _cuda(x, qweight, scales, zeros, bias, group_size)
    if x.device.type != "cpu":
        raise ValueError(f"int4_linear runs on CPU and CUDA; got a tensor on {x.device}")
    return linear_cpu(x, qweight, scales, zeros, bias, group_size, num_threads)


# The registered op (for torch.compile and CUDA graphs) runs the same body.
int4_linear_op = torch.library.custom_op("rgpt_rt::int4_linear", mutates_args=())(int4_linear_eager)


@int4_linear_op.register_fake
def _(x, qweight, scales, zeros, bias, group_size, num_threads):
    m, n, _ = check_int4_args(x, qweight, scales, zeros, bias, group_size)
    return x.new_empty(m, n)


def int4_linear_packed(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """int4_linear on the packed tensors (what Int4Linear.forward calls): x [..., K] -> [..., N]."""
    k = qweight.shape[-1] * 8
    if x.shape[-1] != k:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dim; this INT4 weight takes K = {k}"
        )
    if perm is not None:
        x = x.index_select(-1, perm)
    lead = x.shape[:-1]
    # Traced (torch.compile) calls, and calls autograd would record, go through the registered
    # op (which has no backward and says so); plain inference calls go straight to its body.
    traced = torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled())
    linear = torch.ops.rgpt_rt.int4_linear if traced else int4_linear_eager
    out = linear(x.reshape(-1, k), qweight, scales, zeros, bias, group_size, num_threads or 0)
    return out.reshape(*lead, qweight.shape[0])


def int4_linear(
    x: torch.Tensor,
    w: Int4Weight,
    bias: torch.Tensor | None = None,
    *,
    num_threads: int | None = None,
) -> torch.Tensor:
    """x [..., K] (fp32/fp16/bf16) @ dequantize(w).T + bias -> [..., N] in x's dtype."""
    return int4_linear_packed(
        x, w.qweight, w.scales, w.zeros, w.group_size, bias, w.perm, num_threads
    )


def int4_linear_reference(
    x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The plain torch reference: dequantize(w) (exact fp16 values), matmul in float64, x's dtype out."""
    from rgpt_rt.ops.int4_format import dequantize

    out = x.to(torch.float64) @ dequantize(w).to(x.device, torch.float64).T
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.to(x.dtype)
