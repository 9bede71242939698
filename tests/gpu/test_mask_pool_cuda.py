"""rgpt_rt.ops.mask_pool and mask_pool_levels on CUDA (csrc/mask_pool/mask_pool_cuda.cu) against
mask_pool_reference, in every mode (area, bilinear, binary).

Same cases and tolerances as tests/test_mask_pool.py and tests/test_mask_pool_levels.py
(derived in tests/mask_pool_cases.py), plus what only a GPU has: CUDA-graph capture and
replay, streams, misaligned pointers, 4096x4096 masks, and binary mode against torch's own CUDA
interpolation (what Osprey runs). scripts/gpu_check.sh runs this file, and a small part of it
again under compute-sanitizer (the tests whose names hold "small")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mask_pool_cases import (
    FEATURE_DTYPES,
    LEVEL_SETS,
    MASK_DTYPES,
    MODES,
    OSPREY_LEVELS,
    SHAPES,
    as_mask_dtype,
    assert_close_ulps,
    check_against_reference,
    check_levels_against_reference,
    level_features,
    random_features,
    region_masks,
    weighted_mean,
)

from rgpt_rt.ops import mask_cell_weights, mask_pool
from rgpt_rt.ops.mask_pool import mask_pool_levels

CUDA = torch.device("cuda")


def pool(features, masks, batch_index=None, *, mode="area"):
    return mask_pool(features, masks, batch_index, mode=mode)


def cuda(*tensors):
    return [None if t is None else t.to(CUDA) for t in tensors]


@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_small_awkward_shapes_match_the_reference(shape, mode, dtype):
    batch, height, width, channels, count, mask_height, mask_width = shape
    features = random_features(batch, height, width, channels, dtype)
    masks = region_masks(count, mask_height, mask_width, seed=count)
    generator = torch.Generator().manual_seed(1)
    batch_index = torch.randint(0, batch, (count,), generator=generator) if batch > 1 else None
    check_against_reference(pool, *cuda(features, masks, batch_index), mode)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_small_every_mask_dtype(mask_dtype, mode):
    generator = torch.Generator().manual_seed(2)
    features = random_features(2, 7, 13, 40, torch.float32)
    masks = as_mask_dtype(region_masks(5, 100, 63, seed=3), mask_dtype, generator)
    check_against_reference(pool, *cuda(features, masks, torch.tensor([1, 0, 1, 1, 0])), mode)


def test_small_single_pixel_and_border_masks():
    features = random_features(1, 7, 13, 24, torch.float16)
    masks = torch.zeros(4, 57, 91, dtype=torch.bool)
    masks[0, 20, 33] = True
    masks[1, 8, 7] = True
    masks[2, [0, -1], :] = True
    masks[2, :, [0, -1]] = True
    masks[3, -1, -1] = True
    for mode in MODES:
        check_against_reference(pool, *cuda(features, masks, None), mode)


@pytest.mark.parametrize("dtype", FEATURE_DTYPES, ids=str)
def test_small_misaligned_pointers_take_the_scalar_loads(dtype):
    """A contiguous tensor whose storage starts one element late defeats the vector loads of
    both kernels; results must not change."""
    features = random_features(2, 9, 7, 36, dtype).to(CUDA)
    masks = region_masks(5, 61, 48, seed=4).to(CUDA)
    batch_index = torch.tensor([0, 1, 1, 0, 1], device=CUDA)
    shifted_features = torch.empty(features.numel() + 1, dtype=dtype, device=CUDA)[1:]
    shifted_features = shifted_features.view(features.shape).copy_(features)
    shifted_masks = torch.empty(masks.numel() + 1, dtype=torch.bool, device=CUDA)[1:]
    shifted_masks = shifted_masks.view(masks.shape).copy_(masks)
    assert shifted_features.data_ptr() % 8 != 0 and shifted_masks.data_ptr() % 16 != 0
    for mode in MODES:
        aligned = mask_pool(features, masks, batch_index, mode=mode)
        assert torch.equal(
            mask_pool(shifted_features, shifted_masks, batch_index, mode=mode), aligned
        )
        # one misaligned level makes every level take the scalar loads
        small = random_features(2, 4, 3, 12, dtype, seed=1).to(CUDA)
        levels = mask_pool_levels([features, small], masks, batch_index, mode=mode)
        shifted = mask_pool_levels([shifted_features, small], shifted_masks, batch_index, mode=mode)
        assert torch.equal(shifted, levels)


@pytest.mark.parametrize(
    ("height", "width", "mask_height", "mask_width"),
    [(7, 13, 100, 33), (6, 5, 2, 2), (32, 32, 512, 512), (16, 16, 1024, 1024), (9, 11, 9, 11)],
    ids=["fragile-column", "upsampled", "osprey-32-from-512", "osprey-16-from-1024", "same-size"],
)
def test_small_binary_mode_selects_exactly_the_references_cells(
    height, width, mask_height, mask_width
):
    """One-hot features: the pooled vector is exactly fp32(1 / count) on the selected cells
    (tests/test_mask_pool.py has the CPU twin)."""
    cells = height * width
    features = torch.eye(cells, dtype=torch.float32).reshape(1, height, width, cells)
    masks = region_masks(5, mask_height, mask_width, seed=cells)
    weights = mask_cell_weights(masks, height, width, "binary").flatten(1)
    expected = (weights / weights.sum(1, keepdim=True).clamp(min=1)).float()
    actual = mask_pool(*cuda(features, masks), mode="binary").cpu()
    assert torch.equal(actual, expected)


def selected_cells(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, H*W] bool: the cells mask_pool(mode="binary") averages over, read back by pooling
    one-hot features, 1024 cells at a time."""
    cells = height * width
    chosen = []
    for start in range(0, cells, 1024):
        block = min(1024, cells - start)
        one_hot = torch.zeros(cells, block, device=CUDA)
        one_hot[start : start + block] = torch.eye(block, device=CUDA)
        pooled = mask_pool(one_hot.reshape(1, height, width, block), masks, mode="binary")
        chosen.append(pooled != 0)
    return torch.cat(chosen, dim=1)


