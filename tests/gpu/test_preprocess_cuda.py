"""Preprocessing on the GPU (rgpt_rt.inputs.preprocess_pixels on CUDA tensors: what a CUDA Session
runs) against the PIL path the reference uses, and the masks' geometry on the device.

Tolerance as on the CPU (tests/runtime/test_preprocess_device.py, which justifies it): the resized
uint8 image within 1 level of PIL's, in at most 0.5% of the pixels ("float" method: two passes
rounded between them); after normalisation at most 1 / (255 · std) per value. Not yet run on a
GPU (written without one: issue 24)."""

import numpy as np
import pytest
import torch
from PIL import Image
from preprocess_cases import SIZES, natural_image

from rgpt_rt.config import RGPTConfig
from rgpt_rt.inputs import pad_image, preprocess_image, preprocess_pixels, resize_square
from rgpt_rt.runtime.preprocess import pixel_values, prepare_image, prepare_masks

DEVICE = "cuda"


@pytest.mark.parametrize("case", list(SIZES), ids=list(SIZES))
def test_resize_on_the_gpu_is_within_one_level_of_pil(case):
    height, width, preset = SIZES[case]
    size = RGPTConfig.from_preset(preset).vision.image_size
    square = pad_image(natural_image(height, width), (0.5, 0.4, 0.3))
    pil = np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC))
    ours = resize_square(torch.from_numpy(square).to(DEVICE).permute(2, 0, 1)[None], size)
    assert ours.device.type == "cuda" and ours.dtype == torch.uint8
    delta = np.abs(ours[0].permute(1, 2, 0).cpu().numpy().astype(int) - pil.astype(int))
    assert delta.max() <= 1 and (delta > 0).mean() <= 0.005


@pytest.mark.parametrize("case", list(SIZES), ids=list(SIZES))
def test_pixel_values_on_the_gpu_match_the_pil_path(case):
    height, width, preset = SIZES[case]
    vision = RGPTConfig.from_preset(preset).vision
    image = natural_image(height, width, seed=3)
    frame = prepare_image(image, vision, values=False)
    values = pixel_values(frame, vision, DEVICE)
    assert values.device.type == "cuda" and values.shape == (
        1,
        3,
        vision.image_size,
        vision.image_size,
    )
    expected = preprocess_image(image, vision)[None]
    bound = 1 / (255 * min(vision.image_std)) + 1e-6
    assert (values.cpu() - expected).abs().max().item() <= bound
    direct = preprocess_pixels(torch.from_numpy(image).to(DEVICE), vision)
    assert torch.equal(direct, values[0])


def test_masks_are_padded_on_the_gpu():
    vision = RGPTConfig.from_preset("tiny").vision
    frame = prepare_image(natural_image(60, 90), vision, values=False)
    box = np.zeros((60, 90), dtype=bool)
    box[10:20, 30:50] = True
    masks = prepare_masks([box, (0, 0, 5, 5)], frame, DEVICE)
    assert masks.device.type == "cuda"
    assert torch.equal(masks.cpu(), prepare_masks([box, (0, 0, 5, 5)], frame))
