"""Cases shared by the fused decode step's op tests on CPU (tests/ops/test_decode_ops.py) and on
CUDA (tests/gpu/test_decode_fused_cuda.py): shapes with readable ids, inputs, and the tolerance.

Tolerances come from the precision (STYLE.md §4): rope_kv_append is exact (torch.equal against
its torch reference, which is the unfused step's arithmetic); add_rms_norm's residual is exact
(one rounded add); the norm, the attention and SiLU·mul may differ from a same-precision torch
computation in summation order and exp/rsqrt implementations, so their error against a float64
reference must be at most twice that of the same-precision torch baseline, plus one unit of the
output dtype's eps at the output's scale (a baseline that happens to be exact allows no error).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# add_rms_norm / silu_mul: (rows, dim)
ROWS = {
    "7b-hidden-1x4096": (1, 4096),
    "7b-batch8-8x4096": (8, 4096),
    "tiny-1x256": (1, 256),
    "awkward-5x113": (5, 113),
    "one-value-2x1": (2, 1),
}
SILU_ROWS = {
    "7b-mlp-1x11008": (1, 11008),
    "tiny-3x768": (3, 768),
    "awkward-5x113": (5, 113),
}

# rope_kv_append / decode_attention: (heads, kv heads, head_dim, lengths of the rows)
# lengths: each row's slots after this token (its position + 1)
HEADS = {
    "7b-mha-32x128": (32, 32, 128, [700]),
    "gqa-32over8-hd128-3rows": (32, 8, 128, [1, 257, 700]),
    "tiny-4over2-hd64": (4, 2, 64, [61, 9]),
    "hd96-group3": (6, 2, 96, [33, 64, 65]),
    "hd256-group8": (8, 1, 256, [130]),
}
CPU_ONLY_HEADS = {  # head_dim the CUDA kernel does not take; the C++ twin takes any
    "awkward-hd18-group3": (3, 1, 18, [5, 1]),
    "hd2-mha": (2, 2, 2, [3]),
}
CACHE_PAIRS = {  # (activation dtype, cache dtype) the decoder runs
    "fp32-cache-fp32": (torch.float32, torch.float32),
    "fp32-cache-fp16": (torch.float32, torch.float16),  # an INT4 bundle on a CPU
    "fp16-cache-fp16": (torch.float16, torch.float16),
    "bf16-cache-bf16": (torch.bfloat16, torch.bfloat16),
}


def assert_within_twice_torch(
    ours: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor, what: str
) -> None:
    """|ours − reference| ≤ 2 |baseline − reference| + eps(dtype) · max|reference| (module doc)."""
    reference = reference.double()
    error = float((ours.double() - reference).abs().max())
    allowed = 2 * float((baseline.double() - reference).abs().max())
    allowed += torch.finfo(ours.dtype).eps * float(reference.abs().max())
    assert error <= allowed, f"{what}: error {error:.3g} > allowed {allowed:.3g}"


def norm_inputs(rows: int, dim: int, dtype, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)
    residual = 4 * torch.randn(rows, dim, generator=g)
    weight = 1 + 0.1 * torch.randn(dim, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, residual, weight))


def rope_tables(length: int, head_dim: int, dtype, device, theta: float = 10000.0):
    """cos and signed_sin [length, head_dim] as the decoder builds them (model._ensure_rope)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    sign = torch.ones(head_dim)
    sign[: head_dim // 2] = -1
    return emb.cos().to(device, dtype), (emb.sin() * sign).to(device, dtype)


def cache_inputs(heads, kv_heads, head_dim, lengths, dtype, cache_dtype, device, seed=0):
    """qkv [B, (H + 2 Hkv) hd + 3] (3 extra columns: rows are strided), caches [B, Hkv, T, hd]
    filled with random history, positions [B] = lengths − 1, rope tables."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths) + 5
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(B, width + 3, generator=g)
    k_cache = torch.randn(B, kv_heads, T, head_dim, generator=g)
    v_cache = torch.randn(B, kv_heads, T, head_dim, generator=g)
    positions = torch.tensor([n - 1 for n in lengths], dtype=torch.int64)
    cos, signed_sin = rope_tables(T, head_dim, dtype, device)
    return (
        qkv.to(device, dtype),
        k_cache.to(device, cache_dtype),
        v_cache.to(device, cache_dtype),
        positions.to(device),
        cos,
        signed_sin,
    )


def poison_past_lengths(k_cache, v_cache, positions) -> None:
    """Fill every slot after each row's last (its future) with NaN: attention over the real
    lengths never reads them, a mask that multiplies by zero would still make NaN."""
    for b, pos in enumerate(positions.tolist()):
        k_cache[b, :, pos + 1 :] = float("nan")
        v_cache[b, :, pos + 1 :] = float("nan")


def query_view(qkv, heads, head_dim):
    """q [B, H, hd] as the decoder passes it: a strided view of the qkv rows."""
    return qkv.as_strided((qkv.shape[0], heads, head_dim), (qkv.stride(0), head_dim, 1))
