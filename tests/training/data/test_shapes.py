"""The shapes world: deterministic from a seed, with masks that are exactly the drawn pixels."""

import numpy as np
import pytest

from rgpt_rt.training.data.shapes import (
    COLOUR_RGB,
    COLOURS,
    MIN_VISIBLE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    make_scene,
    object_coverage,
)
from rgpt_rt.training.data.tasks import ShapesWorld

SIZE = 96


def scenes(count, seed=0):
    return [make_scene(np.random.default_rng([seed, i]), SIZE) for i in range(count)]


def test_the_vocabulary_is_the_published_one():
    assert SHAPES == (
        "circle",
        "square",
        "triangle",
        "star",
        "hexagon",
        "heart",
        "cross",
        "ring",
    )
    assert COLOURS == ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    assert SIZES == ("small", "medium", "large")
    assert POSITIONS == (
        "top left",
        "top",
        "top right",
        "left",
        "center",
        "right",
        "bottom left",
        "bottom",
        "bottom right",
    )


def test_same_seed_gives_identical_bytes_and_masks():
    for first, second in zip(scenes(6), scenes(6)):
        assert first.image.tobytes() == second.image.tobytes()
        assert np.array_equal(first.masks(), second.masks())
        assert first.objects == second.objects
    a, b = ShapesWorld(SIZE, seed=3).sample(11), ShapesWorld(SIZE, seed=3).sample(11)
    assert a.image.tobytes() == b.image.tobytes()
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    assert [(t.question, t.answer) for t in a.turns] == [(t.question, t.answer) for t in b.turns]


def test_another_seed_gives_another_world():
    assert ShapesWorld(SIZE, seed=0).sample(0).image.tobytes() != (
        ShapesWorld(SIZE, seed=1).sample(0).image.tobytes()
    )


def test_masks_are_exactly_the_drawn_pixels():
    """Redraw every object alone: a pixel is in object k's mask iff k covers at least half of
    it and no later object does; unblended pixels hold exactly the object's colour."""
    checked_plain = checked_aa = 0
    for scene in scenes(40):
        coverages = [object_coverage(o, SIZE, scene.antialias) for o in scene.objects]
        masks = scene.masks()
        assert masks.shape == (len(scene.objects), SIZE, SIZE)
        assert masks.sum(axis=0).max() <= 1, "masks never overlap"
        for k, (obj, coverage) in enumerate(zip(scene.objects, coverages)):
            later = np.zeros((SIZE, SIZE), dtype=bool)
            for above in coverages[k + 1 :]:
                later |= above >= 0.5
            assert np.array_equal(masks[k], (coverage >= 0.5) & ~later)
            # pixels fully painted by k and touched by nothing above it show k's colour exactly
            untouched = np.ones((SIZE, SIZE), dtype=bool)
            for above in coverages[k + 1 :]:
                untouched &= above == 0
            solid = (coverage == 1) & untouched
            assert solid.sum() > 0
            assert (scene.image[solid] == np.array(obj.rgb, dtype=np.uint8)).all()
            if scene.antialias:
                checked_aa += 1
            else:
                # without anti-aliasing every mask pixel is solid
                assert np.array_equal(masks[k], solid & masks[k])
                assert (scene.image[masks[k]] == np.array(obj.rgb, dtype=np.uint8)).all()
                checked_plain += 1
    assert checked_plain > 10 and checked_aa > 10, "both drawing modes were checked"


def test_objects_stay_recognisable_and_their_labels_are_true():
    counts = set()
    for scene in scenes(60):
        counts.add(len(scene.objects))
        for k, obj in enumerate(scene.objects):
            own = object_coverage(obj, SIZE, scene.antialias) >= 0.5
            assert scene.mask(k).sum() >= MIN_VISIBLE * own.sum()
            # position: the 3x3 cell of the centre, computed here independently
            col, row = int(obj.cx // (SIZE / 3)), int(obj.cy // (SIZE / 3))
            assert obj.position == POSITIONS[3 * row + col]
            # the centre stays clear of the cell's edges, so the name is never a coin toss
            for value in (obj.cx, obj.cy):
                offset = value - (value // (SIZE / 3)) * (SIZE / 3)
                assert 0.1 * SIZE / 3 < offset < 0.9 * SIZE / 3
            # the painted colour is nearest to its own name's colour
            distances = {
                name: np.abs(np.array(rgb) - np.array(obj.rgb)).sum()
                for name, rgb in COLOUR_RGB.items()
            }
            assert min(distances, key=distances.get) == obj.colour
            # inside the image
            assert obj.radius <= obj.cx <= SIZE - obj.radius
            assert obj.radius <= obj.cy <= SIZE - obj.radius
    assert counts == {2, 3, 4, 5, 6}


def test_sizes_do_not_overlap():
    radii = {size: [] for size in SIZES}
    for scene in scenes(60):
        for obj in scene.objects:
            radii[obj.size].append(obj.radius)
    assert max(radii["small"]) < min(radii["medium"])
    assert max(radii["medium"]) < min(radii["large"])


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_draws_its_own_silhouette(shape):
    """Each shape covers the fraction of its circumscribed circle that its geometry says."""
    obj = ShapeObject(shape, "red", "large", "center", 48.0, 48.0, 40.0, 0.0, (255, 0, 0))
    covered = object_coverage(obj, SIZE, antialias=True).sum()
    fraction = covered / (np.pi * 40.0**2)
    expected = {
        "circle": 1.0,
        "ring": 1 - 0.55**2,
        "square": 2 / np.pi,
        "triangle": 3 * np.sqrt(3) / (4 * np.pi),
        "hexagon": 3 * np.sqrt(3) / (2 * np.pi),
        "star": 5 * np.sin(2 * np.pi / 10) * 0.45 / np.pi,
        "cross": None,
        "heart": None,
    }[shape]
    if expected is not None:
        assert fraction == pytest.approx(expected, abs=0.01)
    else:
        assert 0.3 < fraction < 0.8
    # a rotated square is still a square of the same area; the triangle stays upright
    if shape == "square":
        turned = ShapeObject(shape, "red", "large", "center", 48.0, 48.0, 40.0, 0.6, (255, 0, 0))
        area = object_coverage(turned, SIZE, antialias=True).sum()
        assert area == pytest.approx(covered, rel=0.01)


def test_a_too_small_image_is_refused():
    with pytest.raises(ValueError, match="too small"):
        make_scene(np.random.default_rng(0), 8)
