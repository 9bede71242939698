"""rgpt_rt.ops.mask_pool on the CPU (the C++ kernel) against mask_pool_reference, in every mode
(area, bilinear, binary). Several levels in one call: tests/test_mask_pool_levels.py.

Tolerances are derived in tests/mask_pool_cases.py (1 output ulp for fp16/bf16; 2x torch's
own fp32 error for fp32). The CUDA twin of this file is tests/gpu/test_mask_pool_cuda.py."""

from __future__ import annotations

import pytest
import torch
from mask_pool_cases import (
    FEATURE_DTYPES,
    MASK_DTYPES,
    MODES,
    SHAPES,
    as_mask_dtype,
    assert_close_ulps,
    check_against_reference,
    random_features,
    region_masks,
    weighted_mean,
)

from rgpt_rt import _C
from rgpt_rt.ops import mask_cell_weights, mask_pool, mask_pool_reference


def pool(features, masks, batch_index=None, *, mode="area"):
    return mask_pool(features, masks, batch_index, mode=mode)


@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_awkward_shapes_match_the_reference(shape, mode, dtype):
    batch, height, width, channels, count, mask_height, mask_width = shape
    features = random_features(batch, height, width, channels, dtype)
    masks = region_masks(count, mask_height, mask_width, seed=count)
    generator = torch.Generator().manual_seed(1)
    batch_index = torch.randint(0, batch, (count,), generator=generator) if batch > 1 else None
    check_against_reference(pool, features, masks, batch_index, mode)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_every_mask_dtype(mask_dtype, mode):
    generator = torch.Generator().manual_seed(2)
    features = random_features(2, 7, 13, 40, torch.float32)
    masks = as_mask_dtype(region_masks(5, 100, 63, seed=3), mask_dtype, generator)
    check_against_reference(pool, features, masks, torch.tensor([1, 0, 1, 1, 0]), mode)


def test_single_pixel_and_border_masks():
    features = random_features(1, 7, 13, 24, torch.float32)
    masks = torch.zeros(4, 57, 91, dtype=torch.bool)
    masks[0, 20, 33] = True  # one pixel, split by no cell edge...
    masks[1, 8, 7] = True  # ...and one that cell edges cut (8 * 7/57, 7 * 13/91 = 0.98, 1.0)
    masks[2, [0, -1], :] = True  # a frame touching all four borders
    masks[2, :, [0, -1]] = True
    masks[3, -1, -1] = True  # the last pixel: the far corner cell
    for mode in MODES:
        check_against_reference(pool, features, masks, None, mode)


def test_weights_are_the_references_exactly_up_to_fp32_rounding():
    """With one-hot features (channel k = cell k), the pooled vector is the normalised weight
    map itself: w / sum(w), each stored once in fp32 and divided once (2 roundings)."""
    height, width = 7, 13
    features = torch.eye(height * width, dtype=torch.float32).reshape(1, height, width, -1)
    masks = region_masks(6, 1000, 333, seed=5)
    for mode in MODES:
        weights = mask_cell_weights(masks, height, width, mode).flatten(1)
        expected = weighted_mean(weights, torch.eye(height * width, dtype=torch.float64), mode)
        actual = mask_pool(features, masks, mode=mode).double()
        torch.testing.assert_close(actual, expected, rtol=2 * 2**-24, atol=0)


@pytest.mark.parametrize(
    ("height", "width", "mask_height", "mask_width"),
    [(7, 13, 100, 33), (6, 5, 2, 2), (32, 32, 512, 512), (16, 16, 1024, 1024), (9, 11, 9, 11)],
    ids=["fragile-column", "upsampled", "osprey-32-from-512", "osprey-16-from-1024", "same-size"],
)
def test_binary_mode_selects_exactly_the_references_cells(height, width, mask_height, mask_width):
    """Binary weights are 0 or 1, so with one-hot features the pooled vector is exactly
    fp32(1 / count) on the selected cells and 0 elsewhere: any cell the kernel selects
    differently from the reference shows. "fragile-column" holds a cell whose bilinear
    source coordinate torch's fp32 arithmetic misses (tests/test_mask_pool_reference.py)."""
    cells = height * width
    features = torch.eye(cells, dtype=torch.float32).reshape(1, height, width, cells)
    masks = region_masks(5, mask_height, mask_width, seed=cells)
    weights = mask_cell_weights(masks, height, width, "binary").flatten(1)  # [N, cells]
    expected = (weights / weights.sum(1, keepdim=True).clamp(min=1)).float()
    assert torch.equal(mask_pool(features, masks, mode="binary"), expected)


