"""rgpt_rt's operators, one module per kernel family, each with its plain-torch reference:

    mask_pool(features, masks, batch_index=None, *, mode="area") -> [N, C]             (mask_pool.py)
    mask_pool_reference(features, masks, batch_index=None, *, mode="area") -> [N, C]   (mask_pool.py)

The references are written to be obviously right, not fast; the kernels in csrc/ are tested
against them.
"""

from rgpt_rt.ops.mask_pool import (
    check_mask_pool_args,
    mask_cell_weights,
    mask_pool,
    mask_pool_reference,
)

__all__ = ["check_mask_pool_args", "mask_cell_weights", "mask_pool", "mask_pool_reference"]
