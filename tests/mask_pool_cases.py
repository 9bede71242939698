"""Inputs and tolerances shared by the CPU (tests/test_mask_pool.py, tests/test_mask_pool_levels.py)
and CUDA (tests/gpu/test_mask_pool_cuda.py) tests of rgpt_rt.ops.mask_pool and mask_pool_levels.

Tolerances (STYLE.md principle 4), against the float64 reference:
- float16 / bfloat16 features: the kernels accumulate in fp32 and round once; the reference
  computes in fp64 and rounds once. fp32 error is far below half an ulp of the output, so
  the two differ only where the exact value lies that close to a rounding boundary:
  at most 1 ulp of the output dtype (`assert_close_ulps`). Except where the mean cancels to
  near zero: there the output's ulp shrinks but the fp32 sum's error does not, so each output
  may also be off by 16 fp32 ulps of the mean of |features| under its mask (a CUDA sum order
  was 1.2e-7 off an expected near-zero bf16 output on an H200).
- float32 features: at most 2x the error of torch's own fp32 computation of the same
  function (fp32 weights, one fp32 matmul) against the fp64 reference, plus one fp32 ulp of
  the largest output for cases where torch happens to be exact (`assert_close_fp32`).
"""

from __future__ import annotations

import math

import torch

from rgpt_rt.ops import mask_cell_weights, mask_pool_reference
from rgpt_rt.ops.mask_pool import BINARY_EPSILON

FEATURE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASK_DTYPES = [torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64]
MODES = ["area", "bilinear", "binary"]

# (B, H, W, C, N, Hm, Wm): awkward shapes, each named for what it stresses
SHAPES = {
    "7x13-from-1000x333": (1, 7, 13, 5, 3, 1000, 333),
    "mask-smaller-than-grid": (1, 7, 13, 67, 4, 5, 3),
    "mask-same-size-as-grid": (1, 9, 11, 16, 3, 9, 11),
    "one-cell-grid": (1, 1, 1, 3, 2, 17, 29),
    "one-column-mask": (1, 6, 5, 8, 2, 40, 1),
    "three-images": (3, 12, 10, 130, 7, 50, 77),
    "more-masks-than-a-group": (2, 8, 8, 64, 21, 24, 40),
    "mask-wider-than-4096": (1, 3, 5, 8, 2, 20, 9000),
    "grid-wider-than-2048": (1, 2, 2100, 4, 2, 8, 3000),
}

# Several levels pooled in one call: (B, [(H, W, C) per level], N, Hm, Wm), each named for what
# it stresses. Osprey's real levels (128x128x192, 64x64x384, 32x32x768, 16x16x1536 from a
# 512-px image) are OSPREY_LEVELS; "osprey-narrow" is their geometry at a quarter of the size.
LEVEL_SETS = {
    "osprey-narrow": (1, [(32, 32, 8), (16, 16, 16), (8, 8, 32), (4, 4, 64)], 5, 128, 128),
    "three-images-mixed-grids": (3, [(7, 13, 5), (12, 10, 130), (1, 1, 3)], 21, 50, 77),
    "mask-wider-than-4096": (1, [(3, 5, 8), (2, 7, 4)], 2, 20, 9000),
    "grid-wider-than-2048-beside-a-small-one": (1, [(2, 2100, 4), (5, 3, 67)], 2, 8, 3000),
    "a-level-without-channels": (1, [(6, 6, 0), (3, 3, 8)], 3, 30, 30),
}
OSPREY_LEVELS = [(128, 128, 192), (64, 64, 384), (32, 32, 768), (16, 16, 1536)]


def ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of values.dtype at |values| (float64): one unit in the last place."""
    magnitude = values.abs()
    above = torch.nextafter(magnitude, torch.full_like(magnitude, math.inf))
    return (above.double() - magnitude.double()).abs()


def assert_close_ulps(
    actual: torch.Tensor, expected: torch.Tensor, ulps: int = 1, atol: torch.Tensor | float = 0.0
) -> None:
    """|actual - expected| <= ulps ulp(expected) + atol, elementwise."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    error = (actual.double() - expected.double()).abs()
    allowed = ulps * ulp(expected) + atol
    worst = (error - allowed).max().item() if error.numel() else 0.0
    assert worst <= 0, f"off by more than {ulps} ulp: max error {error.max().item():.3g}"


def torch_fp32_error(features, masks, batch_index, mode, expected64) -> float:
    """Max error against the fp64 reference of torch computing the same function in fp32."""
    _, height, width, _ = features.shape
    binary = masks if masks.dtype not in (torch.bool, torch.uint8) else masks != 0
    weights = mask_cell_weights(binary, height, width, mode).float().flatten(1)  # [N, H*W]
    grids = features.float().flatten(1, 2)  # [B, H*W, C]
    index = torch.zeros(masks.shape[0], dtype=torch.long) if batch_index is None else batch_index
    summed = torch.einsum("nk,nkc->nc", weights, grids[index.cpu()])
    total = weights.sum(1, keepdim=True)
    pooled = torch.where(total > 0, summed / total.clamp(min=1e-30), torch.zeros_like(summed))
    return (pooled.double() - expected64).abs().max().item() if pooled.numel() else 0.0


def assert_close_fp32(actual, expected64, torch_error: float) -> None:
    scale = expected64.abs().max().item() if expected64.numel() else 0.0
    allowed = 2 * torch_error + torch.finfo(torch.float32).eps * scale
    error = (actual.double() - expected64).abs().max().item() if actual.numel() else 0.0
    assert error <= allowed, f"fp32 error {error:.3g} > allowed {allowed:.3g}"


