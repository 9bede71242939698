"""Mask pooling: one vector per region, the mask-weighted mean of a feature grid (DESIGN.md §1).

mask_pool(features, masks, batch_index=None, *, mode="area") -> [N, C]             the kernels
mask_pool_reference(features, masks, batch_index=None, *, mode="area") -> [N, C]   plain torch
mask_pool_levels([f_0, ..., f_L-1], masks, ...) -> [N, C_0 + ... + C_L-1]        L <= 4 levels
mask_pool_levels_reference(...)                                                     in one call

Modes (the weight w[i, j] of cell (i, j) of an H x W grid; pooled = sum w * f / sum w):
- "area": the area of mask pixels inside the cell (fractional cell edges; float masks weigh by
  value). Nothing vanishes.
- "bilinear": F.interpolate(mask, (H, W), mode="bilinear", align_corners=False) (RegionGPT).
- "binary": Osprey's MaskPooling: 1 where that bilinear resampling is > 0, else 0, and
  pooled = sum f / (count + 1e-8). Computed exactly, from integer taps (`bilinear_taps`): a
  cell is selected when one of its taps that carries weight lands on a set pixel (> 0; bool and
  uint8: nonzero). For masks without negative values this *is* `F.interpolate(...) > 0`; where
  float arithmetic could still differ from it is said at `bilinear_taps`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rgpt_rt.config import POOL_MODES

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_FEATURE_DTYPES = (*FEATURE_DTYPES, torch.float64)  # the reference also takes float64
MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)
# feature levels per mask_pool_levels call (kMaxLevels in csrc/mask_pool/mask_pool.h)
MAX_LEVELS = 4
BINARY_EPSILON = 1e-8  # Osprey's denominator: sum / (count + 1e-8)


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


def bilinear_taps(cells: int, pixels: int) -> torch.Tensor:
    """[cells, pixels] bool: whether pixel p carries weight (a nonzero one) in output index i of
    a bilinear resampling of `pixels` onto `cells` (F.interpolate, align_corners=False).

    torch's source coordinate of index i is scale * (i + 1/2) - 1/2, clamped at 0, with
    scale = pixels / cells: exactly (pixels * (2i + 1) - cells) / (2 * cells). Its floor `lo`
    always carries weight (1 - frac > 0); lo + 1 carries weight frac, nonzero iff the division
    leaves a remainder (and lo + 1 is a pixel). Integers only: exact for every size.

    torch computes the coordinate in floats (fp32 for fp32 masks, FMA-contracted or not), so it
    can disagree with this exact rule where the true coordinate is an integer it does not hit
    exactly, or lies within float rounding of one: then a tap of weight ~1e-7 appears or
    vanishes. That needs a coordinate torch cannot compute exactly; it computes it exactly (and
    agrees) whenever `cells` is a power of two and 2 * pixels * cells <= 2^24 (scale, the product
    and the difference are then exact dyadic fp32 numbers), which covers Osprey's levels (128,
    64, 32, 16 cells) for masks up to 65536 pixels wide."""
    i = torch.arange(cells, dtype=torch.int64)
    numerator = (pixels * (2 * i + 1) - cells).clamp(min=0)
    lo = numerator // (2 * cells)
    hi = torch.where((numerator % (2 * cells) != 0) & (lo < pixels - 1), lo + 1, lo)
    taps = torch.zeros(cells, pixels, dtype=torch.bool)
    taps[i, lo] = True
    taps[i, hi] = True
    return taps


def mask_cell_weights(
    masks: torch.Tensor, height: int, width: int, mode: str = "area"
) -> torch.Tensor:
    """[N, Hm, Wm] masks -> [N, H, W] float64 weights of each grid cell (DESIGN.md §1).

    area: the area of mask pixels inside each cell, fractional cell edges included;
    bilinear: F.interpolate(..., mode="bilinear", align_corners=False);
    binary: 1 where a tap of that interpolation that carries weight is a set pixel (> 0), else 0."""
    if mode == "binary":
        inside = (masks > 0).to(torch.float64)  # bool and uint8: nonzero
        rows = bilinear_taps(height, masks.shape[1]).to(masks.device, torch.float64)  # [H, Hm]
        cols = bilinear_taps(width, masks.shape[2]).to(masks.device, torch.float64)  # [W, Wm]
        # hits[n, i, j] = the number of set pixels among cell (i, j)'s taps (exact integers)
        hits = torch.einsum("ip,npq,jq->nij", rows, inside, cols)
        return (hits > 0).to(torch.float64)
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
    Returns [N, C] in the features' dtype: sum(w * f) / sum(w), accumulated in float64 here
    (binary mode: sum(f) / (count + 1e-8), Osprey's form); an empty mask gives zeros."""
    batch_index = check_mask_pool_args(features, masks, batch_index, mode, REFERENCE_FEATURE_DTYPES)
    if masks.dtype in (torch.bool, torch.uint8):
        masks = masks != 0
    _, height, width, _ = features.shape
    weights = mask_cell_weights(masks, height, width, mode)  # [N, H, W]
    grids = features.to(torch.float64)[batch_index]  # [N, H, W, C]
    total = weights.sum(dim=(1, 2))  # [N]
    summed = torch.einsum("nij,nijc->nc", weights, grids)  # [N, C]
    if mode == "binary":
        pooled = summed / (total[:, None] + BINARY_EPSILON)  # an empty mask: 0 / 1e-8 = 0
    else:
        pooled = torch.where(
            total[:, None] > 0, summed / total.clamp(min=1e-300)[:, None], torch.zeros_like(summed)
        )
    return pooled.to(features.dtype)


