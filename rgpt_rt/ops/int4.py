"""W4A16 linear: x @ W.T with W an INT4 weight in layout n16k64 (rgpt_rt/ops/int4_format.py).

    int4_linear(x[..., K], w: Int4Weight, bias=None, *, num_threads=None) -> [..., N]
    int4_linear_reference(x[..., K], w, bias=None) -> [..., N]     (dequantize, matmul in fp64)

x is fp32, fp16 or bf16; the result has x's dtype. Every path multiplies by W = (q − z)·s, the
exact value dequantize(w) returns; the kernels sum each group's products (q − z)·x in fp32 and
scale the sum by s, the dequantize + GEMM paths round W once to x's dtype (fp16 / bf16) first.

Paths by rows M of x (the op `torch.ops.rgpt_rt.int4_linear` takes the packed tensors, this
wrapper unpacks):
  CPU   (float32 inside: fp16/bf16 x is widened here, the output rounded back; threads over tiles
        of 16 output rows: num_threads, default torch.get_num_threads() for weights large enough)
        M ≤ CPU_GEMV_MAX_ROWS         the GEMV, int4_linear_n16k64_cpu (W dequantized in registers
                                      for every 4 rows of x)
        ... < CPU_GEMM_MIN_ROWS       the GEMM, int4_gemm_n16k64_cpu (W dequantized once per 64
                                      rows of x into panels that stay in L1; a micro-kernel)
        M ≥ CPU_GEMM_MIN_ROWS         W dequantized exactly a tile of rows at a time into torch's GEMM
  CUDA  M ≤ GEMV_MAX_ROWS             the tensor-core GEMV (split-K in the same kernel when N is small)
        ... ≤ GEMM_MAX_ROWS           the tensor-core GEMM, int4_gemm_n16k64_cuda: the packed tiles
                                      read straight into MMA fragments (fp16 / bf16 x; split-K when
                                      N is small); fp32 x takes the next path
        more rows                     W dequantized into x's dtype, then cuBLAS (F.linear)
GEMM_MAX_ROWS and the CPU bounds are module constants a benchmark may set (benchmarks/int4.py
sweeps them); RGPT_INT4_KERNEL=n16k64-dequant turns both GEMMs off (every M > 8 dequantizes, as
before issue 24) to time old beside new in one process.

The op allocates its outputs here and launches on the current stream, so it can be captured in a
CUDA graph; register_fake lets torch.compile trace through it. The split-K workspace (GEMV and
GEMM) must exist before a capture and is never freed (graphs keep its address): Int4Linear
reserves it when it is made on a CUDA device, any call outside a capture grows it, and a call
inside a capture that would need more raises.

RGPT_INT4_KERNEL=nk8i makes Int4Linear run the previous kernels (rgpt_rt/ops/int4_nk8i.py) on its
weight repacked at load, to time them beside these (issue 23); int4_kernel() reads it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rgpt_rt.ops import int4_layout as layout

if TYPE_CHECKING:
    from rgpt_rt.ops.int4_format import Int4Weight

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # int4.h Int4DType
GEMV_MAX_ROWS = 8  # CUDA: rows of x the GEMV takes (int4_n16k64.h kN16K64GemvMaxRows)
# CUDA: up to this many rows, the tensor-core GEMM (int4_n16k64_gemm_cuda.cu); more rows
# dequantize + cuBLAS. The kernel takes any M (64 rows per block); benchmarks/int4.py times both
# at M = 16..640 to place this bound.
GEMM_MAX_ROWS = 64
KERNEL_ENV = "RGPT_INT4_KERNEL"
KERNELS = ("n16k64", "n16k64-dequant", "nk8i")


def _kernel_setting() -> str:
    kernel = os.environ.get(KERNEL_ENV, KERNELS[0]) or KERNELS[0]
    if kernel not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={kernel!r} is unknown; use one of {KERNELS}")
    return kernel


def int4_kernel() -> str:
    """Which layout's kernels Int4Linear runs: "n16k64" (default; also under
    RGPT_INT4_KERNEL=n16k64-dequant) or, with RGPT_INT4_KERNEL=nk8i, the previous ones on the
    weight repacked to layout nk8i (W = fp16((q − z)·s)), for timing."""
    return "nk8i" if _kernel_setting() == "nk8i" else "n16k64"


def gemms_enabled() -> bool:
    """False under RGPT_INT4_KERNEL=n16k64-dequant: every M > 8 then dequantizes W and runs
    torch's GEMM (CPU from 32 rows, below it the GEMV), the paths before issue 24, for timing."""
    return _kernel_setting() != "n16k64-dequant"


