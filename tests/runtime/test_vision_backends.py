"""The runtime's vision backends compute what the reference model's encode_image computes."""

import pytest
import torch
from prefill_parity import as_the_bundle_stores

from rgpt_rt.bundle import verify_bundle
from rgpt_rt.model import RGPT
from rgpt_rt.runtime.vision import OnnxRuntimeVision, TorchVision, select_vision_backend


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return as_the_bundle_stores(RGPT.from_pretrained(tiny_checkpoint).eval())


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_backend_matches_the_reference(tiny_bundle, reference, backend):
    manifest = verify_bundle(tiny_bundle)
    vision = select_vision_backend(tiny_bundle, manifest, torch.device("cpu"), prefer=backend)
    assert isinstance(vision, {"onnxruntime": OnnxRuntimeVision, "torch": TorchVision}[backend])
    size = manifest.config.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference.encode_image(pixels)
    got = vision(pixels)
    for name, a, b in zip(("image_embeds", "hires"), got, expected):
        assert a.shape == b.shape, name
        # both fp32: differences are reordering of the same sums, a few ulps of the scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=name)


def test_cpu_prefers_onnxruntime_and_refuses_tensorrt(tiny_bundle):
    manifest = verify_bundle(tiny_bundle)
    assert (
        select_vision_backend(tiny_bundle, manifest, torch.device("cpu")).name == "onnxruntime-cpu"
    )
    with pytest.raises(ValueError, match="not available on cpu"):
        select_vision_backend(tiny_bundle, manifest, torch.device("cpu"), prefer="tensorrt")
