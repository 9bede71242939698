"""The fused decode step's ops: what a LLaMA layer runs between its linears (csrc/decode/).

    normed, residual = add_rms_norm(x[M, D], residual[M, D] | None, weight[D], eps)
    rope_kv_append(qkv[N, W], k_cache[B, Hkv, T, hd], v_cache, positions[B(, t)], cos[P, hd],
                   signed_sin[P, hd], num_heads, num_kv_heads)          # in place, returns None
    out = decode_attention(q[B, H, hd], k_cache, v_cache, positions[B], workspace, splits)  # [B, H hd]
    out = silu_mul(gate_up[M, 2I])                                        # [M, I]

and their plain torch references (`*_reference`), which the kernels are tested against:

- add_rms_norm: residual = x + residual (torch's add, in x's dtype; residual None: x), normed =
  (r · rsqrt(mean(r²) + eps)) · weight on r = residual in fp32, rounded once to x's dtype (what
  CUDA's F.rms_norm computes; HF's fp32 norm up to the order of its sum).
- rope_kv_append: q and k heads of each token rotated in place, x·cos + cat(x2, x1)·signed_sin
  with torch's roundings (bit for bit the unfused step's apply_rope), then k and v written to the
  cache (rounded to its dtype) at the token's position. Token n = b·t + i of qkv is row b's i-th.
- decode_attention: row b's query heads over its own slots 0..positions[b] (the new token
  included), head h reading kv head h // (H / Hkv); scores, softmax and sums in fp32.
- silu_mul: silu(gate) · up in fp32, rounded once.

Each op has a C++ twin (CPU) and a CUDA kernel under one torch.library op (`rgpt_rt::...`), with
a fake implementation so CUDA graphs and torch.compile see through it; outputs are allocated here
and kernels launch on the current stream. Plain calls skip the dispatcher and run the op's body
(as ops/int4.py does): on a CPU decode step the dispatcher would cost more than the kernels.

decode_attention on CUDA runs split-KV (flash-decoding): `splits` blocks per (row, kv head), each
taking a share of the row's length read on the device, so one launch serves every length (a
CUDA graph needs no length bucket). With splits > 1 it needs a workspace made by
`attention_workspace` (zeroed once, reused by one launch at a time). The CUDA kernel takes
head_dim 64, 96, 128 or 256 and at most 8 query heads per kv head (`cuda_supports`); the C++
twin takes any.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # decode.h DType


@functools.cache
def _lib():
    from rgpt_rt import _C

    return _C


# The eager bodies check cheaply (a CPU decode step calls them ~20 times per token, and their
# kernels take microseconds): tensor properties here, pointers and sizes in decode_host.cpp.
def _device_args(t: Tensor) -> tuple[bool, int]:
    """(cuda, stream) for a kernel launch on t's device."""
    if t.is_cpu:
        return False, 0
    if t.is_cuda:
        return True, torch.cuda.current_stream(t.device).cuda_stream
    raise ValueError(f"the decode ops run on CPU and CUDA; got a tensor on {t.device}")


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in DTYPE_TAGS:
        raise ValueError(f"{name} must be float32, float16 or bfloat16; got {t.dtype}")


def _check_same_device(*tensors: Tensor | None) -> None:
    """All on one device (all on the CPU: the common case, checked first)."""
    for t in tensors:
        if t is not None and not t.is_cpu:
            break
    else:
        return
    devices = {str(t.device) for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"the tensors are on several devices: {sorted(devices)}")


# --- add + RMSNorm -----------------------------------------------------------------------------
def check_add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor) -> None:
    _check_float("x", x)
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [M, D]; got {list(x.shape)}")
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or not residual.is_contiguous()
    ):
        raise ValueError(
            f"residual must be a contiguous {x.dtype} {list(x.shape)} like x; got {residual.dtype} {list(residual.shape)}"
        )
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype or not weight.is_contiguous():
        raise ValueError(
            f"weight must be a contiguous {x.dtype} [{x.shape[1]}]; got {weight.dtype} {list(weight.shape)}"
        )
    _check_same_device(x, residual, weight)