def check_int4_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    group_size: int,
) -> tuple[int, int, int]:
    """Validate the op's arguments (an [n, K] weight in layout n16k64); return (M, N, K).
    Raises ValueError saying what is wrong."""
    if x.dim() != 2:
        raise ValueError(f"int4_linear op takes x as [M, K]; got {list(x.shape)}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; use float32, float16 or bfloat16")
    m, k = x.shape
    shapes = layout.packed_shapes(n, k, group_size)
    for name, tensor, dtype in (
        ("qweight", qweight, torch.int32),
        ("scales", scales, torch.float16),
        ("zeros", zeros, torch.uint8),
    ):
        if tensor.dtype != dtype or tuple(tensor.shape) != shapes[name]:
            raise ValueError(
                f"{name} must be {dtype} {list(shapes[name])} for an [{n}, {k}] weight in layout "
                f"{layout.LAYOUT} (x has K = {k}); got {tensor.dtype} {list(tensor.shape)}"
            )
    check_bias_and_devices(x, [qweight, scales, zeros], bias, n)
    return m, n, k


def check_bias_and_devices(
    x: torch.Tensor, weight: list[torch.Tensor], bias: torch.Tensor | None, n: int
) -> None:
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}]; got {list(bias.shape)}")
    tensors = [x, *weight] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(
            f"int4_linear inputs are on several devices {sorted({str(t.device) for t in tensors})}"
        )


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous with a 16-byte aligned start (the kernels load 16 bytes at a time)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


# --- CPU -------------------------------------------------------------------------------------
# Below this many weight bytes per thread one thread is faster: starting threads costs more
# than the work, and they fight torch's own OpenMP threads for the cores.
MIN_BYTES_PER_THREAD = 1 << 20


