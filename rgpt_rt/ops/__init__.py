"""rgpt_rt's operators, one module per kernel family, each with its plain-torch reference:

    mask_pool(features, masks, batch_index=None, *, mode="area") -> [N, C]             (mask_pool.py)
    mask_pool_reference(features, masks, batch_index=None, *, mode="area") -> [N, C]   (mask_pool.py)
    int4_linear(x[..., K], w: Int4Weight, bias=None) -> [..., N]                          (int4.py)
    int4_linear_reference(x[..., K], w, bias=None) -> [..., N]
    add_region_numbers(embeds[N, D], table[M, D], batch_index=None) -> [N, D]   (region_numbers.py)
    add_region_positions(embeds[N, D], masks[N, H, W], weight[D, 4F]) -> [N, D] (region_positions.py)

The references are written to be obviously right, not fast; the kernels in csrc/ are tested
against them.
"""

from rgpt_rt.ops.int4 import int4_linear, int4_linear_packed, int4_linear_reference
from rgpt_rt.ops.mask_pool import (
    check_mask_pool_args,
    mask_cell_weights,
    mask_pool,
    mask_pool_reference,
)
from rgpt_rt.ops.region_numbers import add_region_numbers
from rgpt_rt.ops.region_positions import add_region_positions

__all__ = [
    "add_region_numbers",
    "add_region_positions",
    "check_mask_pool_args",
    "int4_linear",
    "int4_linear_packed",
    "int4_linear_reference",
    "mask_cell_weights",
    "mask_pool",
    "mask_pool_reference",
]
