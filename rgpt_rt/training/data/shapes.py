"""The synthetic region world: shapes on backgrounds, with exact instance masks.

    scene = make_scene(np.random.default_rng([seed, index]), size=64)
    scene.image            # [S, S, 3] uint8
    scene.masks()          # [K, S, S] bool, one per object, occlusion taken into account
    scene.objects[k]       # ShapeObject: shape, colour, size, position, centre, radius, ...
    dense_labels(scene, 24)  # {"shape": [24, 24] int64, ...}: per-cell labels of a feature map

Everything is drawn from a numpy Generator, so a seed (and a sample index) fixes every byte.
The vocabulary below is public and stable: prompts, tests and users rely on it.

Drawing: objects are painted in order (later ones on top), filled, with anti-aliasing by 4x4
supersampling or without (one sample at each pixel centre). A pixel belongs to the topmost object
covering at least half of it (`Scene.labels`); an object's mask is its pixels that no later object
took. Objects are placed so that each keeps at least `MIN_VISIBLE` of its own pixels, so that
every shape stays recognisable, and so that its centre lies well inside one cell of the 3x3
position grid and its size is one of three well-separated radii.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "heart", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SIZES = ("small", "medium", "large")
POSITIONS = (
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
BACKGROUNDS = ("plain", "gradient", "noise")
# The attributes an object has, each with its vocabulary (dense_labels, vision pretraining).
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}

# The base RGB of each colour; every object gets a mild jitter of up to +-COLOUR_JITTER.
COLOUR_RGB = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 220, 40),
    "purple": (140, 55, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_JITTER = 12
# Circumradius of each size as a fraction of the image side, jittered by +-SIZE_JITTER.
SIZE_RADIUS = {"small": 0.09, "medium": 0.13, "large": 0.18}
SIZE_JITTER = 0.06
ROTATES = {"square", "star", "hexagon", "cross"}  # the others are drawn upright (or are round)
RING_INNER = 0.55  # inner radius of a ring, as a fraction of its outer radius
STAR_INNER = 0.45  # inner vertices of the star
CROSS_ARM = 0.32  # half-width of a cross's arms, as a fraction of its radius
MIN_OBJECTS, MAX_OBJECTS = 2, 6
MIN_VISIBLE = 0.6  # each object keeps at least this fraction of its own pixels
CELL_MARGIN = 0.15  # centres keep this fraction of a cell's side away from the cell's edges
SUPERSAMPLE = 4  # anti-aliasing: SUPERSAMPLE x SUPERSAMPLE samples per pixel


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str  # the 3x3 cell holding the centre
    cx: float  # centre, in pixels (x to the right, y down)
    cy: float
    radius: float  # circumradius in pixels
    angle: float  # rotation in radians (0 for shapes drawn upright)
    rgb: tuple[int, int, int]  # the jittered colour actually painted

    def phrase(self) -> str:
        """'large red circle'."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass
class Scene:
    image: np.ndarray  # [S, S, 3] uint8
    labels: np.ndarray  # [S, S] int16: index of the object owning each pixel, -1 for background
    objects: list[ShapeObject]
    background: str
    antialias: bool

    @property
    def size(self) -> int:
        return self.image.shape[0]

    def mask(self, index: int) -> np.ndarray:
        """[S, S] bool: the visible pixels of object `index`."""
        return self.labels == index

    def masks(self) -> np.ndarray:
        """[K, S, S] bool, one visible-pixel mask per object, in drawing order."""
        return self.labels[None] == np.arange(len(self.objects), dtype=np.int16)[:, None, None]


# --- geometry -------------------------------------------------------------------------------


def position_of(cx: float, cy: float, size: int) -> str:
    """The 3x3 grid cell holding the point (cx, cy) of an image of side `size`."""
    col = min(int(3 * cx / size), 2)
    row = min(int(3 * cy / size), 2)
    return POSITIONS[3 * row + col]


def _polygon(shape: str) -> np.ndarray:
    """[V, 2] vertices of a unit-circumradius polygon shape, upright, centred at the origin
    (y down, so the first vertex of the triangle and the star points up)."""
    if shape == "square":
        angles = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "hexagon":
        angles = np.arange(6) * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "cross":
        w = CROSS_ARM
        a = math.sqrt(1.0 - w * w)  # the arm ends' corners lie on the unit circle
        return np.array(
            [
                *([w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a]),
                *([-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w], [-w, -a]),
            ],
            dtype=np.float64,
        )
    raise ValueError(f"{shape!r} is not a polygon shape")


