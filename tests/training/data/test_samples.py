"""Samples become batches: masks reduced to hi-res cell coverage pool to the same vectors as the
full masks, and every region token gets its own mask."""

import numpy as np
import pytest
import torch

from rgpt_rt.config import RGPTConfig
from rgpt_rt.inputs import pad_image, pad_mask, square_padding
from rgpt_rt.ops import mask_pool_reference
from rgpt_rt.prompts import IGNORE_INDEX
from rgpt_rt.tokenizer import default_tokenizer
from rgpt_rt.training.data.samples import RegionSample, Turn, collate, region_coverage


@pytest.mark.parametrize("mode", ["area", "bilinear"])
@pytest.mark.parametrize("size", [(96, 96), (37, 61), (50, 23)], ids=["square", "wide", "tall"])
def test_coverage_pools_like_the_full_mask(mode, size):
    rng = np.random.default_rng(0)
    grid = 24
    features = torch.randn(1, grid, grid, 16, dtype=torch.float64)
    for _ in range(5):
        mask = np.zeros(size, dtype=bool)
        y, x = rng.integers(0, size[0] - 5), rng.integers(0, size[1] - 5)
        mask[y : y + rng.integers(1, 9), x : x + rng.integers(1, 9)] = True
        full = mask_pool_reference(features, torch.from_numpy(pad_mask(mask))[None], mode=mode)
        cover = region_coverage(mask, grid, mode)
        assert cover.shape == (grid, grid) and cover.dtype == torch.float32
        reduced = mask_pool_reference(features, cover[None], mode=mode)
        # the coverage is stored in float32: agreement to float32 precision
        torch.testing.assert_close(reduced, full, rtol=1e-6, atol=1e-6)
    if mode == "area":
        square = np.ones(size, dtype=bool)
        assert float(region_coverage(square, grid).max()) == pytest.approx(1.0)


def test_collate_gives_each_region_token_its_mask():
    config = RGPTConfig.from_preset("tiny")
    tokenizer = default_tokenizer()
    size = config.vision.image_size
    image = np.zeros((size, size, 3), dtype=np.uint8)

    def block(row):
        mask = np.zeros((size, size), dtype=bool)
        mask[row : row + 8, :8] = True
        return mask

    first = RegionSample(
        image, [block(0), block(40)], [Turn("Is <region2> above <region1>?", "no", "above")]
    )
    second = RegionSample(
        image,
        [block(80)],
        [Turn("What is <region1>?", "a small object", "brief"), Turn("And <region1>?", "yes", "x")],
    )
    batch = collate([first, second], config, tokenizer, pad_token_id=0)
    assert batch.pixel_values.shape == (2, 3, size, size)
    assert batch.masks.shape == (3, config.hires_grid, config.hires_grid)
    assert batch.batch_index.tolist() == [0, 0, 1]
    # row 0 names mask 2 then mask 1; row 1 names its only mask twice
    assert batch.region_index.tolist() == [1, 0, 2, 2]
    rows = [int(torch.nonzero(batch.masks[k].sum(dim=1))[0]) for k in batch.region_index]
    cell = size // config.hires_grid
    assert rows == [40 // cell, 0, 80 // cell, 80 // cell]
    # right padding, answers only in the labels
    lengths = batch.attention_mask.sum(dim=1)
    assert int(lengths.max()) == batch.input_ids.shape[1]
    short = int(lengths.argmin())
    assert (batch.input_ids[short, lengths[short] :] == 0).all()
    assert (batch.labels[short, lengths[short] :] == IGNORE_INDEX).all()
    answer = batch.labels[0][batch.labels[0] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(answer, skip_special_tokens=False) == " no</s>"
    # evaluation prompts stop after the first question
    prompt = collate([second], config, tokenizer, 0, answered=False)
    assert (prompt.labels == IGNORE_INDEX).all()
    assert prompt.input_ids.shape[1] < batch.input_ids.shape[1]


def test_a_sample_without_masks_is_refused():
    config = RGPTConfig.from_preset("tiny")
    empty = RegionSample(np.zeros((8, 8, 3), np.uint8), [], [Turn("Hi", "there", "x")])
    with pytest.raises(ValueError, match="sample 0 has no region masks"):
        collate([empty], config, default_tokenizer(), 0)


@pytest.mark.parametrize("shape", [(5, 5), (4, 7), (7, 4), (1, 6), (6, 1), (3, 8)])
def test_pad_image_centres_the_image_on_the_fill_colour(shape):
    height, width = shape
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    fill = (0.48, 0.46, 0.41)
    out = pad_image(image, fill)
    side = max(shape)
    top, left = square_padding(height, width)
    expected = np.empty((side, side, 3), dtype=np.uint8)
    expected[:] = [round(255 * f) for f in fill]
    expected[top : top + height, left : left + width] = image
    assert out.shape == (side, side, 3) and np.array_equal(out, expected)
