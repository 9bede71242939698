"""rgpt_rt.ops.mask_pool_levels on the CPU: 1..4 feature levels of the same images pooled in one
call (Osprey's four ConvNeXt levels, mode="binary"), against mask_pool_reference per level and
against one mask_pool call per level.

Tolerances: tests/mask_pool_cases.py. The CUDA twin: tests/gpu/test_mask_pool_cuda.py."""

from __future__ import annotations

import pytest
import torch
from mask_pool_cases import (
    FEATURE_DTYPES,
    LEVEL_SETS,
    MODES,
    OSPREY_LEVELS,
    assert_close_ulps,
    check_levels_against_reference,
    level_features,
    random_features,
    region_masks,
    weighted_mean,
)

from rgpt_rt import _C
from rgpt_rt.ops import mask_cell_weights, mask_pool
from rgpt_rt.ops.mask_pool import MAX_LEVELS, mask_pool_levels, mask_pool_levels_reference


def case(name: str, dtype: torch.dtype):
    """(levels, masks, batch_index) of LEVEL_SETS[name]."""
    batch, levels, count, mask_height, mask_width = LEVEL_SETS[name]
    features = level_features(batch, levels, dtype)
    masks = region_masks(count, mask_height, mask_width, seed=count)
    generator = torch.Generator().manual_seed(1)
    batch_index = torch.randint(0, batch, (count,), generator=generator) if batch > 1 else None
    return features, masks, batch_index


@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LEVEL_SETS)
def test_levels_match_the_reference(name, mode, dtype):
    features, masks, batch_index = case(name, dtype)
    check_levels_against_reference(mask_pool_levels, features, masks, batch_index, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LEVEL_SETS)
def test_one_call_equals_one_call_per_level(name, mode):
    """The same tasks run in one call as in several: the result is bit for bit the same."""
    features, masks, batch_index = case(name, torch.float16)
    together = mask_pool_levels(features, masks, batch_index, mode=mode)
    apart = torch.cat([mask_pool(f, masks, batch_index, mode=mode) for f in features], dim=1)
    assert torch.equal(together, apart)


def test_the_reference_is_the_single_level_reference_side_by_side():
    features, masks, batch_index = case("three-images-mixed-grids", torch.float64)
    pooled = mask_pool_levels_reference(features, masks, batch_index, mode="binary")
    assert pooled.shape == (21, 5 + 130 + 3)
    assert torch.equal(
        pooled[:, 5:135],
        mask_pool_levels_reference(features[1:2], masks, batch_index, mode="binary"),
    )


@pytest.mark.parametrize("side", [512, 1024])
def test_osprey_real_shapes(side):
    """Osprey's levels of a 512-px image (128x128x192, 64x64x384, 32x32x768, 16x16x1536, fp16)
    and 16 region masks. The expectation is the reference's own weights (mask_cell_weights)
    and one fp64 matmul per level: the reference's arithmetic without its 16 fp64 copies of
    every map."""
    features = level_features(1, OSPREY_LEVELS, torch.float16, seed=side)
    masks = region_masks(16, side, side, seed=side)
    pooled = mask_pool_levels(features, masks, mode="binary")
    column = 0
    for level in features:
        _, height, width, channels = level.shape
        weights = mask_cell_weights(masks, height, width, "binary").flatten(1)
        expected = weighted_mean(weights, level[0].double().flatten(0, 1), "binary")
        assert_close_ulps(pooled[:, column : column + channels], expected.half())
        column += channels
    assert column == pooled.shape[1] == 192 + 384 + 768 + 1536


def test_results_do_not_depend_on_the_thread_count():
    features = level_features(2, [(64, 64, 96), (32, 32, 192), (16, 16, 384)], torch.float32)
    masks = region_masks(20, 512, 512, seed=7)
    batch_index = torch.arange(20) % 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mask_pool_levels(features, masks, batch_index, mode="binary")
        torch.set_num_threads(max(2, threads))
        many = mask_pool_levels(features, masks, batch_index, mode="binary")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_no_masks_and_empty_masks():
    features = level_features(1, [(8, 8, 4), (4, 4, 8)], torch.bfloat16)
    assert mask_pool_levels(features, torch.zeros(0, 16, 16, dtype=torch.bool)).shape == (0, 12)
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[1, 3:9, 2:5] = True
    for mode in MODES:
        pooled = mask_pool_levels(features, masks, mode=mode)
        assert torch.equal(pooled[0], torch.zeros(12, dtype=torch.bfloat16))
        assert pooled[1].abs().sum() > 0


