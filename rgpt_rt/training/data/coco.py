"""COCO-format region data -> region samples for fine-tuning.

    data = CocoRegions("instances.json", "images/", seed=0)
    sample = data.sample(index)          # one image, 1-5 of its regions, one task turn
    mask = decode_rle(annotation["segmentation"])      # [H, W] bool (rgpt_rt.rle)

Annotations are read as instance masks from RLE (compressed string or uncompressed counts,
column-major as COCO stores them), from polygons, or, when an annotation has no segmentation
at all, from its bbox (a rectangle mask). Crowd annotations, unknown images or categories,
boxes outside the image and empty segmentations are skipped and counted in one
`SkippedAnnotations` warning, never a crash.

Tasks: classify (the paper's prompt; answer: the category name), brief description
("a person"), and referring among 2-5 regions of one image ("the dog" -> Region [k], or the
no-match answer when the category is among none of them).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from rgpt_rt.inputs import box_to_mask, load_image
from rgpt_rt.prompts import classify_prompt, describe_prompt, refer_answer, refer_prompt
from rgpt_rt.rle import decode_rle
from rgpt_rt.training.data.samples import RegionSample, Turn

COCO_TASKS = ("classify", "brief", "refer")
NEGATIVE_RATE = 0.2


class SkippedAnnotations(UserWarning):
    """Some annotations of a COCO-format file could not be used."""


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons ([x1, y1, x2, y2, ...] each, in pixels) -> [H, W] bool, their union."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = [(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon) - 1, 2)]
        draw.polygon(points, fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8) != 0


# --- annotations ---------------------------------------------------------------------------------


@dataclass
class Region:
    category: str
    segmentation: Any  # RLE dict, polygon list, or None for a box
    bbox: tuple[float, float, float, float]  # x, y, w, h

    def mask(self, height: int, width: int) -> np.ndarray:
        if self.segmentation is None:
            x, y, w, h = self.bbox
            return box_to_mask((x, y, x + w, y + h), (height, width))
        if isinstance(self.segmentation, dict):
            return decode_rle(self.segmentation)
        return polygons_to_mask(self.segmentation, height, width)


@dataclass
class CocoImage:
    path: Path
    height: int
    width: int
    regions: list[Region]


def _problem(annotation: dict, image: dict | None, categories: dict[int, str]) -> str | None:
    """Why an annotation cannot be used, or None when it can."""
    if image is None:
        return "unknown image"
    if annotation.get("category_id") not in categories:
        return "unknown category"
    if annotation.get("iscrowd", 0):
        return "crowd"
    height, width = int(image["height"]), int(image["width"])
    bbox = annotation.get("bbox")
    if bbox is not None:
        if len(bbox) != 4 or not all(np.isfinite(bbox)):
            return "malformed bbox"
        x, y, w, h = bbox
        if w <= 0 or h <= 0 or x >= width or y >= height or x + w <= 0 or y + h <= 0:
            return "outside the image"
    segmentation = annotation.get("segmentation")
    if segmentation is None:
        return None if bbox is not None else "no segmentation and no bbox"
    if isinstance(segmentation, dict):
        if [int(v) for v in segmentation.get("size", [])] != [height, width]:
            return "mask size differs from the image"
        try:
            mask = decode_rle(segmentation)
        except (ValueError, KeyError, TypeError):
            return "malformed RLE"
        return None if mask.any() else "empty segmentation"
    if not isinstance(segmentation, list):
        return "malformed segmentation"
    polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
    if not polygons:
        return "empty segmentation"
    if not polygons_to_mask(polygons, height, width).any():
        return "outside the image"
    return None


def load_coco(path: str | Path, image_root: str | Path) -> tuple[list[CocoImage], list[str]]:
    """The images that keep at least one usable region, and the category names. Unusable
    annotations are counted in one SkippedAnnotations warning."""
    path, image_root = Path(path), Path(image_root)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path} has no {key!r} list; it must be a COCO instances file")
    categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    images = {int(i["id"]): i for i in data["images"]}
    regions: dict[int, list[Region]] = {}
    skipped: Counter[str] = Counter()
    for annotation in data["annotations"]:
        image = images.get(int(annotation.get("image_id", -1)))
        problem = _problem(annotation, image, categories)
        if problem is not None:
            skipped[problem] += 1
            continue
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, list):
            segmentation = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        regions.setdefault(int(image["id"]), []).append(
            Region(
                category=categories[int(annotation["category_id"])],
                segmentation=segmentation,
                bbox=tuple(float(v) for v in annotation.get("bbox") or (0, 0, 0, 0)),
            )
        )
    if skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
        warnings.warn(
            f"{path}: skipped {sum(skipped.values())} of {len(data['annotations'])} annotations "
            f"({reasons})",
            SkippedAnnotations,
            stacklevel=2,
        )
    out = [
        CocoImage(
            path=image_root / images[image_id]["file_name"],
            height=int(images[image_id]["height"]),
            width=int(images[image_id]["width"]),
            regions=found,
        )
        for image_id, found in sorted(regions.items())
    ]
    if not out:
        raise ValueError(f"{path} holds no usable region annotation")
    return out, sorted(set(categories.values()))


# --- samples -------------------------------------------------------------------------------------


class CocoRegions:
    """Region samples from a COCO-format file. Sample `index` depends only on (seed, index)."""

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path,
        seed: int = 0,
        vocabulary: str = "COCO-80",
    ):
        self.images, self.categories = load_coco(path, image_root)
        self.seed = seed
        self.vocabulary = vocabulary

    def sample(self, index: int) -> RegionSample:
        rng = np.random.default_rng([self.seed, index])
        task = COCO_TASKS[rng.integers(len(COCO_TASKS))]
        return self._task_sample(rng, task)

    def task_samples(self, per_task: int) -> list[RegionSample]:
        out = []
        for number, task in enumerate(COCO_TASKS):
            for index in range(per_task):
                rng = np.random.default_rng([self.seed, number + 1, index])
                out.append(self._task_sample(rng, task))
        return out

    def _load(self, image: CocoImage) -> tuple[np.ndarray, list[np.ndarray]]:
        pixels = load_image(image.path)
        if pixels.shape[:2] != (image.height, image.width):
            raise ValueError(
                f"{image.path} is {pixels.shape[1]}x{pixels.shape[0]} but the annotation file "
                f"says {image.width}x{image.height}; fix the file's width/height"
            )
        return pixels, [r.mask(image.height, image.width) for r in image.regions]

    def _task_sample(self, rng: np.random.Generator, task: str) -> RegionSample:
        if task == "refer":
            several = [im for im in self.images if len(im.regions) >= 2]
            if not several:
                task = "classify"  # referring needs two regions in one image
        if task != "refer":
            image = self.images[rng.integers(len(self.images))]
            pixels, masks = self._load(image)
            k = int(rng.integers(len(masks)))
            name = image.regions[k].category
            truth = {"category": name}
            if task == "classify":
                turn = Turn(classify_prompt(self.vocabulary), name, task, truth)
            else:
                article = "an" if name[0].lower() in "aeiou" else "a"
                turn = Turn(describe_prompt(detailed=False), f"{article} {name}", task, truth)
            return RegionSample(image=pixels, masks=[masks[k]], turns=[turn], boxes=[False])

        image = several[rng.integers(len(several))]
        pixels, masks = self._load(image)
        count = int(rng.integers(2, min(len(masks), 5) + 1))
        picked = [int(i) for i in rng.permutation(len(masks))[:count]]
        names = [image.regions[i].category for i in picked]
        unique = [j for j, name in enumerate(names) if names.count(name) == 1]
        absent = [c for c in self.categories if c not in names]
        if not unique and not absent:
            return self._task_sample(rng, "classify")  # no phrase singles out one region
        if unique and (not absent or rng.random() >= NEGATIVE_RATE):
            target = unique[rng.integers(len(unique))]
            expression = f"the {names[target]}"
        else:
            target = None
            expression = f"the {absent[rng.integers(len(absent))]}"
        turn = Turn(
            refer_prompt(expression, count),
            refer_answer(target),
            "refer",
            {"categories": names, "target": target},
        )
        return RegionSample(
            image=pixels, masks=[masks[i] for i in picked], turns=[turn], boxes=[False] * count
        )