def test_binary_mode_counts_positive_pixels_of_signed_float_masks():
    generator = torch.Generator().manual_seed(4)
    features = random_features(2, 7, 13, 40, torch.float32)
    masks = torch.randn(5, 100, 63, generator=generator)  # half the pixels negative
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        check_against_reference(
            pool, features, masks.to(dtype), torch.tensor([1, 0, 1, 1, 0]), "binary"
        )


def test_empty_masks_give_zeros():
    features = random_features(2, 6, 6, 8, torch.float16)
    masks = torch.zeros(3, 30, 30, dtype=torch.bool)
    masks[1, 4:9, 20:25] = True
    for mode in MODES:
        pooled = mask_pool(features, masks, torch.tensor([0, 1, 1]), mode=mode)
        assert torch.equal(pooled[0], torch.zeros(8, dtype=torch.float16))
        assert torch.equal(pooled[2], torch.zeros(8, dtype=torch.float16))
        assert pooled[1].abs().sum() > 0


def test_no_masks_give_an_empty_result():
    features = random_features(1, 6, 6, 8, torch.bfloat16)
    pooled = mask_pool(features, torch.zeros(0, 30, 30, dtype=torch.bool))
    assert pooled.shape == (0, 8) and pooled.dtype == torch.bfloat16


def test_zero_channels():
    features = torch.zeros(1, 4, 4, 0)
    assert mask_pool(features, torch.ones(2, 8, 8, dtype=torch.bool)).shape == (2, 0)


def test_views_pool_like_contiguous_tensors():
    features = random_features(1, 16, 12, 64, torch.float32).transpose(1, 2)  # [1, 12, 16, 64]
    masks = region_masks(3, 90, 80, seed=6).transpose(1, 2)[:, ::2]  # strided
    assert not features.is_contiguous() and not masks.is_contiguous()
    assert torch.equal(pool(features, masks), pool(features.contiguous(), masks.contiguous()))


def test_every_fp16_and_bf16_value_survives_a_one_pixel_mean():
    """A one-pixel mask over a one-cell grid returns the features: every fp16 and bf16 bit
    pattern must convert to fp32 and back exactly (nan stays nan; -0 sums to +0)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    for dtype in (torch.float16, torch.bfloat16):
        values = bits.view(dtype)
        out = mask_pool(values.reshape(1, 1, 1, -1), mask)[0]
        nan = values.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out[~nan], values[~nan])  # == compares -0 and +0 as equal


def test_results_do_not_depend_on_the_thread_count():
    # big enough that every phase uses several threads (one per MiB it touches): 5 MB of
    # masks, ~18 MB of features
    features = random_features(2, 96, 96, 256, torch.float32)
    masks = region_masks(20, 512, 512, seed=7)
    batch_index = torch.arange(20) % 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mask_pool(features, masks, batch_index)
        torch.set_num_threads(max(2, threads))
        many = mask_pool(features, masks, batch_index)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("mode", MODES)
def test_sparse_and_dense_quads_add_alike(mode):
    # Masks pool in groups of up to 16, over the cells any of them weighs, in quads of 4: a
    # quad whose masks weigh the same cells runs 4-mask tiles, one of masks that overlap little
    # runs each mask over its own cells. Both must add in the same order. With a full mask in
    # each group (so the cells listed are every cell), a mask's row is the same bits in a
    # sparse quad (with other regions) and in a dense one (4 copies of itself).
    features = random_features(1, 40, 40, 160, torch.float32, seed=3)
    regions = region_masks(4, 320, 320, seed=4)
    full = torch.ones_like(regions[:1])
    sparse = pool(features, torch.cat([regions, full]), mode=mode)
    for n in range(4):
        dense = pool(features, torch.cat([regions[n : n + 1].expand(4, -1, -1), full]), mode=mode)
        assert torch.equal(sparse[n], dense[0]), n


# ---- real shapes: a 96x96x1024 fp16 map (ViT-L/14-336 refined 4x), 16 region masks --------


@pytest.fixture(scope="module")
def real_map():
    return random_features(1, 96, 96, 1024, torch.float16, seed=8)


@pytest.mark.parametrize("side", [1024, 336])
def test_real_shapes(real_map, side):
    """Expected values come from the reference's own weights (mask_cell_weights) and one
    fp64 matmul: the reference's arithmetic without its 16 fp64 copies of the map."""
    masks = region_masks(16, side, side, seed=side)
    grid = real_map[0].double().flatten(0, 1)  # [H*W, C]
    for mode in MODES:
        weights = mask_cell_weights(masks, 96, 96, mode).flatten(1)  # [N, H*W]
        expected = weighted_mean(weights, grid, mode)
        assert_close_ulps(mask_pool(real_map, masks, mode=mode), expected.to(torch.float16))


