"""COCO-format region data: RLE (compressed and not), polygons and boxes become masks; bad
annotations are skipped and counted, never a crash."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from rgpt_rt.prompts import NO_MATCH_ANSWER
from rgpt_rt.rle import decode_counts, decode_rle, encode_counts, encode_rle
from rgpt_rt.training.data.coco import CocoRegions, SkippedAnnotations, load_coco, polygons_to_mask


def disc(height, width, cy, cx, r):
    ys, xs = np.mgrid[:height, :width]
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r


def write_coco(root):
    """Two images; good annotations of every kind, and one of each bad kind."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (40, 56), "b.png": (32, 32)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / name
        )
    circle = disc(40, 56, 20, 40, 8)
    ring = disc(32, 32, 16, 16, 10) & ~disc(32, 32, 16, 16, 5)
    good = [
        # image 1: a polygon (a square), a compressed RLE (a circle), a bare box
        {
            "image_id": 1,
            "category_id": 1,
            "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20]],
            "bbox": [4, 4, 16, 16],
        },
        {
            "image_id": 1,
            "category_id": 2,
            "segmentation": encode_rle(circle),
            "bbox": [32, 12, 17, 17],
        },
        {"image_id": 1, "category_id": 3, "bbox": [2, 28, 30, 10]},
        # image 2: an uncompressed RLE (a ring)
        {
            "image_id": 2,
            "category_id": 2,
            "segmentation": encode_rle(ring, compressed=False),
            "bbox": [6, 6, 21, 21],
        },
    ]
    empty_rle = encode_rle(np.zeros((32, 32), dtype=bool))
    bad = [
        {"image_id": 2, "category_id": 1, "segmentation": [], "bbox": [1, 1, 5, 5]},
        {"image_id": 2, "category_id": 1, "segmentation": empty_rle, "bbox": [1, 1, 5, 5]},
        {"image_id": 2, "category_id": 1, "bbox": [40, 40, 5, 5]},
        {
            "image_id": 2,
            "category_id": 1,
            "segmentation": [[50, 50, 60, 50, 60, 60]],
            "bbox": [1, 1, 2, 2],
        },
        {"image_id": 9, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"image_id": 2, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 1,
            "segmentation": empty_rle,
            "bbox": [1, 1, 5, 5],
        },
    ]
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 56},
            {"id": 2, "file_name": "b.png", "height": 32, "width": 32},
        ],
        "annotations": [{"id": i, **a} for i, a in enumerate(good + bad)],
        "categories": [
            {"id": 1, "name": "box"},
            {"id": 2, "name": "dog"},
            {"id": 3, "name": "apple"},
        ],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path, circle, ring


def test_rle_round_trips_and_reads_column_major():
    rng = np.random.default_rng(1)
    for _ in range(50):
        height, width = rng.integers(1, 30, 2)
        mask = rng.random((height, width)) < rng.random()
        for compressed in (True, False):
            assert np.array_equal(decode_rle(encode_rle(mask, compressed)), mask)
    # column-major: runs go down the first column first
    mask = decode_rle({"size": [2, 3], "counts": [1, 2, 3]})
    assert mask.tolist() == [[False, True, False], [True, False, False]]
    # the compressed form stores a run from the fourth on as a difference, with a sign bit
    runs = [0, 5, 3, 1000, 2, 70000, 1, 1]
    assert decode_counts(encode_counts(runs)) == runs


def test_bad_rle_says_what_is_wrong():
    with pytest.raises(
        ValueError, match=r"cover 5 pixels but its size 2x3 \(height x width\) has 6"
    ):
        decode_rle({"size": [2, 3], "counts": [2, 3]})
    with pytest.raises(ValueError, match="ends in the middle"):
        decode_counts("0o")


def test_polygons_fill_their_inside():
    mask = polygons_to_mask([[2, 2, 10, 2, 10, 8, 2, 8]], 12, 14)
    assert mask[5, 6] and not mask[0, 0] and not mask[11, 13]
    assert 50 <= mask.sum() <= 70  # the 8 x 6 rectangle, edges included


def test_annotations_become_masks_and_bad_ones_are_counted(tmp_path):
    path, circle, ring = write_coco(tmp_path)
    with pytest.warns(SkippedAnnotations) as caught:
        images, categories = load_coco(path, tmp_path / "images")
    message = str(caught[0].message)
    assert "skipped 7 of 11 annotations" in message
    for reason in (
        "empty segmentation",
        "outside the image",
        "unknown image",
        "unknown category",
        "crowd",
    ):
        assert reason in message
    assert "2 empty segmentation" in message and "2 outside the image" in message
    assert categories == ["apple", "box", "dog"]
    first, second = images
    assert [r.category for r in first.regions] == ["box", "dog", "apple"]
    square, disc_mask, box = (r.mask(40, 56) for r in first.regions)
    assert square[4:20, 4:20].all() and square.sum() <= 17 * 17
    assert np.array_equal(disc_mask, circle)
    assert box[28:38, 2:32].all() and box.sum() == 300
    assert np.array_equal(second.regions[0].mask(32, 32), ring)


def test_samples_are_deterministic_and_answers_follow_the_categories(tmp_path):
    path, _, _ = write_coco(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedAnnotations)
        data = CocoRegions(path, tmp_path / "images", seed=3)
        again = CocoRegions(path, tmp_path / "images", seed=3)
    tasks = set()
    for index in range(40):
        sample = data.sample(index)
        twin = again.sample(index)
        assert sample.image.tobytes() == twin.image.tobytes()
        assert sample.turns[0].question == twin.turns[0].question
        turn = sample.turns[0]
        tasks.add(turn.task)
        assert all(m.shape == sample.image.shape[:2] for m in sample.masks)
        if turn.task == "classify":
            assert turn.answer in ("box", "dog", "apple")
        if turn.task == "refer":
            names, target = turn.truth["categories"], turn.truth["target"]
            wanted = turn.question.split('"')[1].removeprefix("the ")
            hits = [k for k, name in enumerate(names) if name == wanted]
            if target is None:
                assert hits == [] and turn.answer == NO_MATCH_ANSWER
            else:
                assert hits == [target] and turn.answer == f"Region [{target + 1}]"
    assert tasks == {"classify", "brief", "refer"}
    held_out = data.task_samples(4)
    assert [s.task for s in held_out] == ["classify"] * 4 + ["brief"] * 4 + ["refer"] * 4


def test_a_file_that_is_not_coco_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="no 'annotations' list"):
        load_coco(tmp_path / "x.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_coco(tmp_path / "missing.json", tmp_path)


def test_an_image_of_another_size_than_the_file_says_is_refused(tmp_path):
    path, _, _ = write_coco(tmp_path)
    Image.new("RGB", (10, 10)).save(tmp_path / "images" / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedAnnotations)
        data = CocoRegions(path, tmp_path / "images")
    with pytest.raises(ValueError, match="is 10x10 but the annotation file says 56x40"):
        data.task_samples(3)
