"""mask_pool_reference against cases computed by hand, against an independent brute force, and
(binary mode) against a transcription of Osprey's MaskPooling and torch's own interpolation.

Area weights of binary masks are exact in float64 (integer overlaps over a common
denominator), so hand-computed cases compare at 1e-12. Binary weights are exact 0/1."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mask_pool_cases import fragile_lines, region_masks

from rgpt_rt.ops import mask_cell_weights, mask_pool_reference
from rgpt_rt.ops.mask_pool import bilinear_taps

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
    for mode in ("area", "bilinear", "binary"):
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


# ---- binary mode: Osprey's pooling ----------------------------------------------------------


def osprey_mask_pooling(grid: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Osprey's MaskPooling written from its formula in this test (not through the project's
    code): grid [C, H, W], masks [N, Hm, Wm] -> [N, C] in the masks' dtype. A mask of another
    size than the grid is resized bilinearly (align_corners=False), then binarised by > 0;
    each mask's vector is sum over its cells / (count + 1e-8)."""
    height, width = grid.shape[1:]
    if tuple(masks.shape[1:]) != (height, width):
        masks = F.interpolate(
            masks[None], size=(height, width), mode="bilinear", align_corners=False
        )[0]
    inside = (masks > 0).to(masks.dtype).flatten(1)  # [N, H*W]
    count = inside.sum(dim=1, keepdim=True)
    return (inside @ grid.flatten(1).T.to(masks.dtype)) / (count + 1e-8)


@pytest.mark.parametrize("side", [512, 1024, 333])
def test_binary_mode_is_osprey_mask_pooling(side):
    """Osprey's four levels of a 512-px image (grids 128, 64, 32, 16; few channels here):
    the cells binary mode selects are exactly those of F.interpolate(masks.float()) > 0, the
    float32 computation Osprey runs, and the pooled vectors are Osprey's formula's."""
    masks = region_masks(4, side, side, seed=side)
    for cells in (128, 64, 32, 16):
        grid = torch.randn(3, cells, cells, dtype=torch.float64)
        weights = mask_cell_weights(masks, cells, cells, mode="binary")
        osprey = F.interpolate(
            masks[None].float(), size=(cells, cells), mode="bilinear", align_corners=False
        )[0]
        assert torch.equal(weights, (osprey > 0).double())
        pooled = mask_pool_reference(grid.permute(1, 2, 0)[None], masks, mode="binary")
        torch.testing.assert_close(pooled, osprey_mask_pooling(grid, masks.double()), **EXACT)


def test_binary_mode_by_hand():
    features = grid(1, 2)  # one row of 2 cells
    # 8 pixels onto 2 cells: source coordinates 1.5 and 5.5, taps {1, 2} and {5, 6}
    assert bilinear_taps(2, 8).nonzero().tolist() == [[0, 1], [0, 2], [1, 5], [1, 6]]
    mask = torch.zeros(1, 1, 8, dtype=torch.bool)
    mask[0, 0, 0] = True  # on no tap: the region vanishes, as in Osprey
    assert torch.equal(mask_pool_reference(features, mask, mode="binary"), torch.zeros(1, 3))
    mask[0, 0, 2] = True  # a tap of cell 0 only
    pooled = mask_pool_reference(features, mask, mode="binary")
    torch.testing.assert_close(pooled[0], features[0, 0, 0] / (1 + 1e-8), **EXACT)
    mask[0, 0, 5] = True  # and one of cell 1
    pooled = mask_pool_reference(features, mask, mode="binary")
    torch.testing.assert_close(pooled[0], features[0, 0].sum(0) / (2 + 1e-8), **EXACT)
    # upsampling 2 pixels onto 5 cells: coordinates 0 (clamped), 0.1, 0.5, 0.9, 1.3 (last pixel)
    assert bilinear_taps(5, 2).tolist() == [[1, 0], [1, 1], [1, 1], [1, 1], [0, 1]]


def test_binary_mode_divides_by_count_plus_epsilon():
    features = grid(6, 7)
    masks = region_masks(3, 30, 35, seed=2)
    weights = mask_cell_weights(masks, 6, 7, mode="binary")
    assert set(weights.unique().tolist()) <= {0.0, 1.0}
    count = weights.sum(dim=(1, 2))
    summed = torch.einsum("nij,ijc->nc", weights, features[0])
    torch.testing.assert_close(
        mask_pool_reference(features, masks, mode="binary"),
        summed / (count[:, None] + 1e-8),
        **EXACT,
    )


# (cells, pixels): Osprey's levels from 512-, 1024-, 640- and 480-px masks, then awkward sizes
TAP_SIZES = [(128, 512), (16, 1024), (128, 640), (64, 480), (32, 333), (96, 336), (7, 1000),
             (13, 33), (5, 3), (7, 2), (1, 17), (3, 1), (2100, 3000), (6, 2)]  # fmt: skip


@pytest.mark.parametrize(
    ("cells", "pixels"), TAP_SIZES, ids=[f"{c}-from-{p}" for c, p in TAP_SIZES]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_binary_taps_are_where_torch_puts_weight(cells, pixels, dtype):
    """The pixels F.interpolate weighs (nonzero) for each output index are bilinear_taps', on
    every line where a float coordinate cannot differ from the exact one (fragile_lines); for
    power-of-two cell counts (Osprey's levels) on every line, as bilinear_taps says."""
    basis = torch.eye(pixels, dtype=dtype)[:, None, :]  # [pixels, 1, pixels]: one pixel each
    weights = F.interpolate(basis, size=cells, mode="linear", align_corners=False)[:, 0].T
    taps = bilinear_taps(cells, pixels)  # [cells, pixels]
    differ = (weights != 0) != taps
    if cells & (cells - 1) == 0 and 2 * pixels * cells <= 2**24:
        assert not differ.any()
    assert not differ[~fragile_lines(cells, pixels)].any()


def test_a_fragile_line_takes_the_exact_taps():
    """13 cells over 33 pixels: cell 6's source coordinate is exactly 16, which fp32 does not
    hit (33/13 is not a binary fraction): the exact rule gives pixel 16 alone, where torch's
    fp32 kernel may add pixel 15 or 17 with a weight of ~1e-7, enough for > 0 to select it."""
    assert fragile_lines(13, 33).nonzero().flatten().tolist() == [6]
    assert bilinear_taps(13, 33)[6].nonzero().flatten().tolist() == [16]


def test_binary_mode_counts_positive_pixels_of_signed_masks():
    """Float masks are coverages in [0, 1]; a negative value counts as outside (it cannot
    cancel a positive neighbour, as it could inside F.interpolate)."""
    features = grid(2, 2)
    mask = torch.tensor([[[-1.0, 0.25], [0.0, -3.0]]])  # same size as the grid
    pooled = mask_pool_reference(features, mask, mode="binary")
    torch.testing.assert_close(pooled[0], features[0, 0, 1] / (1 + 1e-8), **EXACT)
