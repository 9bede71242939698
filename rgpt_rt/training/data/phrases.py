"""What the shapes world says about its objects: answers and referring phrases, functions of the
objects alone (tasks.py asks the questions they answer).

    brief_answer(obj)                           "a large red circle"
    detailed_answer(objects, 0)                 "A large red circle at the top left, to the left of a small blue star."
    expression_text({"colour": "red", "shape": "star"}, rng)     "the red star"
    unique_description(candidates, 2, rng)      attribute values that fit candidates[2] alone
    refer_decider(candidates, values, target)   "position decides", "near miss in shape", ...
"""

from __future__ import annotations

import numpy as np

from rgpt_rt.training.data.shapes import ATTRIBUTES, ShapeObject

POSITION_PHRASE = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
NOUNS = ("shape", "object", "one")
# Attribute sets tried for a referring expression, most natural first (ShapesWorld.refer_keys
# may name others).
EXPRESSION_KEYS = (
    ("colour", "shape"),
    ("shape",),
    ("colour",),
    ("size", "shape"),
    ("size", "colour", "shape"),
    ("shape", "position"),
    ("colour", "position"),
    ("size", "colour", "shape", "position"),
)
# the order in which refer_decider names the attribute that decides a referring question
DECIDERS = ("position", "shape", "colour", "size")


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_values(obj: ShapeObject) -> dict[str, str]:
    """{"size": "large", "colour": "red", "shape": "circle", "position": "top left"}."""
    return {"size": obj.size, "colour": obj.colour, "shape": obj.shape, "position": obj.position}


# --- answers -----------------------------------------------------------------------------------


def brief_answer(obj: ShapeObject) -> str:
    return article(obj.phrase())


def relation(obj: ShapeObject, other: ShapeObject) -> str:
    """Where `obj` is relative to `other`, along the axis where they are further apart."""
    dx, dy = other.cx - obj.cx, other.cy - obj.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def nearest(objects: list[ShapeObject], index: int) -> ShapeObject:
    obj = objects[index]
    others = [o for k, o in enumerate(objects) if k != index]
    return min(others, key=lambda o: (o.cx - obj.cx) ** 2 + (o.cy - obj.cy) ** 2)


def detailed_answer(objects: list[ShapeObject], index: int) -> str:
    """'A large red circle at the top left, to the left of a small blue star.'"""
    obj = objects[index]
    text = article(obj.phrase())
    text = text[0].upper() + text[1:] + " " + POSITION_PHRASE[obj.position]
    if len(objects) > 1:
        other = nearest(objects, index)
        text += f", {relation(obj, other)} {article(other.phrase())}"
    return text + "."


# --- referring phrases -------------------------------------------------------------------------


def expression_text(values: dict[str, str], rng: np.random.Generator) -> str:
    """A referring phrase for attribute values: 'the large red circle at the top left',
    'the blue one', 'the star that is green', ..."""
    noun = values.get("shape") or NOUNS[rng.integers(len(NOUNS))]
    colour = values.get("colour")
    words = [values["size"]] if "size" in values else []
    relative = colour is not None and "shape" in values and rng.random() < 0.2
    if colour is not None and not relative:
        words.append(colour)
    words.append(noun)
    text = "the " + " ".join(words)
    if relative:
        text += f" that is {colour}"
    if "position" in values:
        text += " " + POSITION_PHRASE[values["position"]]
    return text


def matches(obj: ShapeObject, values: dict[str, str]) -> bool:
    attributes = object_values(obj)
    return all(attributes[key] == value for key, value in values.items())


def unique_description(
    candidates: list[ShapeObject],
    target: int,
    rng: np.random.Generator,
    keys: tuple[tuple[str, ...], ...] = EXPRESSION_KEYS,
) -> dict[str, str] | None:
    """Attribute values of candidates[target] that no other candidate shares, naming one of
    the attribute sets `keys`, or None."""
    order = rng.permutation(len(keys))
    for k in order:
        values = {key: object_values(candidates[target])[key] for key in keys[k]}
        if sum(matches(c, values) for c in candidates) == 1:
            return values
    return None


def absent_description(
    candidates: list[ShapeObject],
    rng: np.random.Generator,
    keys: tuple[tuple[str, ...], ...] = EXPRESSION_KEYS,
) -> dict[str, str] | None:
    """Attribute values that fit no candidate: one candidate's description (one of the
    attribute sets `keys`) with one value changed (a near miss), or None when no attempt
    succeeds."""
    for _attempt in range(20):
        base = candidates[rng.integers(len(candidates))]
        chosen = keys[rng.integers(len(keys))]
        values = near_miss({key: object_values(base)[key] for key in chosen}, rng)
        if not any(matches(c, values) for c in candidates):
            return values
    return None


def near_miss(
    values: dict[str, str], rng: np.random.Generator, changed: str | None = None
) -> dict[str, str]:
    """`values` with one of them (`changed`, else drawn at random) changed to another value of
    its attribute."""
    if changed is None:
        changed = tuple(values)[rng.integers(len(values))]
    options = [v for v in ATTRIBUTES[changed] if v != values[changed]]
    return {**values, changed: options[rng.integers(len(options))]}


def fits_without(candidates: list[ShapeObject], values: dict[str, str], key: str) -> int:
    """How many candidates `values` would fit without its `key`."""
    return sum(matches(c, {k: v for k, v in values.items() if k != key}) for c in candidates)


def refer_decider(candidates: list[ShapeObject], values: dict[str, str], target: int | None) -> str:
    """What a referring question turns on: with no fit (target None), 'near miss in position'
    when a candidate differs from the phrase in position alone; with one, 'position decides'
    when without position another candidate would fit too, else 'any attribute' (each named
    attribute could be left out). The first of DECIDERS that applies is named."""
    for key in DECIDERS:
        if key not in values:
            continue
        fits = fits_without(candidates, values, key)
        if target is None and fits:
            return f"near miss in {key}"
        if target is not None and fits > 1:
            return f"{key} decides"
    return "far miss" if target is None else "any attribute"