def _inside_polygon(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon for arrays of points."""
    inside = np.zeros(x.shape, dtype=bool)
    count = len(vertices)
    for i in range(count):
        x0, y0 = vertices[i]
        x1, y1 = vertices[(i + 1) % count]
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_at)
    return inside


def inside_shape(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x, y), in units of the circumradius relative to the centre and already
    un-rotated, lie inside `shape`."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "ring":
        r2 = x * x + y * y
        return (r2 <= 1.0) & (r2 >= RING_INNER**2)
    if shape == "heart":
        # (u^2 + v^2 - 1)^3 - u^2 v^3 <= 0 with v up; the curve spans u in [-1.14, 1.14] and
        # v in [-1, 1.23], so it is scaled by 0.8 and shifted to sit inside the unit circle.
        u = x / 0.8
        v = -(y / 0.8) + 0.12
        return (u * u + v * v - 1.0) ** 3 - u * u * v**3 <= 0.0
    return _inside_polygon(x, y, _polygon(shape))


def object_coverage(obj: ShapeObject, size: int, antialias: bool) -> np.ndarray:
    """[S, S] float32 in [0, 1]: the fraction of each pixel that `obj` covers (0 or 1 without
    anti-aliasing: the pixel centre decides)."""
    coverage = np.zeros((size, size), dtype=np.float32)
    x0 = max(math.floor(obj.cx - obj.radius) - 1, 0)
    x1 = min(math.ceil(obj.cx + obj.radius) + 1, size)
    y0 = max(math.floor(obj.cy - obj.radius) - 1, 0)
    y1 = min(math.ceil(obj.cy + obj.radius) + 1, size)
    if x1 <= x0 or y1 <= y0:
        return coverage
    steps = SUPERSAMPLE if antialias else 1
    offsets = (np.arange(steps) + 0.5) / steps  # sample positions inside a pixel
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)  # [W * steps]
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)  # [H * steps]
    gx, gy = np.meshgrid(xs - obj.cx, ys - obj.cy)  # [H * steps, W * steps]
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    ux = (cos * gx + sin * gy) / obj.radius  # rotate by -angle into the shape's own frame
    uy = (-sin * gx + cos * gy) / obj.radius
    hit = inside_shape(obj.shape, ux, uy).astype(np.float32)
    hit = hit.reshape(y1 - y0, steps, x1 - x0, steps).mean(axis=(1, 3))
    coverage[y0:y1, x0:x1] = hit
    return coverage


# --- sampling -------------------------------------------------------------------------------


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A greyish background colour, far from the saturated object colours and from pure
    black and white."""
    grey = rng.uniform(85, 170)
    tint = rng.uniform(-22, 22, size=3)
    return np.clip(grey + tint, 0, 255)


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """[S, S, 3] float64."""
    if kind == "plain":
        return np.broadcast_to(_muted_colour(rng), (size, size, 3)).copy()
    if kind == "gradient":
        first, second = _muted_colour(rng), _muted_colour(rng)
        angle = rng.uniform(0, 2 * np.pi)
        coords = (np.arange(size) + 0.5) / size - 0.5
        gx, gy = np.meshgrid(coords, coords)
        t = np.clip(0.5 + (gx * math.cos(angle) + gy * math.sin(angle)), 0, 1)[..., None]
        return first * (1 - t) + second * t
    if kind == "noise":
        base = _muted_colour(rng)
        cells = int(rng.integers(4, 9))
        coarse = rng.normal(0, 14, size=(cells, cells, 3))
        repeat = -(-size // cells)
        blocky = np.repeat(np.repeat(coarse, repeat, axis=0), repeat, axis=1)[:size, :size]
        fine = rng.normal(0, 6, size=(size, size, 3))
        return np.clip(base + blocky + fine, 0, 255)
    raise ValueError(f"background {kind!r} is unknown; use one of {BACKGROUNDS}")


def sample_object(rng: np.random.Generator, image_size: int) -> ShapeObject:
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    size = SIZES[rng.integers(len(SIZES))]
    radius = SIZE_RADIUS[size] * image_size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    cell = int(rng.integers(len(POSITIONS)))
    row, col = divmod(cell, 3)
    side = image_size / 3
    margin = CELL_MARGIN * side

    def centre(index: int) -> float:
        low = max(index * side + margin, radius)
        high = min((index + 1) * side - margin, image_size - radius)
        return rng.uniform(low, high)

    cx, cy = centre(col), centre(row)
    angle = rng.uniform(0, 2 * np.pi) if shape in ROTATES else 0.0
    base = np.array(COLOUR_RGB[colour])
    rgb = np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    return ShapeObject(
        shape=shape,
        colour=colour,
        size=size,
        position=POSITIONS[cell],
        cx=float(cx),
        cy=float(cy),
        radius=float(radius),
        angle=float(angle),
        rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
    )


def _labels(coverages: list[np.ndarray]) -> np.ndarray:
    """[S, S] int16: the topmost object covering at least half of each pixel, else -1."""
    labels = np.full(coverages[0].shape, -1, dtype=np.int16)
    for index, coverage in enumerate(coverages):
        labels[coverage >= 0.5] = index
    return labels


def _all_visible(coverages: list[np.ndarray], labels: np.ndarray) -> bool:
    for index, coverage in enumerate(coverages):
        own = int((coverage >= 0.5).sum())
        if own == 0 or int((labels == index).sum()) < MIN_VISIBLE * own:
            return False
    return True


def make_scene(rng: np.random.Generator, size: int, num_objects: int | None = None) -> Scene:
    """A random scene of `num_objects` (default: 2 to 6) objects on a random background."""
    if size < 16:
        raise ValueError(f"image size {size} is too small for the shapes world; use 16 or more")
    if num_objects is None:
        num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    if not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in [1, {MAX_OBJECTS}]; got {num_objects}")
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    antialias = bool(rng.random() < 0.5)
    canvas = _background(rng, size, background)

    objects: list[ShapeObject] = []
    coverages: list[np.ndarray] = []
    while len(objects) < num_objects:
        for _attempt in range(50):
            candidate = sample_object(rng, size)
            coverage = object_coverage(candidate, size, antialias)
            trial = [*coverages, coverage]
            if _all_visible(trial, _labels(trial)):
                objects.append(candidate)
                coverages.append(coverage)
                break
        else:
            break  # the image is too crowded for another object
    if len(objects) < min(num_objects, MIN_OBJECTS):
        raise RuntimeError("could not place the scene's objects; this is a bug in make_scene")

    for obj, coverage in zip(objects, coverages):
        alpha = coverage[..., None]
        canvas = canvas * (1 - alpha) + np.array(obj.rgb, dtype=np.float64) * alpha
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(
        image=image,
        labels=_labels(coverages),
        objects=objects,
        background=background,
        antialias=antialias,
    )


def dense_labels(scene: Scene, grid: int) -> dict[str, np.ndarray]:
    """Per-cell labels of a grid x grid feature map over the scene, one map per attribute.

    Cell (i, j) takes the object owning the pixel at its centre (row, column
    floor((i + 0.5) * S / grid), likewise j; the topmost object, as in Scene.labels) and gets
    the index of that object's value in ATTRIBUTES[name]; a cell over background gets
    len(ATTRIBUTES[name]), one past the last value. "position" is the object's position (the
    3x3 cell of its centre), not where the cell lies.
    Returns {name: [grid, grid] int64} for every name of ATTRIBUTES."""
    if grid < 1:
        raise ValueError(f"grid must be at least 1; got {grid}")
    centres = ((np.arange(grid) + 0.5) * scene.size / grid).astype(np.int64)  # [grid]
    centres = np.minimum(centres, scene.size - 1)
    owner = scene.labels[np.ix_(centres, centres)].astype(np.int64)  # [grid, grid], -1: none
    maps = {}
    for name, values in ATTRIBUTES.items():
        # one entry per object, then background last, so that owner -1 picks background
        lookup = [values.index(getattr(obj, name)) for obj in scene.objects] + [len(values)]
        maps[name] = np.asarray(lookup, dtype=np.int64)[owner]
    return maps
