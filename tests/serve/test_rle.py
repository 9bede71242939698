"""COCO RLE decoding and encoding, on cases worked out by hand from pycocotools' format."""

import numpy as np
import pytest

from rgpt_rt.rle import RLEError, decode_counts, decode_rle, encode_counts, encode_rle

# Worked by hand. The 3x4 mask below, read column by column, is 000 110 111 001: runs
# 3, 2, 1, 3, 2, 1. Compressed: the first three as they are ('3', '2', '1'); then each minus the
# run two before it: 3-2 = 1 -> '1', 2-1 = 1 -> '1', 1-3 = -2 -> 5-bit group 30 with the sign
# bit set, last group -> chr(48 + 30) = 'N'.
THREE_BY_FOUR = np.array([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=bool)
CASES = {
    "3x4": (THREE_BY_FOUR, [3, 2, 1, 3, 2, 1], "32111N"),
    # starts inside: a 0-length run of 0s comes first
    "full-2x2": (np.ones((2, 2), dtype=bool), [0, 4], "04"),
    "empty-1x5": (np.zeros((1, 5), dtype=bool), [5], "5"),
    # 40 = 0b01000 + 1 << 5: group 8 with the continue bit (8 | 0x20 = 40 -> 'X'), then '1'
    "run-40": (np.arange(50)[None, :] >= 10, [10, 40], ":X1"),
    # 16 has the sign bit of its group set, so it takes a second group: '`' (16 | 0x20) then '0'
    "run-16": (np.arange(17)[None, :] >= 16, [16, 1], "`01"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hand_made_cases(case):
    mask, runs, text = CASES[case]
    size = list(mask.shape)
    assert decode_counts(text) == runs
    assert encode_counts(runs) == text
    np.testing.assert_array_equal(decode_rle({"size": size, "counts": runs}), mask)
    np.testing.assert_array_equal(decode_rle({"size": size, "counts": text}), mask)
    assert encode_rle(mask) == {"size": size, "counts": text}


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (48, 64), (113, 203)], ids=str)
def test_random_masks_round_trip(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.02, 0.5, 0.98, 1.0):
        mask = rng.random(shape) < density
        encoded = encode_rle(mask)
        np.testing.assert_array_equal(decode_rle(encoded), mask)
        runs = decode_counts(encoded["counts"])
        assert sum(runs) == mask.size
        np.testing.assert_array_equal(decode_rle({"size": list(shape), "counts": runs}), mask)


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ({"size": [2, 2], "counts": [1, 2]}, "cover 3 pixels but its size 2x2"),
        ({"size": [2, 2], "counts": [5, -1]}, "negative run"),
        ({"size": [2, 2], "counts": "4~"}, "holds '~'"),
        ({"size": [1, 50], "counts": ":X"}, "truncated"),
        ({"size": [0, 3], "counts": []}, "must be positive"),
        ({"size": [3], "counts": [3]}, r"size is \[height, width\]"),
        ({"size": [2, 2], "counts": [1.5, 2.5]}, "list of run lengths"),
        ({"size": [5000, 5000], "counts": [25_000_000]}, "over the 1,000,000-pixel limit"),
    ],
    ids=["short", "negative", "bad-char", "truncated", "zero-size", "one-dim", "floats", "huge"],
)
def test_bad_rle_says_what_is_wrong(rle, message):
    with pytest.raises(RLEError, match=message):
        decode_rle(rle, max_pixels=1_000_000)