@pytest.mark.parametrize("side", [512, 1024, 333])
def test_binary_mode_selects_what_torch_cuda_interpolation_does_on_osprey_levels(side):
    """Osprey runs F.interpolate(masks.float(), bilinear) > 0 on the GPU (fp32, fused
    multiply-adds): on its levels (powers of two) the kernel selects exactly those cells."""
    masks = region_masks(6, side, side, seed=side).to(CUDA)
    for cells, _, _ in OSPREY_LEVELS:
        osprey = F.interpolate(
            masks[:, None].float(), size=(cells, cells), mode="bilinear", align_corners=False
        )[:, 0]
        assert torch.equal(selected_cells(masks, cells, cells), (osprey > 0).flatten(1))


def test_small_empty_masks_and_empty_shapes():
    features = random_features(2, 6, 6, 8, torch.float16).to(CUDA)
    masks = torch.zeros(3, 30, 30, dtype=torch.bool, device=CUDA)
    masks[1, 4:9, 20:25] = True
    for mode in MODES:
        pooled = mask_pool(features, masks, torch.tensor([0, 1, 1], device=CUDA), mode=mode)
        assert torch.equal(pooled[0], torch.zeros_like(pooled[0]))
        assert torch.equal(pooled[2], torch.zeros_like(pooled[2]))
        assert pooled[1].abs().sum() > 0
    levels = [features, torch.zeros(2, 3, 3, 0, device=CUDA, dtype=torch.float16)]
    assert mask_pool_levels(levels, masks, torch.tensor([0, 1, 1], device=CUDA)).shape == (3, 8)
    assert mask_pool(features[:1], masks[:0]).shape == (0, 8)
    assert mask_pool(torch.zeros(1, 4, 4, 0, device=CUDA), masks).shape == (3, 0)


def test_small_results_are_deterministic():
    features = random_features(2, 24, 24, 200, torch.float32).to(CUDA)
    masks = region_masks(20, 100, 100, seed=7).to(CUDA)
    batch_index = (torch.arange(20) % 2).to(CUDA)
    first = mask_pool(features, masks, batch_index)
    assert torch.equal(mask_pool(features, masks, batch_index), first)