def test_the_real_shape_expectation_is_the_reference():
    features = random_features(1, 12, 12, 16, torch.float64)
    masks = region_masks(4, 40, 40)
    for mode in MODES:
        weights = mask_cell_weights(masks, 12, 12, mode).flatten(1)
        shortcut = weighted_mean(weights, features[0].flatten(0, 1), mode)
        reference = mask_pool_reference(features, masks, mode=mode)
        torch.testing.assert_close(shortcut, reference, rtol=0, atol=1e-12)  # fp64 reordering


# ---- torch.library: opcheck and torch.compile -------------------------------------------


@pytest.mark.parametrize(
    "batch_index", [None, torch.tensor([1, 0, 1])], ids=["no-batch-index", "batch-index"]
)
def test_opcheck(batch_index):
    batch = 1 if batch_index is None else 2
    features = random_features(batch, 6, 7, 9, torch.float32)
    masks = region_masks(3, 20, 30)
    for mode in MODES:
        torch.library.opcheck(
            torch.ops.rgpt_rt.mask_pool.default, (features, masks, batch_index, mode)
        )


def test_torch_compile_sees_through_the_op():
    def region_tokens(features, masks, batch_index):
        pooled = mask_pool(features * 2, masks, batch_index, mode="bilinear")
        return torch.nn.functional.gelu(pooled) + 1

    compiled = torch.compile(region_tokens, fullgraph=True, backend="aot_eager")
    features = random_features(2, 8, 8, 32, torch.float32)
    masks = region_masks(5, 33, 47)
    batch_index = torch.tensor([0, 1, 1, 0, 1])
    assert torch.equal(
        compiled(features, masks, batch_index), region_tokens(features, masks, batch_index)
    )


# ---- bad input: ValueError naming the argument, from Python and from the C++ host -------

BAD = {
    "features-rank": (torch.zeros(4, 4, 3), torch.ones(1, 4, 4), None, "area", "features must be"),
    "masks-rank": (torch.zeros(1, 4, 4, 3), torch.ones(4, 4), None, "area", "masks must be"),
    "no-batch-index": (torch.zeros(2, 4, 4, 3), torch.ones(1, 4, 4), None, "area", "batch_index"),
    "index-too-high": (
        torch.zeros(2, 4, 4, 3),
        torch.ones(1, 4, 4),
        torch.tensor([2]),
        "area",
        r"batch_index values must be in \[0, 2\)",
    ),
    "index-negative": (
        torch.zeros(2, 4, 4, 3),
        torch.ones(2, 4, 4),
        torch.tensor([0, -1]),
        "area",
        "batch_index values",
    ),
    "index-count": (
        torch.zeros(2, 4, 4, 3),
        torch.ones(2, 4, 4),
        torch.tensor([0]),
        "area",
        "1 entries but there are 2 masks",
    ),
    "index-float": (
        torch.zeros(2, 4, 4, 3),
        torch.ones(1, 4, 4),
        torch.tensor([0.0]),
        "area",
        "batch_index dtype",
    ),
    "nan-mask": (
        torch.zeros(1, 4, 4, 3),
        torch.full((1, 4, 4), float("nan")),
        None,
        "area",
        "non-finite",
    ),
    "inf-mask": (
        torch.zeros(1, 4, 4, 3),
        torch.full((1, 4, 4), float("inf")),
        None,
        "bilinear",
        "non-finite",
    ),
    "float64-features": (
        torch.zeros(1, 4, 4, 3, dtype=torch.float64),
        torch.ones(1, 4, 4),
        None,
        "area",
        "features dtype",
    ),
    "int16-mask": (
        torch.zeros(1, 4, 4, 3),
        torch.ones(1, 4, 4, dtype=torch.int16),
        None,
        "area",
        "masks dtype",
    ),
    "mode": (
        torch.zeros(1, 4, 4, 3),
        torch.ones(1, 4, 4),
        None,
        "nearest",
        "mode 'nearest' is unknown",
    ),
    "empty-grid": (
        torch.zeros(1, 0, 4, 3),
        torch.ones(1, 4, 4),
        None,
        "area",
        "features grid is empty",
    ),
    "empty-mask-size": (
        torch.zeros(1, 4, 4, 3),
        torch.ones(1, 0, 4),
        None,
        "area",
        "masks have an empty size",
    ),
    "masks-on-meta": (
        torch.zeros(1, 4, 4, 3),
        torch.ones(1, 4, 4, device="meta"),
        None,
        "area",
        "masks are on meta",
    ),
}