def cpu_threads(n: int, k: int, requested: int) -> int:
    """Threads for an [N, K] INT4 weight: `requested` when given (> 0); else torch's count,
    capped so that each thread reads at least MIN_BYTES_PER_THREAD of packed weight."""
    if requested > 0:
        return requested
    return max(1, min(torch.get_num_threads(), (n * k // 2) // MIN_BYTES_PER_THREAD))


# CPU paths by rows of x: the GEMV up to CPU_GEMV_MAX_ROWS, then the C++ GEMM (W dequantized once
# per 64 rows into L1 panels; 65-90 GFLOP/s on one Zen 4 core: ahead of torch's fp32 GEMM on W
# dequantized to memory from 16 rows to 640, the most measured, at the 7B and tiny shapes, level
# with it at 8 and 10), from CPU_GEMM_MIN_ROWS on torch's GEMM: W dequantized to float32 a tile of
# rows at a time into a buffer that stays in cache. (Before issue 24, and under
# RGPT_INT4_KERNEL=n16k64-dequant: the GEMV below CPU_DEQUANT_GEMM_MIN_ROWS, torch's GEMM from
# there.)
CPU_GEMV_MAX_ROWS = 9
CPU_GEMM_MIN_ROWS = 1024
CPU_DEQUANT_GEMM_MIN_ROWS = 32
CPU_GEMM_TILE_BYTES = 1 << 19


def cpu_gemm(
    x32: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
    dequantize_rows: Callable[[int, int, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """float32 [M, N] = x32 [M, K] @ W.T + bias, W's rows [r0, r1) made by
    dequantize_rows(r0, r1, out) as float32 [r1 - r0, K] (into `out` when given), one tile of
    rows at a time (a multiple of 16 rows: whole tiles of layout n16k64)."""
    k = x32.shape[1]
    tile_rows = CPU_GEMM_TILE_BYTES // (4 * k) // layout.TILE_ROWS * layout.TILE_ROWS
    rows = min(n, max(layout.TILE_ROWS, tile_rows))
    bias32 = None if bias is None else bias.to(torch.float32)
    if rows == n:  # one tile: the GEMM writes out [M, N] directly
        return torch.nn.functional.linear(x32, dequantize_rows(0, n, None), bias32)
    # out^T [N, M] = W x^T, each tile's rows a contiguous slice
    tile = torch.empty(rows, k, dtype=torch.float32)
    out_t = torch.empty(n, x32.shape[0], dtype=torch.float32)
    x_t = x32.t()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        torch.mm(dequantize_rows(r0, r1, tile[: r1 - r0]), x_t, out=out_t[r0:r1])
    out = out_t.t()
    return (out + bias32 if bias32 is not None else out).contiguous()


def dequantize_cpu(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    n: int,
    k: int,
    group_size: int,
    rows: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    use_simd: bool = True,
) -> torch.Tensor:
    """Rows [r0, r1) of W as float32 [r1 - r0, K] (all of W by default), (q − z)·s exactly, from
    the packed (contiguous) CPU tensors; into `out` when given."""
    from rgpt_rt import _C

    r0, r1 = rows or (0, n)
    weight = torch.empty(r1 - r0, k, dtype=torch.float32) if out is None else out
    _C.int4_dequant_n16k64_cpu(
        qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), weight.data_ptr(),
        n, k, group_size, r0, r1, 1, use_simd,
    )  # fmt: skip
    return weight


def linear_cpu(
    x, qweight, scales, zeros, bias, n, group_size, num_threads, use_simd=True, path=None
):
    """int4_linear on CPU tensors already checked (x [M, K], the weight contiguous). `path`
    ("gemv", "gemm", "dequant": torch's GEMM on W dequantized a tile at a time) overrides the
    choice by rows (benchmarks/int4.py)."""
    from rgpt_rt import _C

    k = x.shape[1]

    def rows(r0, r1, out):
        return dequantize_cpu(qweight, scales, zeros, n, k, group_size, (r0, r1), out, use_simd)

    if path == "dequant":
        bias32 = None if bias is None else bias.to(torch.float32)
        return cpu_gemm(x.to(torch.float32).contiguous(), n, bias32, rows).to(x.dtype)
    weight = (qweight, scales, zeros)
    if path is None and x.shape[0] <= CPU_GEMV_MAX_ROWS:  # a decode step: nothing to choose
        gemv = _C.int4_linear_n16k64_cpu
        return cpu_linear(gemv, rows, x, weight, bias, n, group_size, num_threads, use_simd)
    gemv, gemm = _C.int4_linear_n16k64_cpu, _C.int4_gemm_n16k64_cpu
    if path is not None:  # one kernel for every M
        gemv = gemm = gemv if path == "gemv" else gemm
    return cpu_linear(
        gemv, rows, x, weight, bias, n, group_size, num_threads, use_simd,
        gemm=gemm if gemms_enabled() or path is not None else None,
        blas_from=None if path is None else 1 << 62,
    )  # fmt: skip


def cpu_linear(
    kernel,
    dequantize_rows,
    x,
    weight,
    bias,
    n,
    group_size,
    num_threads,
    use_simd,
    gemm=None,
    blas_from=None,
):
    """The CPU path of either layout: x [M, K] -> [M, N] in x's dtype through `kernel` (a _C
    GEMV taking x, qweight, scales, zeros, bias, out, m, n, k, group_size, threads, use_simd;
    float32) up to CPU_GEMV_MAX_ROWS rows, through `gemm` (a _C GEMM with the same arguments, when
    the layout has one) below CPU_GEMM_MIN_ROWS, and from there (or `blas_from`) cpu_gemm over
    dequantize_rows. Without `gemm`, the GEMV runs below CPU_DEQUANT_GEMM_MIN_ROWS (layout nk8i,
    and RGPT_INT4_KERNEL=n16k64-dequant)."""
    m, k = x.shape
    x32 = x.to(torch.float32).contiguous()
    if blas_from is None:
        blas_from = CPU_GEMM_MIN_ROWS if gemm is not None else CPU_DEQUANT_GEMM_MIN_ROWS
    if m >= blas_from:
        return cpu_gemm(x32, n, bias, dequantize_rows).to(x.dtype)
    if gemm is not None and m > CPU_GEMV_MAX_ROWS:
        kernel = gemm
    out = torch.empty(m, n, dtype=torch.float32)
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    kernel(
        x32.data_ptr(), *(t.data_ptr() for t in weight),
        0 if bias32 is None else bias32.data_ptr(), out.data_ptr(),
        m, n, k, group_size, cpu_threads(n, k, num_threads), use_simd,
    )  # fmt: skip
    return out.to(x.dtype)


# --- CUDA ------------------------------------------------------------------------------------
# The split-K workspace of the GEMV and the GEMM: int32 counters in the first COUNTER_BYTES, fp32
# partial sums after them. Zeroed once; every launch leaves its counters zero again, so it is
# reused without clearing. The partial sums of every weight start at the same offset, after all
# counters: the GEMV places its counters just below them (its workspace pointer is moved down by
# its counter bytes), the GEMM at the start, so no launch writes partial sums over a counter that
# another weight's launch relies on. One per device, so launches that use it must not overlap: int4
# linears on one device run on one stream at a time (as the Session does). Outgrown workspaces are
# kept: CUDA graphs captured with them still write there.
COUNTER_BYTES = 1 << 16  # counters for 16384 GEMV tiles or GEMM block columns
_GEMV_WORKSPACES: dict[int, torch.Tensor] = {}
_OUTGROWN_WORKSPACES: list[torch.Tensor] = []


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def gemv_splits(n: int, k: int, device_index: int) -> int:
    """The GEMV's split-K factor for an [n, k] weight on CUDA device `device_index`."""
    from rgpt_rt import _C

    splits = _C.int4_gemv_n16k64_splits(n, k, _multiprocessors(device_index))
    return splits if _gemv_counter_bytes(n) <= COUNTER_BYTES else 1


@functools.cache
def gemm_splits(m: int, n: int, k: int, group_size: int, device_index: int) -> int:
    """The GEMM's split-K factor for M rows of x and an [n, k] weight on CUDA device
    `device_index`."""
    from rgpt_rt import _C

    splits = _C.int4_gemm_n16k64_splits(m, n, k, group_size, _multiprocessors(device_index))
    return splits if _C.int4_gemm_n16k64_counter_bytes(n) <= COUNTER_BYTES else 1


def _gemv_counter_bytes(n: int) -> int:
    return (-(-n // layout.TILE_ROWS) * 4 + 15) // 16 * 16


def _device_index(device: torch.device | str | int) -> int:
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def gemv_workspace(device: torch.device | str | int, nbytes: int) -> torch.Tensor:
    """The split-K workspace of a CUDA device (uint8, zeroed when made), with at least nbytes of
    partial sums after its COUNTER_BYTES of counters. Outside a CUDA-graph capture a bigger one
    is made when needed; inside one that raises RuntimeError."""
    index = _device_index(device)
    space = _GEMV_WORKSPACES.get(index)
    if space is not None and space.numel() >= COUNTER_BYTES + nbytes:
        return space
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the INT4 GEMV/GEMM needs {nbytes} bytes of split-K workspace on cuda:{index} during "
            "a CUDA-graph capture, where it may not be allocated: make the Int4Linear layers on "
            "the device (they reserve it), call rgpt_rt.ops.int4.reserve_gemv_workspace(n, k, "
            "device) for each weight, or run the step once before capturing it"
        )
    if space is not None:
        _OUTGROWN_WORKSPACES.append(space)
    space = torch.zeros(
        COUNTER_BYTES + nbytes, dtype=torch.uint8, device=torch.device("cuda", index)
    )
    torch.cuda.current_stream(index).synchronize()  # zeroed before any stream uses it
    _GEMV_WORKSPACES[index] = space
    return space


def reserve_gemv_workspace(
    n: int, k: int, device: torch.device | str | int, group_size: int | None = None
) -> None:
    """Make the device's split-K workspace large enough for an [n, k] weight and every row count
    the GEMV (up to GEMV_MAX_ROWS) and the GEMM (up to GEMM_MAX_ROWS) take (what Int4Linear does
    when made on a CUDA device). The GEMM's plan depends on the group size a little (whole groups
    per split): without one, the largest plan of G = 64 and 128 is reserved."""
    from rgpt_rt import _C

    index = _device_index(device)
    need = _C.int4_gemv_n16k64_workspace_bytes(GEMV_MAX_ROWS, n, gemv_splits(n, k, index))
    for group in (group_size,) if group_size else (64, 128):
        for m in range(GEMV_MAX_ROWS + 1, GEMM_MAX_ROWS + 1):  # the GEMM's plan depends on M
            splits = gemm_splits(m, n, k, group, index)
            need = max(need, _C.int4_gemm_n16k64_partial_bytes(m, n, splits))
    gemv_workspace(index, need)


def dequantize_linear_cuda(kernel, x, weight, bias, n, group_size, stream):
    """The prefill path of either layout: W [n, K] dequantized by `kernel` (a _C dequantization
    taking qweight, scales, zeros, out, n, k, group_size, dtype tag, stream) into a buffer in
    x's dtype, then torch.nn.functional.linear (cuBLAS)."""
    buffer = torch.empty(n, x.shape[1], dtype=x.dtype, device=x.device)
    kernel(
        *(t.data_ptr() for t in weight), buffer.data_ptr(),
        n, x.shape[1], group_size, DTYPE_TAGS[x.dtype], stream,
    )  # fmt: skip
    return torch.nn.functional.linear(x, buffer, bias)


def linear_cuda(x, qweight, scales, zeros, bias, n, group_size, splits=None, path=None):
    """int4_linear on CUDA tensors already checked (x [M, K], the weight contiguous and qweight
    16-byte aligned): the GEMV for M ≤ GEMV_MAX_ROWS, the GEMM for M ≤ GEMM_MAX_ROWS (fp16/bf16
    x), else dequantize + cuBLAS. `path` ("gemv", "gemm", "dequant") and `splits` override the
    choice and the split-K plan (tests, benchmarks/int4.py)."""
    from rgpt_rt import _C

    if not hasattr(_C, "int4_gemv_n16k64_cuda"):
        raise RuntimeError(
            "rgpt_rt._C was built without CUDA; rebuild with nvcc on PATH to run int4_linear on a GPU"
        )
    m, k = x.shape
    if path is None:
        path = prefill_path(m, x.dtype)
    tag = DTYPE_TAGS[x.dtype]
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        if bias is not None:
            bias = bias.to(x.dtype).contiguous()
        if path == "dequant":
            weight = (qweight, scales, zeros)
            kernel = _C.int4_dequant_n16k64_cuda
            return dequantize_linear_cuda(kernel, x, weight, bias, n, group_size, stream)
        x = aligned(x)
        index = _device_index(x.device)
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        bias_ptr = 0 if bias is None else bias.data_ptr()
        if path == "gemm":
            if splits is None:
                splits = gemm_splits(m, n, k, group_size, index)
            if splits > 1 and _C.int4_gemm_n16k64_counter_bytes(n) > COUNTER_BYTES:
                raise ValueError(f"split-K of an N = {n} weight needs more counters than kept")
            partial = _C.int4_gemm_n16k64_partial_bytes(m, n, splits)
            space = gemv_workspace(index, partial).data_ptr()
            _C.int4_gemm_n16k64_cuda(
                x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), bias_ptr,
                out.data_ptr(), space, space + COUNTER_BYTES, m, n, k, group_size, splits, tag,
                stream,
            )  # fmt: skip
            return out
        if splits is None:
            splits = gemv_splits(n, k, index)
        if splits > 1 and _gemv_counter_bytes(n) > COUNTER_BYTES:
            raise ValueError(f"split-K of an N = {n} weight needs more counters than kept")
        need = _C.int4_gemv_n16k64_workspace_bytes(m, n, splits)
        space = gemv_workspace(index, need).data_ptr()
        # the GEMV's counters end where every weight's partial sums begin
        gemv_space = space + COUNTER_BYTES - _gemv_counter_bytes(n)
        _C.int4_gemv_n16k64_cuda(
            x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), bias_ptr,
            out.data_ptr(), gemv_space, m, n, k, group_size, splits, tag, stream,
        )  # fmt: skip
        return out


def prefill_path(m: int, dtype: torch.dtype) -> str:
    """The CUDA path int4_linear takes for M rows of x: "gemv", "gemm" or "dequant"."""
    if m <= GEMV_MAX_ROWS:
        return "gemv"
    if m <= GEMM_MAX_ROWS and dtype != torch.float32 and gemms_enabled():
        return "gemm"
    return "dequant"


# --- the op ----------------------------------------------------------------------------------
def int4_linear_eager(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    group_size: int,
    num_threads: int,
) -> torch.Tensor:
    """x [M, K] @ W.T + bias -> [M, N] (x's dtype); W [n, K] in layout n16k64 (qweight int32
    [T, 128 S], scales fp16 [T, K/G, 16], zeros uint8 [T, K/G, 16]). num_threads: CPU threads,
    0 = torch's. The body of the rgpt_rt::int4_linear op, callable without the dispatcher (eager
    calls skip its ~40 µs of custom-op overhead, which on small layers is more than the kernel)."""
    m, n, _ = check_int4_args(x, qweight, scales, zeros, bias, n, group_size)
    if m == 0:
        return x.new_empty(0, n)
    qweight, scales, zeros = aligned(qweight), scales.contiguous(), zeros.contiguous()
    if x.is_cuda:
        return linear_cuda(x, qweight, scales, zeros, bias, n, group_size)
    if x.device.type != "cpu":
        raise ValueError(f"int4_linear runs on CPU and CUDA; got a tensor on {x.device}")
    return linear_cpu(x, qweight, scales, zeros, bias, n, group_size, num_threads)


# The registered op (for torch.compile and CUDA graphs) runs the same body.
int4_linear_op = torch.library.custom_op("rgpt_rt::int4_linear", mutates_args=())(int4_linear_eager)


@int4_linear_op.register_fake
def _(x, qweight, scales, zeros, bias, n, group_size, num_threads):
    m, n, _ = check_int4_args(x, qweight, scales, zeros, bias, n, group_size)
    return x.new_empty(m, n)


def int4_linear_packed(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    shape: tuple[int, int],
    group_size: int,
    bias: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """int4_linear on the packed tensors of an [N, K] = `shape` weight (what Int4Linear.forward
    calls): x [..., K] -> [..., N]."""
    n, k = shape
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
    out = linear(x.reshape(-1, k), qweight, scales, zeros, bias, n, group_size, num_threads or 0)
    return out.reshape(*lead, n)


def int4_linear(
    x: torch.Tensor,
    w: Int4Weight,
    bias: torch.Tensor | None = None,
    *,
    num_threads: int | None = None,
) -> torch.Tensor:
    """x [..., K] (fp32/fp16/bf16) @ dequantize(w).T + bias -> [..., N] in x's dtype."""
    return int4_linear_packed(
        x, w.qweight, w.scales, w.zeros, w.shape, w.group_size, bias, w.perm, num_threads
    )


def int4_linear_reference(
    x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The plain torch reference: dequantize(w) (the exact (q − z)·s), matmul in float64, x's
    dtype out."""
    from rgpt_rt.ops.int4_format import dequantize

    out = x.to(torch.float64) @ dequantize(w).to(x.device, torch.float64).T
    if bias is not None:
        out = out + bias.to(torch.float64)
    return out.to(x.dtype)
