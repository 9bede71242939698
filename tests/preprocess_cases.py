"""The images and sizes of the device-preprocessing tests (tests/runtime/test_preprocess_device.py
on the CPU, tests/gpu/test_preprocess_cuda.py on CUDA)."""

import numpy as np


def natural_image(height, width, seed=0):
    """Gradients, a hard-edged block and noise: smooth areas, edges and texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1)
    image[height // 4 : height // 2, width // 4 : width // 2] = [250, 10, 30]
    return np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)


SIZES = {  # id: (image H, W, preset): the tower's input is 336 (rgpt-7b) or 96 (tiny)
    "640x480-to-336": (480, 640, "rgpt-7b"),
    "portrait-300x500-to-336": (500, 300, "rgpt-7b"),
    "upscale-113x203-to-336": (113, 203, "rgpt-7b"),
    "tiny-192-to-96": (192, 192, "tiny"),
    "tiny-odd-131x77-to-96": (77, 131, "tiny"),
}