def test_small_cpu_and_cuda_agree():
    features = random_features(2, 13, 9, 72, torch.float32)
    masks = region_masks(6, 77, 50, seed=8)
    batch_index = torch.tensor([1, 0, 0, 1, 1, 0])
    for mode in MODES:
        on_cpu = mask_pool(features, masks, batch_index, mode=mode)
        on_gpu = mask_pool(*cuda(features, masks, batch_index), mode=mode).cpu()
        torch.testing.assert_close(
            on_gpu, on_cpu, rtol=1e-5, atol=1e-6
        )  # two fp32 summation orders


def test_small_runs_on_the_current_stream():
    features = random_features(1, 16, 16, 64, torch.float16).to(CUDA)
    masks = region_masks(4, 64, 64).to(CUDA)
    expected = mask_pool(features, masks)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = mask_pool(features, masks)
    side.synchronize()
    assert torch.equal(result, expected)


# ---- CUDA graphs and torch.compile -------------------------------------------------------


def test_small_cuda_graph_capture_and_replay():
    features = random_features(2, 12, 12, 96, torch.float16).to(CUDA)
    masks = region_masks(5, 50, 70, seed=9).to(CUDA)
    batch_index = torch.tensor([0, 1, 1, 0, 1], device=CUDA)
    mask_pool(features, masks, batch_index)  # warm-up outside capture (plans, caches)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mask_pool(features, masks, batch_index, mode="area")
    # new inputs in the captured tensors, then replay
    features.copy_(random_features(2, 12, 12, 96, torch.float16, seed=10))
    masks.copy_(region_masks(5, 50, 70, seed=11))
    batch_index.copy_(torch.tensor([1, 1, 0, 0, 1]))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, mask_pool(features, masks, batch_index))


@pytest.mark.parametrize("mode", MODES)
def test_small_bad_values_inside_a_graph_give_nan_rows_not_faults(mode):
    """Inside capture the value checks cannot run (they would synchronise): an image index
    out of range or a nan mask must poison only its own row."""
    features = random_features(2, 8, 8, 32, torch.float32).to(CUDA)
    masks = region_masks(3, 40, 40, seed=12).float().to(CUDA)
    batch_index = torch.tensor([0, 1, 0], device=CUDA)
    mask_pool(features, masks, batch_index, mode=mode)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mask_pool(features, masks, batch_index, mode=mode)
    good = mask_pool(features, masks, batch_index, mode=mode)
    batch_index[1] = 7  # outside [0, 2)
    masks[2] = float("nan")  # every pixel: binary mode reads only the taps
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], good[0])
    assert captured[1].isnan().all() and captured[2].isnan().all()


def test_torch_compile_with_cuda_graphs():
    def region_tokens(features, masks, batch_index):
        return torch.nn.functional.gelu(mask_pool(features * 2, masks, batch_index)) + 1

    features = random_features(2, 8, 8, 64, torch.float32).to(CUDA)
    masks = region_masks(5, 33, 47).to(CUDA)
    batch_index = torch.tensor([0, 1, 1, 0, 1], device=CUDA)
    compiled = torch.compile(region_tokens, fullgraph=True, backend="cudagraphs")
    expected = region_tokens(features, masks, batch_index)
    for _ in range(3):  # warm-up, record, replay
        assert torch.equal(compiled(features, masks, batch_index), expected)


def test_small_opcheck():
    features = random_features(2, 6, 7, 9, torch.float32).to(CUDA)
    masks = region_masks(3, 20, 30).to(CUDA)
    for batch_index in (None, torch.tensor([1, 0, 1], device=CUDA)):
        args = (features[:1] if batch_index is None else features, masks, batch_index, "area")
        torch.library.opcheck(torch.ops.rgpt_rt.mask_pool.default, args)
    levels = [features, random_features(2, 3, 4, 5, torch.float32).to(CUDA)]
    args = (levels, masks, torch.tensor([1, 0, 1], device=CUDA), "binary")
    torch.library.opcheck(torch.ops.rgpt_rt.mask_pool_levels.default, args)


# ---- several levels in one call (Osprey) -------------------------------------------------


def check_levels(name, mode, dtype):
    batch, levels, count, mask_height, mask_width = LEVEL_SETS[name]
    features = [f.to(CUDA) for f in level_features(batch, levels, dtype)]
    masks = region_masks(count, mask_height, mask_width, seed=count).to(CUDA)
    generator = torch.Generator().manual_seed(1)
    batch_index = torch.randint(0, batch, (count,), generator=generator).to(CUDA)
    check_levels_against_reference(mask_pool_levels, features, masks, batch_index, mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LEVEL_SETS)
