"""Osprey's MaskExtractor, in the runtime (runtime/families/osprey.py) and in the reference
model (model/osprey.py), against a transcription of Osprey's formulas written here, loop by
loop in float64 (osprey/model/layer.py: MaskPooling and MaskExtractor.forward)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rgpt_rt.bundle import verify_bundle
from rgpt_rt.runtime.families import region_family
from rgpt_rt.runtime.vision import select_vision_backend
from rgpt_rt.safetensors_io import read_tensors

# the narrow Osprey bundle these use takes ~10 s to build on 2 cores
pytestmark = pytest.mark.slow


def resize_bilinear(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """F.interpolate(mode="bilinear", align_corners=False), written out: output cell i samples
    the input at (i + 0.5) * in / out - 0.5, clamped at 0, between its two neighbours."""

    def taps(out: int, size: int):
        for i in range(out):
            x = max((i + 0.5) * size / out - 0.5, 0.0)
            lo = min(math.floor(x), size - 1)
            hi = min(lo + 1, size - 1)
            yield lo, hi, x - lo

    out = np.zeros((rows, cols))
    for i, (r0, r1, fr) in enumerate(taps(rows, mask.shape[0])):
        for j, (c0, c1, fc) in enumerate(taps(cols, mask.shape[1])):
            top = mask[r0, c0] * (1 - fc) + mask[r0, c1] * fc
            bottom = mask[r1, c0] * (1 - fc) + mask[r1, c1] * fc
            out[i, j] = top * (1 - fr) + bottom * fr
    return out


def osprey_formulas(levels, mask: np.ndarray, w: dict, mask_size: int):
    """One mask's (<mask>, <pos>) embeddings as Osprey computes them, in float64."""
    total = 0.0
    for k, level in enumerate(levels):  # [H, W, C]
        rows, cols, _ = level.shape
        same = mask.shape == (rows, cols)
        selected = (mask if same else resize_bilinear(mask, rows, cols)) > 0
        pooled = level[selected].sum(axis=0) / (selected.sum() + 1e-8)
        total = total + pooled @ w[f"res{k + 2}.weight_t"] + w[f"res{k + 2}.bias"]
    mask_embed = total @ w["feat_linear.weight_t"] + w["feat_linear.bias"]
    x = resize_bilinear(mask, mask_size, mask_size).reshape(-1)
    for i in range(3):
        x = x @ w[f"mask_linear.layers.{i}.weight_t"] + w[f"mask_linear.layers.{i}.bias"]
        if i < 2:
            x = np.maximum(x, 0)
    return mask_embed, x


def masks_of(height: int, width: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    blob = rng.random((height, width)) > 0.7
    box = np.zeros((height, width), bool)
    box[height // 5 : height // 2, width // 3 : width - 3] = True
    line = np.zeros((height, width), bool)
    line[:, width // 2] = True  # one pixel wide: gone at coarse levels, never empty at res2
    dot = np.zeros((height, width), bool)
    dot[height - 1, 0] = True  # one pixel in a corner: may select no cell at some levels
    return [box, blob, line, dot]


@pytest.mark.parametrize("size", [(37, 53), (512, 512), (700, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_runtime_and_reference_follow_ospreys_formulas(osprey_bundle, reference, size):
    manifest = verify_bundle(osprey_bundle)
    family = region_family(manifest.config)
    vision = select_vision_backend(osprey_bundle, manifest, torch.device("cpu"), prefer="torch")
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    frame = family.prepare_image(image, max_side=2048)
    _, levels = vision(frame.pixel_values)
    masks = masks_of(*size)
    prepared = family.prepare_masks(masks, frame)
    stored = read_tensors(osprey_bundle / "connector.safetensors", "cpu")
    weights = {f"connector.{k}": v.float() for k, v in stored.items()}
    runtime = family.encode(levels, prepared, weights)  # [N, 2, D]
    with torch.no_grad():
        nchw = [level.permute(0, 3, 1, 2) for level in levels]
        ref = reference.encode_regions(nchw, prepared.float())
    w64 = {k.removeprefix("mask_extractor."): v.double().numpy() for k, v in stored.items()}
    levels64 = [level[0].double().numpy() for level in levels]
    mask_size = manifest.config.mask_extractor.mask_size
    for n, mask in enumerate(masks):
        expected = np.stack(osprey_formulas(levels64, mask.astype(np.float64), w64, mask_size))
        scale = np.abs(expected).max()
        # fp32 against float64 over sums of at most 128*128 cells: 1e-5 of the scale is ~100x
        # the float32 rounding of such sums
        assert np.abs(runtime[n].double().numpy() - expected).max() <= 1e-5 * scale, n
        assert np.abs(ref[n].double().numpy() - expected).max() <= 1e-5 * scale, n