def check_against_reference(pool, features, masks, batch_index=None, mode="area"):
    """Run `pool` (the op) and compare it with mask_pool_reference at the tolerance of the
    features' dtype. Inputs may live on any device; the reference runs on the CPU."""
    actual = pool(features, masks, batch_index, mode=mode)
    assert_matches_reference(actual, features, masks, batch_index, mode)
    return actual.cpu()


def check_levels_against_reference(pool_levels, levels, masks, batch_index=None, mode="area"):
    """Run `pool_levels` (mask_pool_levels) once and compare each level's block of columns
    with mask_pool_reference on that level, at the tolerance of the features' dtype."""
    actual = pool_levels(levels, masks, batch_index, mode=mode)
    assert actual.shape == (masks.shape[0], sum(level.shape[3] for level in levels))
    column = 0
    for level in levels:
        channels = level.shape[3]
        assert_matches_reference(
            actual[:, column : column + channels], level, masks, batch_index, mode
        )
        column += channels
    return actual.cpu()


def assert_matches_reference(actual, features, masks, batch_index=None, mode="area"):
    """`actual` [N, C] against mask_pool_reference (fp64, on the CPU) at the tolerance of the
    features' dtype (this module's docstring)."""
    cpu_index = None if batch_index is None else batch_index.cpu()
    expected64 = mask_pool_reference(features.cpu().double(), masks.cpu(), cpu_index, mode=mode)
    assert actual.dtype == features.dtype and actual.shape == expected64.shape
    actual = actual.cpu()
    if features.dtype == torch.float32:
        error = torch_fp32_error(features.cpu(), masks.cpu(), cpu_index, mode, expected64)
        assert_close_fp32(actual, expected64, error)
    else:
        magnitude = mask_pool_reference(
            features.cpu().double().abs(), masks.cpu(), cpu_index, mode=mode
        )
        fp32_sum_error = 16 * torch.finfo(torch.float32).eps * magnitude
        assert_close_ulps(actual, expected64.to(features.dtype), atol=fp32_sum_error)


def weighted_mean(weights: torch.Tensor, grid: torch.Tensor, mode: str = "area") -> torch.Tensor:
    """[N, K] weights, [K, C] features -> [N, C]: sum(w * f) / sum(w) in fp64, zeros where a
    mask has no weight (as mask_pool_reference; bilinear and binary modes can miss a one-pixel
    mask); binary mode divides by count + 1e-8, as Osprey does."""
    total = weights.sum(1, keepdim=True)
    if mode == "binary":
        return (weights @ grid) / (total + BINARY_EPSILON)
    return torch.where(total > 0, (weights @ grid) / total, 0.0)


def as_mask_dtype(binary: torch.Tensor, dtype: torch.dtype, generator) -> torch.Tensor:
    """Binary masks in `dtype`: uint8 uses 255 for inside (nonzero counts, not == 1); float
    masks get coverages in [0, 1] inside and 0 outside."""
    if dtype == torch.bool:
        return binary
    if dtype == torch.uint8:
        return binary.to(torch.uint8) * 255
    coverage = torch.rand(binary.shape, generator=generator, dtype=torch.float64)
    return (coverage * binary).to(dtype)


def region_masks(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[count, height, width] bool: ellipses and boxes of many sizes (as regions of an image
    are), plus one full mask and one single pixel."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(count, height, width, dtype=torch.bool)
    ys = torch.arange(height, dtype=torch.float64)[:, None]
    xs = torch.arange(width, dtype=torch.float64)[None, :]
    for n in range(count):
        cy, cx = (
            torch.rand(2, generator=generator, dtype=torch.float64) * torch.tensor([height, width])
        ).tolist()
        ry, rx = (0.03 + 0.4 * torch.rand(2, generator=generator, dtype=torch.float64)).tolist()
        if n % 3 == 1:  # a box
            masks[n] = ((ys - cy).abs() <= ry * height) & ((xs - cx).abs() <= rx * width)
        else:
            masks[n] = ((ys - cy) / (ry * height)) ** 2 + ((xs - cx) / (rx * width)) ** 2 <= 1
    if count >= 2:
        masks[-1] = True
        masks[-2] = False
        masks[-2, height // 3, width // 5] = True
    return masks


def random_features(batch, height, width, channels, dtype, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, height, width, channels, generator=generator).to(dtype)


def level_features(batch, levels, dtype, seed=0) -> list[torch.Tensor]:
    """One random [B, H, W, C] map per (H, W, C) of `levels`."""
    return [
        random_features(batch, height, width, channels, dtype, seed=seed + k)
        for k, (height, width, channels) in enumerate(levels)
    ]


def fragile_lines(cells: int, pixels: int) -> torch.Tensor:
    """[cells] bool: the output indices along an axis where a float computation of the bilinear
    source coordinate (torch's, in fp32 or fp64, fused or not) may disagree with the exact one
    about which pixels carry weight: the exact coordinate (pixels (2i + 1) - cells) / (2 cells)
    is an integer or lies within 2^-20 * pixels of one (far more than fp32 rounding of a
    coordinate below `pixels`; torch's CPU kernel floors even fp64 coordinates in fp32)."""
    i = torch.arange(cells, dtype=torch.int64)
    numerator = pixels * (2 * i + 1) - cells
    denominator = 2 * cells
    remainder = numerator % denominator  # in [0, denominator)
    distance = torch.minimum(remainder, denominator - remainder).double() / denominator
    near = distance <= 2**-20 * pixels
    return near & (numerator.double() / denominator >= -(2**-20) * pixels)  # below 0: clamped