def check_mask_pool_levels_args(
    features: Sequence[torch.Tensor],
    masks: torch.Tensor,
    batch_index: torch.Tensor | None,
    mode: str,
    feature_dtypes: tuple[torch.dtype, ...] = FEATURE_DTYPES,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """check_mask_pool_args for each of 1..MAX_LEVELS feature levels, which must share a dtype,
    a device and their images (B); returns batch_index as int64 [N]."""
    if not isinstance(features, (list, tuple)) or not 1 <= len(features) <= MAX_LEVELS:
        got = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
        raise ValueError(
            f"features must be a list of 1 to {MAX_LEVELS} [B, H, W, C] tensors (one per "
            f"level); got {got}. Pool more levels in several calls"
        )
    for k, level in enumerate(features):
        if not isinstance(level, torch.Tensor) or level.dim() != 4:
            got = tuple(level.shape) if isinstance(level, torch.Tensor) else type(level).__name__
            raise ValueError(f"features[{k}] must be a [B, H, W, C] tensor; got {got}")
    first = features[0]
    for k, level in enumerate(features[1:], start=1):
        if level.dtype != first.dtype or level.device != first.device:
            raise ValueError(
                f"features[{k}] is {level.dtype} on {level.device} but features[0] is "
                f"{first.dtype} on {first.device}; give every level one dtype and device"
            )
        if level.shape[0] != first.shape[0]:
            raise ValueError(
                f"features[{k}] holds {level.shape[0]} images but features[0] holds "
                f"{first.shape[0]}; every level must come from the same images"
            )
    # the value checks read masks and batch_index, which every level shares: once is enough
    index = check_mask_pool_args(
        first, masks, batch_index, mode, feature_dtypes, check_values=check_values
    )
    for level in features[1:]:
        check_mask_pool_args(level, masks, batch_index, mode, feature_dtypes, check_values=False)
    return index


def mask_pool_levels_reference(
    features: Sequence[torch.Tensor],
    masks: torch.Tensor,
    batch_index: torch.Tensor | None = None,
    *,
    mode: str = "area",
) -> torch.Tensor:
    """mask_pool_reference on each level, side by side: [N, C_0 + ... + C_L-1].

    features: 1..4 levels [B, H_k, W_k, C_k] of the same images (any grid sizes); masks and
    batch_index as for mask_pool_reference, shared by every level."""
    check_mask_pool_levels_args(features, masks, batch_index, mode, REFERENCE_FEATURE_DTYPES)
    return torch.cat(
        [mask_pool_reference(level, masks, batch_index, mode=mode) for level in features], dim=1
    )


# ---- the kernels (csrc/mask_pool/) ------------------------------------------------------------

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream. The value checks
    (finite float masks, batch_index in range) read tensor values: free on the CPU, a host
    synchronisation on a GPU. They run everywhere but inside CUDA-graph capture, where a
    synchronisation is illegal; there the kernels guard instead: an image index outside [0, B)
    or a non-finite mask gives a row of nan, never an out-of-bounds read."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _run_kernels(
    features: list[torch.Tensor], masks: torch.Tensor, index: torch.Tensor, mode: str
) -> torch.Tensor:
    """One call of the kernels over 1..MAX_LEVELS checked levels -> [N, sum C]."""
    device = features[0].device
    on_cuda = device.type == "cuda"
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"features are on {device}; mask_pool runs on cpu and cuda")
    features = [level.contiguous() for level in features]
    masks, index = masks.contiguous(), index.contiguous()
    out = features[0].new_empty(masks.shape[0], sum(level.shape[3] for level in features))
    shapes = dict(
        features_dtype=_DTYPE_NAMES[features[0].dtype],
        features_shapes=[list(level.shape) for level in features],
        masks_shape=list(masks.shape),
        mode=mode,
    )
    if on_cuda:
        device_index = device.index
        if device_index is None:
            device_index = torch.cuda.current_device()
        target = dict(device="cuda", device_index=device_index, num_threads=1)
        on_device = torch.cuda.device(device_index)
    else:
        target = dict(device="cpu", device_index=0, num_threads=torch.get_num_threads())
        on_device = contextlib.nullcontext()
    from rgpt_rt import _C  # here, so the reference model and the trainer need no build

    with on_device:  # the CUDA plan reads the current device's properties
        size = _C.mask_pool_levels_workspace_bytes(**shapes, **target)
        workspace = torch.empty(size, dtype=torch.uint8, device=device)
        # the kernels are enqueued on the current stream, as every torch op is
        stream = torch.cuda.current_stream().cuda_stream if on_cuda else 0
        _C.mask_pool_levels(
            features=[level.data_ptr() for level in features],
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


@torch.library.custom_op("rgpt_rt::mask_pool", mutates_args=())
def _mask_pool_op(
    features: torch.Tensor, masks: torch.Tensor, batch_index: torch.Tensor | None, mode: str
) -> torch.Tensor:
    check_values = not _capturing(features.device)
    index = check_mask_pool_args(features, masks, batch_index, mode, check_values=check_values)
    return _run_kernels([features], masks, index, mode)


@_mask_pool_op.register_fake
def _mask_pool_fake(
    features: torch.Tensor, masks: torch.Tensor, batch_index: torch.Tensor | None, mode: str
) -> torch.Tensor:
    check_mask_pool_args(features, masks, batch_index, mode, check_values=False)
    return features.new_empty(masks.shape[0], features.shape[3])


@torch.library.custom_op("rgpt_rt::mask_pool_levels", mutates_args=())
def _mask_pool_levels_op(
    features: list[torch.Tensor],
    masks: torch.Tensor,
    batch_index: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    check_values = not (isinstance(masks, torch.Tensor) and _capturing(masks.device))
    index = check_mask_pool_levels_args(
        features, masks, batch_index, mode, check_values=check_values
    )
    return _run_kernels(features, masks, index, mode)


@_mask_pool_levels_op.register_fake
def _mask_pool_levels_fake(
    features: list[torch.Tensor],
    masks: torch.Tensor,
    batch_index: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    check_mask_pool_levels_args(features, masks, batch_index, mode, check_values=False)
    return features[0].new_empty(masks.shape[0], sum(level.shape[3] for level in features))


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
    batch_index: [N] int64 (optional when B == 1); mode: "area", "bilinear" or "binary"
    -> [N, C] in the features' dtype, accumulated in fp32; an empty mask gives zeros.
    Bad arguments raise ValueError.

    A torch.library op (rgpt_rt::mask_pool, with a fake implementation): it works under
    torch.compile and inside CUDA-graph capture. During capture the checks that would
    synchronise are skipped (see _capturing); the kernels stay in bounds regardless."""
    return _mask_pool_op(features, masks, batch_index, mode)


def mask_pool_levels(
    features: Sequence[torch.Tensor],
    masks: torch.Tensor,
    batch_index: torch.Tensor | None = None,
    *,
    mode: str = "area",
) -> torch.Tensor:
    """mask_pool over 1..4 feature levels of the same images in one call (Osprey pools its four
    ConvNeXt levels, mode="binary"): the levels go through each kernel stage together (one
    launch per stage on a GPU instead of one per level).

    features: [f_0, ..., f_L-1], f_k [B, H_k, W_k, C_k], one dtype; masks [N, Hm, Wm] and
    batch_index [N] as for mask_pool -> [N, C_0 + ... + C_L-1], level k in columns
    [C_0 + ... + C_k-1, ... + C_k). A linear layer per level summed over levels (Osprey's
    res2..res5 projections) is one matmul of this with the levels' weights concatenated
    along their input dimension. A torch.library op (rgpt_rt::mask_pool_levels), as mask_pool."""
    if not isinstance(features, (list, tuple)):
        check_mask_pool_levels_args(features, masks, batch_index, mode)  # raises, naming it
    return _mask_pool_levels_op(list(features), masks, batch_index, mode)
