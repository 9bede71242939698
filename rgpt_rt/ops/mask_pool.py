"""Mask pooling: one vector per region, the mask-weighted mean of a feature grid (DESIGN.md §1).

mask_pool(features, masks, batch_index=None, *, mode="area") -> [N, C]             the kernels
mask_pool_reference(features, masks, batch_index=None, *, mode="area") -> [N, C]   plain torch
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from rgpt_rt.config import POOL_MODES

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_FEATURE_DTYPES = (*FEATURE_DTYPES, torch.float64)  # the reference also takes float64
MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_mask_pool_args(
    features: torch.Tensor,
    masks: torch.Tensor,
    batch_index: torch.Tensor | None,
    mode: str,
    feature_dtypes: tuple[torch.dtype, ...] = FEATURE_DTYPES,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """Validate mask pooling arguments; return batch_index as int64 [N] on the features' device.
    Raises ValueError naming the argument that is wrong.

    check_values=False skips the two checks that read tensor values (float masks finite,
    batch_index in range): on a GPU they synchronise with the host, which CUDA-graph capture
    forbids and fake tensors cannot answer."""
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        got = (
            tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        )
        raise ValueError(f"features must be a [B, H, W, C] tensor (channels last); got {got}")
    if features.dtype not in feature_dtypes:
        raise ValueError(
            f"features dtype {features.dtype} is not supported; use one of {feature_dtypes}"
        )
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks must be a [N, Hm, Wm] tensor; got {got}")
    if masks.dtype not in MASK_DTYPES:
        raise ValueError(
            f"masks dtype {masks.dtype} is not supported; use bool, uint8 or a float dtype"
        )
    if masks.device != features.device:
        raise ValueError(
            f"masks are on {masks.device} but features are on {features.device}; put both on one device"
        )
    if mode not in POOL_MODES:
        raise ValueError(f"mode {mode!r} is unknown; use one of {POOL_MODES}")
    batch, height, width, _ = features.shape
    if height == 0 or width == 0:
        raise ValueError(f"features grid is empty ({height}x{width})")
    if masks.shape[1] == 0 or masks.shape[2] == 0:
        raise ValueError(f"masks have an empty size ({masks.shape[1]}x{masks.shape[2]})")
    if (
        check_values
        and masks.is_floating_point()
        and masks.numel() > 0
        and not bool(torch.isfinite(masks).all())
    ):
        raise ValueError(
            "masks hold non-finite values (nan or inf); float masks are coverages in [0, 1]"
        )
    num_masks = masks.shape[0]
    if batch_index is None:
        if batch != 1:
            raise ValueError(
                f"features hold {batch} images, so batch_index ([N] int64, the image of each mask) is required"
            )
        return torch.zeros(num_masks, dtype=torch.int64, device=features.device)
    if not isinstance(batch_index, torch.Tensor) or batch_index.dim() != 1:
        raise ValueError("batch_index must be a 1-D int64 tensor [N]")
    if batch_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"batch_index dtype {batch_index.dtype} is not supported; use int64")
    if batch_index.device != features.device:
        raise ValueError(
            f"batch_index is on {batch_index.device} but features are on {features.device}"
        )
    if batch_index.shape[0] != num_masks:
        raise ValueError(
            f"batch_index has {batch_index.shape[0]} entries but there are {num_masks} masks"
        )
    if check_values and num_masks > 0:
        low, high = int(batch_index.min()), int(batch_index.max())
        if low < 0 or high >= batch:
            raise ValueError(
                f"batch_index values must be in [0, {batch}); got range [{low}, {high}]"
            )
    return batch_index.to(torch.int64)


def area_overlap(cells: int, pixels: int) -> torch.Tensor:
    """[cells, pixels] float64: the length, in pixels, of pixel p that lies in cell i, when
    [0, pixels) is cut into `cells` equal cells (edges at i * pixels / cells).

    Exact: in units of 1/cells of a pixel, pixel p spans [p*cells, (p+1)*cells) and cell i
    spans [i*pixels, (i+1)*pixels), so every overlap is an integer before the final scale."""
    i = torch.arange(cells, dtype=torch.int64)[:, None]
    p = torch.arange(pixels, dtype=torch.int64)[None, :]
    start = torch.maximum(p * cells, i * pixels)
    end = torch.minimum((p + 1) * cells, (i + 1) * pixels)
    return (end - start).clamp(min=0).to(torch.float64) / cells


def mask_cell_weights(
    masks: torch.Tensor, height: int, width: int, mode: str = "area"
) -> torch.Tensor:
    """[N, Hm, Wm] masks -> [N, H, W] float64 weights of each grid cell (DESIGN.md §1).

    area: the area of mask pixels inside each cell, fractional cell edges included;
    bilinear: F.interpolate(..., mode="bilinear", align_corners=False)."""
    values = masks.to(torch.float64)
    if mode == "bilinear":
        resized = F.interpolate(
            values[:, None], size=(height, width), mode="bilinear", align_corners=False
        )
        return resized[:, 0]
    rows = area_overlap(height, masks.shape[1]).to(masks.device)  # [H, Hm]
    cols = area_overlap(width, masks.shape[2]).to(masks.device)  # [W, Wm]
    # w[n, i, j] = sum_p sum_q rows[i, p] * m[n, p, q] * cols[j, q]
    return torch.einsum("ip,npq,jq->nij", rows, values, cols)


def mask_pool_reference(
    features: torch.Tensor,
    masks: torch.Tensor,
    batch_index: torch.Tensor | None = None,
    *,
    mode: str = "area",
) -> torch.Tensor:
    """One vector per mask: the mask-weighted mean of the feature grid.

    features: [B, H, W, C] float (channels last); masks: [N, Hm, Wm] bool/uint8 (nonzero =
    inside) or float (coverage in [0, 1]), covering the same field of view as the grid;
    batch_index: [N] int64, each mask's image (optional when B == 1).
    Returns [N, C] in the features' dtype: sum(w * f) / sum(w), accumulated in float64 here;
    an empty mask gives zeros."""
    batch_index = check_mask_pool_args(features, masks, batch_index, mode, REFERENCE_FEATURE_DTYPES)
    if masks.dtype in (torch.bool, torch.uint8):
        masks = masks != 0
    _, height, width, _ = features.shape
    weights = mask_cell_weights(masks, height, width, mode)  # [N, H, W]
    grids = features.to(torch.float64)[batch_index]  # [N, H, W, C]
    total = weights.sum(dim=(1, 2))  # [N]
    summed = torch.einsum("nij,nijc->nc", weights, grids)  # [N, C]
    pooled = torch.where(
        total[:, None] > 0, summed / total.clamp(min=1e-300)[:, None], torch.zeros_like(summed)
    )
    return pooled.to(features.dtype)


# ---- the kernels (csrc/mask_pool/) ------------------------------------------------------------

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


@torch.library.custom_op("rgpt_rt::mask_pool", mutates_args=())
def _mask_pool_op(
    features: torch.Tensor, masks: torch.Tensor, batch_index: torch.Tensor | None, mode: str
) -> torch.Tensor:
    on_cuda = features.device.type == "cuda"
    # The value checks (finite float masks, batch_index in range) read tensor values: free on
    # the CPU, a host synchronisation on a GPU. They run everywhere but inside CUDA-graph
    # capture, where a synchronisation is illegal; there the kernels guard instead: an image
    # index outside [0, B) or a non-finite mask gives a row of nan, never an out-of-bounds read.
    check_values = not (on_cuda and torch.cuda.is_current_stream_capturing())
    index = check_mask_pool_args(features, masks, batch_index, mode, check_values=check_values)
    if features.device.type not in ("cpu", "cuda"):
        raise ValueError(f"features are on {features.device}; mask_pool runs on cpu and cuda")
    features, masks, index = features.contiguous(), masks.contiguous(), index.contiguous()
    out = features.new_empty(masks.shape[0], features.shape[3])
    shapes = dict(
        features_dtype=_DTYPE_NAMES[features.dtype],
        features_shape=list(features.shape),
        masks_shape=list(masks.shape),
        mode=mode,
    )
    if on_cuda:
        device_index = features.device.index
        if device_index is None:
            device_index = torch.cuda.current_device()
        target = dict(device="cuda", device_index=device_index, num_threads=1)
        on_device = torch.cuda.device(device_index)
    else:
        target = dict(device="cpu", device_index=0, num_threads=torch.get_num_threads())
        on_device = contextlib.nullcontext()
    from rgpt_rt import _C  # here, so the reference model and the trainer need no build

    with on_device:  # the CUDA plan reads the current device's properties
        size = _C.mask_pool_workspace_bytes(**shapes, **target)
        workspace = torch.empty(size, dtype=torch.uint8, device=features.device)
        # the kernels are enqueued on the current stream, as every torch op is
        stream = torch.cuda.current_stream().cuda_stream if on_cuda else 0
        _C.mask_pool(
            features=features.data_ptr(),
            masks=masks.data_ptr(),
            masks_dtype=_DTYPE_NAMES[masks.dtype],
            batch_index=index.data_ptr(),
            out=out.data_ptr(),
            workspace=workspace.data_ptr(),
            workspace_bytes=size,
            stream=stream,
            **shapes,
            **target,
        )
    return out


@_mask_pool_op.register_fake
def _mask_pool_fake(
    features: torch.Tensor, masks: torch.Tensor, batch_index: torch.Tensor | None, mode: str
) -> torch.Tensor:
    check_mask_pool_args(features, masks, batch_index, mode, check_values=False)
    return features.new_empty(masks.shape[0], features.shape[3])


def mask_pool(
    features: torch.Tensor,
    masks: torch.Tensor,
    batch_index: torch.Tensor | None = None,
    *,
    mode: str = "area",
) -> torch.Tensor:
    """One vector per mask: the mask-weighted mean of the feature grid, by the kernels in
    csrc/mask_pool/ (C++ on the CPU on torch.get_num_threads() threads; CUDA on the current
    stream). The contract of mask_pool_reference, whose docstring says it in full:

    features: [B, H, W, C] float32/float16/bfloat16; masks: [N, Hm, Wm] bool/uint8/float;
    batch_index: [N] int64 (optional when B == 1) -> [N, C] in the features' dtype,
    accumulated in fp32; an empty mask gives zeros. Bad arguments raise ValueError.

    A torch.library op (rgpt_rt::mask_pool, with a fake implementation): it works under
    torch.compile and inside CUDA-graph capture. During capture the checks that would
    synchronise are skipped (see _mask_pool_op); the kernels stay in bounds regardless."""
    return _mask_pool_op(features, masks, batch_index, mode)
