"""mask_pool_reference against cases computed by hand, and against an independent brute force.

Area weights of binary masks are exact in float64 (integer overlaps over a common
denominator), so hand-computed cases compare at 1e-12."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rgpt_rt.ops import mask_cell_weights, mask_pool_reference

EXACT = dict(rtol=0, atol=1e-12)  # float64 arithmetic on exactly representable weights


def grid(height, width, channels=3, batch=1):
    return torch.randn(batch, height, width, channels, dtype=torch.float64)


def test_a_mask_smaller_than_one_cell_still_gets_its_cell():
    features = grid(2, 2)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True  # one pixel, a quarter of cell (0, 0)
    for mode in ("area", "bilinear"):
        pooled = mask_pool_reference(features, mask, mode=mode)
        torch.testing.assert_close(pooled[0], features[0, 0, 0], **EXACT)


def test_a_pixel_cut_by_a_cell_edge_is_shared_by_its_fraction():
    features = grid(2, 1)
    mask = torch.tensor([[[0], [1], [0]]], dtype=torch.bool)  # Hm = 3 over H = 2: edge at 1.5
    pooled = mask_pool_reference(features, mask)
    torch.testing.assert_close(
        pooled[0], 0.5 * features[0, 0, 0] + 0.5 * features[0, 1, 0], **EXACT
    )
    mask = torch.tensor([[[1], [1], [0]]], dtype=torch.bool)  # weights 1.5 and 0.5
    pooled = mask_pool_reference(features, mask)
    torch.testing.assert_close(
        pooled[0], (1.5 * features[0, 0, 0] + 0.5 * features[0, 1, 0]) / 2, **EXACT
    )


def test_mask_size_not_a_multiple_of_the_grid():
    features = grid(3, 1)
    mask = torch.zeros(1, 7, 1, dtype=torch.uint8)
    mask[0, 2:4] = 255  # pixels [2, 4); cells [0, 7/3), [7/3, 14/3), [14/3, 7)
    pooled = mask_pool_reference(features, mask)
    expected = (1 / 3 * features[0, 0, 0] + 5 / 3 * features[0, 1, 0]) / 2
    torch.testing.assert_close(pooled[0], expected, **EXACT)


def test_float_masks_weight_by_coverage():
    features = grid(2, 2)
    mask = torch.tensor(
        [[[0.25, 0.0], [1.0, 0.5]]], dtype=torch.float32
    )  # Hm = H: weights = values
    pooled = mask_pool_reference(features, mask)
    w = mask[0].double()
    expected = (w[..., None] * features[0]).sum(dim=(0, 1)) / w.sum()
    torch.testing.assert_close(pooled[0], expected, **EXACT)


def test_an_empty_mask_gives_zeros():
    features = grid(4, 4)
    masks = torch.zeros(2, 9, 9, dtype=torch.bool)
    masks[1, 3, 3] = True
    for mode in ("area", "bilinear"):
        pooled = mask_pool_reference(features, masks, mode=mode)
        assert torch.equal(pooled[0], torch.zeros(3, dtype=torch.float64))
        assert pooled[1].abs().sum() > 0


def brute_force_area_weights(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Split every pixel into height x width sub-pixels: cell (i, j) then owns exactly the
    block [i*Hm, (i+1)*Hm) x [j*Wm, (j+1)*Wm) of the fine grid. Count and scale back."""
    hm, wm = mask.shape
    fine = np.repeat(np.repeat(mask.astype(np.float64), height, axis=0), width, axis=1)
    return fine.reshape(height, hm, width, wm).sum(axis=(1, 3)) / (height * width)


@pytest.mark.parametrize(
    ("height", "width", "hm", "wm"), [(7, 13, 100, 33), (4, 4, 4, 4), (5, 3, 17, 29), (1, 1, 9, 2)]
)
def test_area_weights_match_a_brute_force_split(height, width, hm, wm):
    rng = np.random.default_rng(height * 100 + wm)
    mask = rng.random((hm, wm)) < 0.3
    weights = mask_cell_weights(torch.from_numpy(mask)[None], height, width)[0].numpy()
    np.testing.assert_allclose(
        weights, brute_force_area_weights(mask, height, width), rtol=0, atol=1e-9
    )
    assert abs(weights.sum() - mask.sum()) < 1e-9  # area is conserved: nothing vanishes


def test_bilinear_mode_is_interpolate_then_normalise():
    features = grid(6, 5)
    mask = torch.rand(1, 23, 17) > 0.5
    w = F.interpolate(mask[None].double(), size=(6, 5), mode="bilinear", align_corners=False)[0, 0]
    expected = (w[..., None] * features[0]).sum(dim=(0, 1)) / w.sum()
    torch.testing.assert_close(
        mask_pool_reference(features, mask, mode="bilinear")[0], expected, **EXACT
    )


def test_batch_index_picks_each_masks_image():
    features = grid(3, 3, batch=3)
    masks = torch.zeros(3, 3, 3, dtype=torch.bool)
    masks[:, 1, 2] = True
    pooled = mask_pool_reference(features, masks, torch.tensor([2, 0, 2]))
    torch.testing.assert_close(pooled, features[[2, 0, 2], 1, 2], **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_output_keeps_the_features_dtype(dtype):
    features = grid(4, 4).to(dtype)
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    pooled = mask_pool_reference(features, mask)
    assert pooled.dtype == dtype
    # a full mask is the plain mean; fp32 accumulation error is far below one ulp of the output
    torch.testing.assert_close(
        pooled[0], features[0].double().mean(dim=(0, 1)).to(dtype), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("features", "masks", "batch_index", "mode", "message"),
    [
        (torch.zeros(4, 4, 3), torch.ones(1, 4, 4), None, "area", "features must be a"),
        (torch.zeros(1, 4, 4, 3), torch.ones(4, 4), None, "area", "masks must be a"),
        (torch.zeros(2, 4, 4, 3), torch.ones(1, 4, 4), None, "area", "batch_index"),
        (
            torch.zeros(2, 4, 4, 3),
            torch.ones(1, 4, 4),
            torch.tensor([2]),
            "area",
            r"batch_index values must be in \[0, 2\)",
        ),
        (
            torch.zeros(2, 4, 4, 3),
            torch.ones(2, 4, 4),
            torch.tensor([0]),
            "area",
            "1 entries but there are 2 masks",
        ),
        (torch.zeros(1, 4, 4, 3), torch.full((1, 4, 4), float("nan")), None, "area", "non-finite"),
        (
            torch.zeros(1, 4, 4, 3, dtype=torch.int32),
            torch.ones(1, 4, 4),
            None,
            "area",
            "features dtype",
        ),
        (
            torch.zeros(1, 4, 4, 3),
            torch.ones(1, 4, 4, dtype=torch.int16),
            None,
            "area",
            "masks dtype",
        ),
        (
            torch.zeros(1, 4, 4, 3),
            torch.ones(1, 4, 4),
            None,
            "nearest",
            "mode 'nearest' is unknown",
        ),
    ],
    ids=[
        "features-rank",
        "masks-rank",
        "no-batch-index",
        "index-range",
        "index-count",
        "nan-mask",
        "int-features",
        "int16-mask",
        "mode",
    ],
)
def test_bad_input_names_the_argument(features, masks, batch_index, mode, message):
    with pytest.raises(ValueError, match=message):
        mask_pool_reference(features, masks, batch_index, mode=mode)
