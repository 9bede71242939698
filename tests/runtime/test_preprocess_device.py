"""Preprocessing in torch ops (rgpt_rt.inputs.preprocess_pixels, what a Session runs on its device)
against the PIL path the reference uses (rgpt_rt.inputs.preprocess_image), on CPU tensors; the
masks' geometry; the image cache key.

Tolerance, justified: PIL resizes 8-bit images in two passes (widths, then heights) rounded to
uint8, with 22-bit fixed-point weights; torch computes the same antialiased bicubic kernel in
float. The "float" method (two torch passes rounded to uint8 between them, what a GPU runs) and
the "uint8" method (torch's CPU uint8 kernel, taken for downscales on the CPU) both land within 1
level of PIL's uint8 image: max |Δ| ≤ 1, on a small share of pixels (measured: ≤ 0.5% for "uint8",
≤ 0.05% for "float" on these images; bounds 2% and 0.5%). (The uint8 kernel upscaling is 2 levels
off in 0.15% of the pixels: upscales take "float".) After normalisation that is at most
1 / (255 · std) per value. Where no resize happens (the image already at the tower's size) the two paths agree bit for
bit. Without rounding between the passes 16% of the pixels differ, by up to 7 levels: the bound
catches that mistake."""

import numpy as np
import pytest
import torch
from PIL import Image
from preprocess_cases import SIZES, natural_image

from rgpt_rt.config import RGPTConfig
from rgpt_rt.inputs import (
    pad_image,
    pad_mask,
    pad_masks,
    preprocess_image,
    preprocess_pixels,
    resize_square,
)
from rgpt_rt.runtime.cache import image_key
from rgpt_rt.runtime.preprocess import pixel_values, prepare_image, prepare_masks

METHODS = {"uint8": 0.02, "float": 0.005, None: 0.02}  # largest share of pixels 1 level off PIL's


@pytest.mark.parametrize("method", list(METHODS), ids=["uint8", "float", "default"])
@pytest.mark.parametrize("case", list(SIZES), ids=list(SIZES))
def test_resize_is_within_one_level_of_pil(case, method):
    height, width, preset = SIZES[case]
    size = RGPTConfig.from_preset(preset).vision.image_size
    if method == "uint8" and max(height, width) < size:
        pytest.skip("upscales take the float method")
    square = pad_image(natural_image(height, width), (0.5, 0.4, 0.3))
    pil = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC))
    ours = resize_square(torch.from_numpy(square).permute(2, 0, 1)[None], size, method)
    assert ours.dtype == torch.uint8 and ours.shape == (1, 3, size, size)
    delta = (ours[0].permute(1, 2, 0).numpy().astype(int) - pil.astype(int)).__abs__()
    assert delta.max() <= 1, f"max |Δ| {delta.max()} levels"
    assert (delta > 0).mean() <= METHODS[method], f"{(delta > 0).mean():.2%} of pixels differ"


@pytest.mark.parametrize("method", ["float", None], ids=["float", "default"])
@pytest.mark.parametrize("case", list(SIZES), ids=list(SIZES))
def test_preprocess_pixels_matches_the_pil_path(case, method):
    height, width, preset = SIZES[case]
    vision = RGPTConfig.from_preset(preset).vision
    image = natural_image(height, width, seed=1)
    expected = preprocess_image(image, vision)
    ours = preprocess_pixels(torch.from_numpy(image), vision, method)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape and ours.is_contiguous()
    bound = 1 / (255 * min(vision.image_std)) + 1e-6  # one level of the uint8 image
    assert (ours - expected).abs().max().item() <= bound


def test_no_resize_means_the_same_bits():
    # an image that pads to the tower's size is only padded and normalised: both paths agree
    vision = RGPTConfig.from_preset("tiny").vision
    for shape in ((96, 96), (96, 61), (40, 96)):
        image = natural_image(*shape, seed=2)
        assert torch.equal(
            preprocess_pixels(torch.from_numpy(image), vision), preprocess_image(image, vision)
        )


def test_bad_pixels_are_refused():
    vision = RGPTConfig.from_preset("tiny").vision
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        preprocess_pixels(torch.zeros(8, 8, 3), vision)
    with pytest.raises(ValueError, match="unknown"):
        resize_square(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4, "lanczos")


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (40, 40)])
def test_masks_get_the_images_padding(shape):
    masks = torch.rand(3, *shape) > 0.5
    padded = pad_masks(masks)
    assert torch.equal(padded, torch.from_numpy(np.stack([pad_mask(m) for m in masks.numpy()])))
    coverage = torch.rand(2, *shape)
    assert torch.equal(pad_masks(coverage)[1], torch.from_numpy(pad_mask(coverage[1].numpy())))


def test_prepare_image_and_masks_on_a_device():
    # the frame's pixel values and masks are made where asked (CPU here; CUDA: tests/gpu)
    vision = RGPTConfig.from_preset("tiny").vision
    image = natural_image(60, 90)
    frame = prepare_image(image, vision, values=False)
    assert frame.pixel_values is None and frame.pixels.shape == (60, 90, 3)
    values = pixel_values(frame, vision, "cpu")
    assert values.shape == (1, 3, 96, 96)
    assert torch.equal(values, prepare_image(image, vision).pixel_values)
    box = np.zeros((60, 90), dtype=bool)
    box[10:20, 30:50] = True
    masks = prepare_masks([box, (0, 0, 5, 5)], frame, "cpu")
    assert masks.shape == (2, 90, 90) and masks.dtype == torch.bool
    assert torch.equal(masks[0], torch.from_numpy(pad_mask(box)))


def test_a_downscaled_frame_keeps_float_coverage():
    vision = RGPTConfig.from_preset("tiny").vision
    image = natural_image(40, 80)
    frame = prepare_image(image, vision, max_side=40)  # downscaled to 20 × 40
    assert frame.scaled and frame.pixels.shape == (20, 40, 3)
    masks = prepare_masks([(0, 0, 3, 3)], frame)  # a box of 3 × 3 pixels: 0.75 × 0.75 at half size
    assert masks.dtype == torch.float32 and masks.shape == (1, 40, 40)
    assert masks.sum().item() == pytest.approx(9 / 4)


def test_the_sampled_key_sees_any_pixel_change():
    image = natural_image(64, 96)
    key = image_key(image)
    assert key == image_key(image.copy()) and key != image_key(image, "exact")
    for y, x in ((0, 0), (8, 16), (3, 5), (63, 95)):  # on the sampled grid and off it
        changed = image.copy()
        changed[y, x, 1] ^= 1
        assert image_key(changed) != key
        assert image_key(changed, "exact") != image_key(image, "exact")
    # the same bytes in another shape are another image
    assert image_key(image.reshape(96, 64, 3)) != key


def test_the_key_kind_comes_from_the_environment(monkeypatch):
    image = natural_image(16, 16)
    monkeypatch.setenv("RGPT_RT_IMAGE_KEY", "exact")
    assert image_key(image) == image_key(image, "exact")
    monkeypatch.setenv("RGPT_RT_IMAGE_KEY", "sha1")
    with pytest.raises(ValueError, match="unknown"):
        image_key(image)