# ---- torch.library: opcheck and torch.compile -------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    features = level_features(2, [(6, 7, 9), (3, 4, 5)], torch.float32)
    masks = region_masks(3, 20, 30)
    for batch_index in (torch.tensor([1, 0, 1]),):
        torch.library.opcheck(
            torch.ops.rgpt_rt.mask_pool_levels.default, (features, masks, batch_index, mode)
        )


def test_torch_compile_sees_through_the_op():
    def region_tokens(features, masks, batch_index):
        pooled = mask_pool_levels([f * 2 for f in features], masks, batch_index, mode="binary")
        return torch.nn.functional.gelu(pooled) + 1

    compiled = torch.compile(region_tokens, fullgraph=True, backend="aot_eager")
    features = level_features(2, [(8, 8, 32), (4, 4, 16)], torch.float32)
    masks = region_masks(5, 33, 47)
    batch_index = torch.tensor([0, 1, 1, 0, 1])
    assert torch.equal(
        compiled(features, masks, batch_index), region_tokens(features, masks, batch_index)
    )


# ---- bad input: ValueError naming the argument -------------------------------------------

ONE = random_features(1, 4, 4, 3, torch.float32)
MASKS = torch.ones(1, 8, 8, dtype=torch.bool)
BAD = {
    "no-level": ([], "features must be a list of 1 to 4"),
    "five-levels": ([ONE] * (MAX_LEVELS + 1), "features must be a list of 1 to 4"),
    "a-tensor-not-a-list": (ONE, "features must be a list"),
    "dtypes-differ": ([ONE, ONE.half()], r"features\[1\] is torch.float16 on cpu"),
    "images-differ": ([ONE, torch.zeros(2, 4, 4, 3)], r"features\[1\] holds 2 images"),
    "a-level-of-rank-3": ([ONE, torch.zeros(4, 4, 3)], r"features\[1\] must be a \[B, H, W, C\]"),
}


@pytest.mark.parametrize(("features", "message"), BAD.values(), ids=BAD.keys())
def test_bad_input_names_the_argument(features, message):
    with pytest.raises(ValueError, match=message):
        mask_pool_levels(features, MASKS)
    with pytest.raises(ValueError, match=message):
        mask_pool_levels_reference(features, MASKS)


def binding_args(features, masks, out, workspace):
    return dict(
        features=[f.data_ptr() for f in features],
        features_dtype="float32",
        features_shapes=[list(f.shape) for f in features],
        masks=masks.data_ptr(),
        masks_dtype="bool",
        masks_shape=list(masks.shape),
        batch_index=torch.zeros(masks.shape[0], dtype=torch.int64).data_ptr(),
        mode="binary",
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
        (dict(features=[]), "0 feature pointers for 2 feature shapes"),
        (dict(features_shapes=[[1, 4, 4, 3]] * 5), "give 1 to 4 feature levels; got 5"),
        (dict(features_shapes=[]), "give 1 to 4 feature levels; got 0"),
        (dict(features_shapes=[[1, 4, 4, 3], [2, 4, 4, 3]]), r"features\[1\] holds 2 images"),
        (dict(features_shapes=[[1, 4, 4, 3], [1, 4, 3]]), r"features\[1\] must be \[B, H, W, C\]"),
        (dict(workspace_bytes=16), "workspace holds 16 bytes"),
        (dict(mode="nearest"), "mode 'nearest' is unknown; use 'area', 'bilinear' or 'binary'"),
    ],
    ids=["pointers", "five-levels", "no-level", "images", "rank", "workspace", "mode"],
)
def test_the_binding_refuses_what_a_kernel_cannot_take(change, message):
    features = [torch.zeros(1, 4, 4, 3), torch.zeros(1, 2, 2, 5)]
    masks = torch.ones(2, 16, 16, dtype=torch.bool)
    args = binding_args(features, masks, torch.empty(2, 8), torch.empty(1 << 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match=message):
        _C.mask_pool_levels(**(args | change))