def add_rms_norm_eager(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """The body of rgpt_rt::add_rms_norm: x, residual [M, D] -> (normed, residual) [M, D]."""
    check_add_rms_norm(x, residual, weight)
    cuda, stream = _device_args(x)
    out, summed = torch.empty_like(x), torch.empty_like(x)
    _lib().decode_add_rms_norm(
        x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
        out.data_ptr(), summed.data_ptr(), x.shape[0], x.shape[1], eps, DTYPE_TAGS[x.dtype],
        cuda, stream,
    )  # fmt: skip
    return out, summed


add_rms_norm_op = torch.library.custom_op("rgpt_rt::add_rms_norm", mutates_args=())(
    add_rms_norm_eager
)


@add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    check_add_rms_norm(x, residual, weight)
    return torch.empty_like(x), torch.empty_like(x)


def add_rms_norm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """x [M, D] (a layer's output), residual [M, D] (the stream so far; None: start it with x),
    weight [D] -> (normed [M, D], residual + x [M, D]), in x's dtype."""
    op = add_rms_norm_op if torch.compiler.is_compiling() else add_rms_norm_eager
    return op(x, residual, weight, eps)


def add_rms_norm_reference(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    summed = x.clone() if residual is None else x + residual
    r = summed.float()
    normed = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(x.dtype), summed


def _check_kv_cache(k_cache, v_cache):
    """One layer of a KVCache: two contiguous [B, Hkv, T, hd] tensors of one float dtype."""
    _check_float("k_cache", k_cache)
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_cache and v_cache must both be [B, Hkv, T, hd] of one dtype; got {k_cache.dtype} "
            f"{list(k_cache.shape)} and {v_cache.dtype} {list(v_cache.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous (one layer of a KVCache)")


# --- rope + KV append --------------------------------------------------------------------------
def _rope_shapes(qkv, k_cache, v_cache, positions, cos, signed_sin, num_heads, num_kv_heads):
    """Validate rope_kv_append's arguments; return (tokens per row, head_dim)."""
    _check_float("qkv", qkv)
    _check_kv_cache(k_cache, v_cache)
    B, Hkv, _, hd = k_cache.shape
    if Hkv != num_kv_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"the cache holds {Hkv} kv heads; num_kv_heads is {num_kv_heads} and num_heads {num_heads} (a multiple of it)"
        )
    if positions.dtype != torch.int64 or positions.dim() not in (1, 2):
        raise ValueError(
            f"positions must be int64 [B] or [B, t]; got {positions.dtype} {list(positions.shape)}"
        )
    per_row = 1 if positions.dim() == 1 else positions.shape[1]
    width = (num_heads + 2 * num_kv_heads) * hd
    if qkv.dim() != 2 or qkv.shape[0] != positions.numel() or qkv.shape[1] < width:
        raise ValueError(
            f"qkv must be [B·t, >= (H + 2 Hkv)·hd] = [{positions.numel()}, {width}] for positions "
            f"{list(positions.shape)}; got {list(qkv.shape)}"
        )
    if qkv.stride(1) != 1 or positions.numel() > B * per_row or not positions.is_contiguous():
        raise ValueError(
            "qkv's rows must be contiguous, positions contiguous, and at most one row of tokens per cache row"
        )
    for name, table in (("cos", cos), ("signed_sin", signed_sin)):
        if table.dim() != 2 or table.shape[1] != hd or table.dtype != qkv.dtype:
            raise ValueError(
                f"{name} must be a {qkv.dtype} [P, {hd}] table; got {table.dtype} {list(table.shape)}"
            )
        if not table.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    _check_same_device(qkv, k_cache, v_cache, positions, cos, signed_sin)
    return per_row, hd


def rope_kv_append_eager(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    positions: Tensor,
    cos: Tensor,
    signed_sin: Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """The body of rgpt_rt::rope_kv_append (see rope_kv_append)."""
    per_row, hd = _rope_shapes(
        qkv, k_cache, v_cache, positions, cos, signed_sin, num_heads, num_kv_heads
    )
    cuda, stream = _device_args(qkv)
    B, _, max_len, _ = k_cache.shape
    _lib().decode_rope_kv_append(
        qkv.data_ptr(), qkv.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        positions.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), positions.numel(), per_row,
        B, num_heads, num_kv_heads, hd, max_len, min(cos.shape[0], signed_sin.shape[0]),
        DTYPE_TAGS[qkv.dtype], DTYPE_TAGS[k_cache.dtype], cuda, stream,
    )  # fmt: skip


rope_kv_append_op = torch.library.custom_op(
    "rgpt_rt::rope_kv_append", mutates_args=("qkv", "k_cache", "v_cache")
)(rope_kv_append_eager)