def test_levels_match_the_reference(name, mode, dtype):
    check_levels(name, mode, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LEVEL_SETS)
def test_small_float16_levels_match_the_reference(name, mode):
    """float16 apart, with "small" in its name: scripts/gpu_check.sh runs it again under
    compute-sanitizer (the level tables of every kernel, every mode)."""
    check_levels(name, mode, torch.float16)


def test_small_levels_cuda_graph_capture_and_replay():
    features = [f.to(CUDA) for f in level_features(2, [(16, 16, 24), (8, 8, 48)], torch.float16)]
    masks = region_masks(5, 64, 64, seed=9).to(CUDA)
    batch_index = torch.tensor([0, 1, 1, 0, 1], device=CUDA)
    mask_pool_levels(features, masks, batch_index, mode="binary")  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mask_pool_levels(features, masks, batch_index, mode="binary")
    for k, f in enumerate(level_features(2, [(16, 16, 24), (8, 8, 48)], torch.float16, seed=5)):
        features[k].copy_(f)
    masks.copy_(region_masks(5, 64, 64, seed=11))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, mask_pool_levels(features, masks, batch_index, mode="binary"))


@pytest.mark.parametrize("side", [512, 1024])
def test_osprey_real_shapes(side):
    """Osprey's four levels of a 512-px image, fp16, and 16 region masks in one call; the
    expectation is the reference's weights and one fp64 matmul per level."""
    features = [f.to(CUDA) for f in level_features(1, OSPREY_LEVELS, torch.float16, seed=side)]
    masks = region_masks(16, side, side, seed=side).to(CUDA)
    pooled = mask_pool_levels(features, masks, mode="binary").cpu()
    column = 0
    for level in features:
        _, height, width, channels = level.shape
        weights = mask_cell_weights(masks, height, width, "binary").flatten(1)
        expected = weighted_mean(weights, level[0].double().flatten(0, 1), "binary")
        assert_close_ulps(pooled[:, column : column + channels], expected.cpu().half())
        column += channels


# ---- real shapes and huge masks -----------------------------------------------------------


@pytest.fixture(scope="module")
def real_map():
    return random_features(1, 96, 96, 1024, torch.float16, seed=8).to(CUDA)


@pytest.mark.parametrize("side", [1024, 336, 4096])
def test_real_shapes(real_map, side):
    """16 region masks (2 of 4096x4096) on a 96x96x1024 fp16 map. The expectation is the
    reference's own weights (mask_cell_weights, fp64, on the GPU) and one fp64 matmul."""
    masks = region_masks(16 if side < 4096 else 2, side, side, seed=side).to(CUDA)
    grid = real_map[0].double().flatten(0, 1)
    for mode in MODES:
        weights = mask_cell_weights(masks, 96, 96, mode).flatten(1)
        expected = weighted_mean(weights, grid, mode)
        assert_close_ulps(mask_pool(real_map, masks, mode=mode).cpu(), expected.cpu().half())


def test_many_masks_over_several_images():
    features = random_features(3, 48, 40, 256, torch.bfloat16)
    masks = region_masks(70, 200, 160, seed=13)
    batch_index = torch.randint(0, 3, (70,), generator=torch.Generator().manual_seed(14))
    for mode in MODES:
        check_against_reference(pool, *cuda(features, masks, batch_index), mode)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("masks-on-cpu", "masks are on cpu"),
        ("index-on-cpu", "batch_index is on cpu"),
        ("index-out-of-range", "batch_index values must be in"),
        ("nan-mask", "non-finite"),
    ],
)
def test_small_bad_input_names_the_argument(where, message):
    features = torch.zeros(2, 4, 4, 3, device=CUDA)
    masks = torch.ones(2, 8, 8, device=CUDA)
    batch_index = torch.tensor([0, 1], device=CUDA)
    if where == "masks-on-cpu":
        masks = masks.cpu()
    elif where == "index-on-cpu":
        batch_index = batch_index.cpu()
    elif where == "index-out-of-range":
        batch_index[1] = 2
    else:
        masks[1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=message):
        mask_pool(features, masks, batch_index)
