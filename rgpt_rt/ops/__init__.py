"""rgpt_rt's operators, one module per kernel family, each with its plain-torch reference:

    mask_pool(features, masks, batch_index=None, *, mode="area") -> [N, C]             (mask_pool.py)
    mask_pool_reference(features, masks, batch_index=None, *, mode="area") -> [N, C]   (mask_pool.py)
    mask_pool_levels(levels, masks, *, mode="binary") -> [N, sum C_l]   several maps in one call
    int4_linear(x[..., K], w: Int4Weight, bias=None) -> [..., N]                          (int4.py)
    int4_linear_reference(x[..., K], w, bias=None) -> [..., N]
    add_region_numbers(embeds[N, D], table[M, D], batch_index=None) -> [N, D]   (region_numbers.py)
    add_region_positions(embeds[N, D], masks[N, H, W], weight[D, 4F]) -> [N, D] (region_positions.py)
    add_rms_norm(x[M, D], residual[M, D] | None, weight[D], eps) -> (normed, residual)  (decode.py)
    rope_kv_append(qkv[N, W], k_cache, v_cache, positions, cos, signed_sin, H, Hkv)    (in place)
    decode_attention(q[B, H, hd], k_cache, v_cache, positions[B], workspace, splits) -> [B, H hd]
    silu_mul(gate_up[M, 2I]) -> [M, I]
    (each with its *_reference: the fused decode step's kernels, decode.py)

The references are written to be obviously right, not fast; the kernels in csrc/ are tested
against them.
"""

from rgpt_rt.ops.decode import (
    add_rms_norm,
    add_rms_norm_reference,
    decode_attention,
    decode_attention_reference,
    rope_kv_append,
    rope_kv_append_reference,
    silu_mul,
    silu_mul_reference,
)
from rgpt_rt.ops.int4 import int4_linear, int4_linear_packed, int4_linear_reference
from rgpt_rt.ops.mask_pool import (
    check_mask_pool_args,
    mask_cell_weights,
    mask_pool,
    mask_pool_levels,
    mask_pool_levels_reference,
    mask_pool_reference,
)
from rgpt_rt.ops.region_numbers import add_region_numbers
from rgpt_rt.ops.region_positions import add_region_positions

__all__ = [
    "add_region_numbers",
    "add_region_positions",
    "add_rms_norm",
    "add_rms_norm_reference",
    "check_mask_pool_args",
    "decode_attention",
    "decode_attention_reference",
    "int4_linear",
    "int4_linear_packed",
    "int4_linear_reference",
    "mask_cell_weights",
    "mask_pool",
    "mask_pool_levels",
    "mask_pool_levels_reference",
    "mask_pool_reference",
    "rope_kv_append",
    "rope_kv_append_reference",
    "silu_mul",
    "silu_mul_reference",
]