@rope_kv_append_op.register_fake
def _(qkv, k_cache, v_cache, positions, cos, signed_sin, num_heads, num_kv_heads):
    _rope_shapes(qkv, k_cache, v_cache, positions, cos, signed_sin, num_heads, num_kv_heads)


def rope_kv_append(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    positions: Tensor,
    cos: Tensor,
    signed_sin: Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """qkv [N, >= (H + 2 Hkv)·hd]: per token its q heads, k heads and v heads (the fused qkv
    projection's output; N = B·t tokens, token n = b·t + i, row b's i-th); positions [B] or
    [B, t] int64: each token's slot; cos, signed_sin [P, hd] tables in qkv's dtype (positions
    < P); k_cache, v_cache [B, Hkv, T, hd] one layer of the cache. Rotates q and k in place and
    writes k and v into the cache (rounded to its dtype) at each token's slot."""
    traced = torch.compiler.is_compiling()
    op = rope_kv_append_op if traced else rope_kv_append_eager
    op(qkv, k_cache, v_cache, positions, cos, signed_sin, num_heads, num_kv_heads)


def rope_kv_append_reference(
    qkv, k_cache, v_cache, positions, cos, signed_sin, num_heads, num_kv_heads
) -> None:
    hd = k_cache.shape[-1]
    per_row = 1 if positions.dim() == 1 else positions.shape[1]
    pos = positions.reshape(-1)
    rows = torch.arange(pos.numel(), device=pos.device) // per_row
    x = qkv[:, : (num_heads + num_kv_heads) * hd].view(-1, num_heads + num_kv_heads, hd)
    c, s = cos[pos][:, None], signed_sin[pos][:, None]  # [N, 1, hd]
    half = hd // 2
    x.copy_(x * c + torch.cat((x[..., half:], x[..., :half]), dim=-1) * s)
    k = x[:, num_heads:]  # [N, Hkv, hd]
    v = qkv[:, (num_heads + num_kv_heads) * hd : (num_heads + 2 * num_kv_heads) * hd]
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.view(-1, num_kv_heads, hd).to(v_cache.dtype)


# --- decode attention --------------------------------------------------------------------------
CUDA_HEAD_DIMS = (64, 96, 128, 256)
CUDA_MAX_GROUP = 8


def cuda_supports(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype
) -> bool:
    """Whether the CUDA decode_attention kernel takes these heads and dtypes (the C++ twin
    takes any): head_dim in CUDA_HEAD_DIMS, at most CUDA_MAX_GROUP query heads per kv head, and
    a cache in q's dtype or fp16 under fp32 (the same pairs rope_kv_append takes on CUDA)."""
    if dtype not in DTYPE_TAGS or cache_dtype not in DTYPE_TAGS:
        return False
    return _lib().decode_attention_cuda_supports(
        num_heads, num_kv_heads, head_dim, DTYPE_TAGS[dtype], DTYPE_TAGS[cache_dtype]
    )


def attention_workspace(
    batch: int, num_heads: int, num_kv_heads: int, head_dim: int, max_len: int, device
) -> tuple[Tensor | None, int]:
    """(workspace, splits) for decode_attention over a [batch, num_kv_heads, max_len, head_dim]
    cache on `device`: None and 1 on a CPU; on CUDA the split count for the device's SMs and a
    zeroed workspace (None when splits is 1). Make it outside any CUDA-graph capture."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, 1
    lib = _lib()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = lib.decode_attention_splits(batch * num_kv_heads, max_len, sms)
    nbytes = lib.decode_attention_workspace_bytes(batch, num_heads, num_kv_heads, head_dim, splits)
    if nbytes == 0:
        return None, 1
    workspace = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    torch.cuda.current_stream(device).synchronize()  # zeroed before any stream uses it
    return workspace, splits


def _check_attention(q, k_cache, v_cache, positions):
    _check_float("q", q)
    _check_kv_cache(k_cache, v_cache)
    B, Hkv, _, hd = k_cache.shape
    if q.dim() != 3 or q.shape[0] != B or q.shape[2] != hd or q.shape[1] % Hkv:
        raise ValueError(
            f"q must be [B, H, hd] = [{B}, a multiple of {Hkv}, {hd}] for a cache {list(k_cache.shape)}; got {list(q.shape)}"
        )
    if q.stride(2) != 1 or q.stride(1) != hd:
        raise ValueError("q's heads must be contiguous (each row [H, hd] dense; rows may be apart)")
    if positions.dtype != torch.int64 or positions.shape != (B,) or not positions.is_contiguous():
        raise ValueError(
            f"positions must be int64 [{B}]; got {positions.dtype} {list(positions.shape)}"
        )
    _check_same_device(q, k_cache, v_cache, positions)


def decode_attention_eager(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    positions: Tensor,
    workspace: Tensor | None,
    splits: int,
) -> Tensor:
    """The body of rgpt_rt::decode_attention (see decode_attention)."""
    _check_attention(q, k_cache, v_cache, positions)
    cuda, stream = _device_args(q)
    B, H, hd = q.shape
    out = q.new_empty(B, H * hd)
    _lib().decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), positions.data_ptr(),
        out.data_ptr(), B, H, k_cache.shape[1], hd, k_cache.shape[2], 1.0 / math.sqrt(hd),
        DTYPE_TAGS[q.dtype], DTYPE_TAGS[k_cache.dtype], splits if cuda else 1,
        0 if workspace is None else workspace.data_ptr(),
        0 if workspace is None else workspace.numel(), cuda, stream, torch.get_num_threads(),
    )  # fmt: skip
    return out


decode_attention_op = torch.library.custom_op(
    "rgpt_rt::decode_attention", mutates_args=("workspace",)
)(decode_attention_eager)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, positions, workspace, splits):
    _check_attention(q, k_cache, v_cache, positions)
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    positions: Tensor,
    workspace: Tensor | None = None,
    splits: int = 1,
) -> Tensor:
    """q [B, H, hd] (one token per row; heads contiguous, rows may be strided, e.g. a view of
    the qkv projection); k_cache, v_cache [B, Hkv, T, hd]; positions [B] int64: row b attends
    its slots 0..positions[b] -> [B, H·hd] in q's dtype, scale 1/sqrt(hd). workspace, splits:
    from attention_workspace (CUDA; ignored on a CPU)."""
    op = decode_attention_op if torch.compiler.is_compiling() else decode_attention_eager
    return op(q, k_cache, v_cache, positions, workspace, splits)


def decode_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, dtype=torch.float64
) -> Tensor:
    """Row by row over its own length, computed and returned in `dtype` (float64: the
    reference; q's dtype: the same-precision torch baseline the unfused step computes)."""
    B, H, hd = q.shape
    group = H // k_cache.shape[1]
    rows = []
    for b in range(B):
        n = int(positions[b]) + 1
        keys = k_cache[b, :, :n].to(dtype).repeat_interleave(group, dim=0)  # [H, n, hd]
        values = v_cache[b, :, :n].to(dtype).repeat_interleave(group, dim=0)
        out = F.scaled_dot_product_attention(q[b, :, None].to(dtype), keys, values)  # [H, 1, hd]
        rows.append(out.reshape(H * hd))
    return torch.stack(rows)


# --- SiLU · mul --------------------------------------------------------------------------------
def _check_silu_mul(gate_up: Tensor) -> None:
    _check_float("gate_up", gate_up)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or not gate_up.is_contiguous():
        raise ValueError(f"gate_up must be a contiguous [M, 2 I]; got {list(gate_up.shape)}")


def silu_mul_eager(gate_up: Tensor) -> Tensor:
    """The body of rgpt_rt::silu_mul: gate_up [M, 2I] -> [M, I]."""
    _check_silu_mul(gate_up)
    cuda, stream = _device_args(gate_up)
    M, inner = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(M, inner)
    _lib().decode_silu_mul(
        gate_up.data_ptr(), out.data_ptr(), M, inner, DTYPE_TAGS[gate_up.dtype], cuda, stream
    )
    return out


silu_mul_op = torch.library.custom_op("rgpt_rt::silu_mul", mutates_args=())(silu_mul_eager)


@silu_mul_op.register_fake
def _(gate_up):
    _check_silu_mul(gate_up)
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up [M, 2I] (the fused gate/up projection: gate first) -> silu(gate) · up [M, I]."""
    op = silu_mul_op if torch.compiler.is_compiling() else silu_mul_eager
    return op(gate_up)


def silu_mul_reference(gate_up: Tensor) -> Tensor:
    """In float64 (not rounded back)."""
    gate, up = gate_up.double().chunk(2, dim=-1)
    return F.silu(gate) * up