@pytest.mark.parametrize(
    ("features", "masks", "batch_index", "mode", "message"), BAD.values(), ids=BAD.keys()
)
def test_bad_input_names_the_argument(features, masks, batch_index, mode, message):
    with pytest.raises(ValueError, match=message):
        mask_pool(features, masks, batch_index, mode=mode)


def binding_args(features, masks, batch_index, out, workspace):
    return dict(
        features=features.data_ptr(),
        features_dtype=str(features.dtype).removeprefix("torch."),
        features_shape=list(features.shape),
        masks=masks.data_ptr(),
        masks_dtype=str(masks.dtype).removeprefix("torch."),
        masks_shape=list(masks.shape),
        batch_index=batch_index.data_ptr(),
        mode="area",
        out=out.data_ptr(),
        workspace=workspace.data_ptr(),
        workspace_bytes=workspace.numel(),
        device="cpu",
        device_index=0,
        stream=0,
        num_threads=1,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(workspace_bytes=16), "workspace holds 16 bytes"),
        (dict(workspace=0), "workspace holds|null pointer"),
        (dict(batch_index=0), "batch_index is a null pointer"),
        (dict(features_dtype="int8"), "features dtype int8"),
        (dict(masks_dtype="complex64"), "masks dtype complex64"),
        (dict(features_shape=[1, 8, 8]), r"features must be \[B, H, W, C\]"),
        (dict(masks_shape=[3, 0, 5]), "masks shape"),
        (dict(mode="cubic"), "mode 'cubic'"),
        (dict(device="tpu"), "device 'tpu'"),
        (dict(num_threads=0), "num_threads"),
        (dict(masks_shape=[3, 2**30, 5]), "masks shape"),
        (dict(features_shape=[2**20, 2**20, 2**20, 2]), "features is too large"),
    ],
    ids=[
        "small-workspace",
        "null-workspace",
        "null-batch-index",
        "features-dtype",
        "masks-dtype",
        "features-rank",
        "empty-mask",
        "mode",
        "device",
        "threads",
        "huge-mask",
        "huge-features",
    ],
)
def test_the_binding_refuses_what_a_kernel_cannot_take(change, message):
    features = torch.zeros(1, 8, 8, 4)
    masks = torch.ones(3, 16, 16, dtype=torch.bool)
    batch_index = torch.zeros(3, dtype=torch.int64)
    out = torch.empty(3, 4)
    workspace = torch.empty(1 << 20, dtype=torch.uint8)
    args = binding_args(features, masks, batch_index, out, workspace) | change
    with pytest.raises(ValueError, match=message):
        _C.mask_pool(**args)


def test_the_binding_checks_batch_index_values_on_the_cpu():
    features = torch.zeros(2, 8, 8, 4)
    masks = torch.ones(3, 16, 16, dtype=torch.bool)
    batch_index = torch.tensor([0, 1, 5])
    workspace = torch.empty(1 << 20, dtype=torch.uint8)
    args = binding_args(features, masks, batch_index, torch.empty(3, 4), workspace)
    with pytest.raises(ValueError, match=r"batch_index\[2\] = 5 is outside \[0, 2\)"):
        _C.mask_pool(**args)
