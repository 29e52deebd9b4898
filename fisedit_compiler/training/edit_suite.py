"""An editing suite on the embedded shapes model, in the PIE-Bench manner: cases drawn from the caption grammar by a
fixed seed, one per (edit type, case), and a judge that says whether an edited picture did what was typed.

    cases = edit_cases(per_type=20)                      # colour, shape, size, add, remove, background
    verdict = judge(case, source_image, edited_image)    # success, object kept in place (IoU), what was found

A case is a source prompt, an edited prompt, the edited words and a generation seed. The source picture is the
model's generation, so the "ground truth" of an object is what the pixel evaluator finds in it (`find_objects`):
the model, not the scene generator, drew it. Success: the edited object shows the new attribute (or is gone, or is
new), and every other object of the source is still there, with its colour and shape, its centre within
`PLACE_TOLERANCE` pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .evaluator import FoundObject, find_objects
from .shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, with_article

EDIT_TYPES = ("colour", "shape", "size", "add", "remove", "background")
PLACE_TOLERANCE = 6.0  # pixels (of 128) an unchanged object's centre may move
SIZE_SLACK = 4  # pixels of bounding-box side beyond a size word's range that still read as that size
# Fewer pixels than the smallest object the scene generator draws (a small triangle, about 150): a fragment, e.g. the
# orange rim of a cross the model drew mostly yellow, not the object a caption names.
MIN_OBJECT_PIXELS = 120


@dataclasses.dataclass(frozen=True)
class SceneObjectSpec:
    colour: str
    shape: str
    size: str | None = None  # None: not named in the caption

    def phrase(self) -> str:
        words = ([self.size] if self.size else []) + [self.colour, self.shape]
        return with_article(" ".join(words))


@dataclasses.dataclass(frozen=True)
class EditCase:
    """One edit: `objects` of the source (the first is the edited one, except for "add", where `new` is added),
    `background` before and `new_background` after, and the new object or attribute in `new`."""

    type: str
    objects: tuple[SceneObjectSpec, ...]
    new: SceneObjectSpec | None
    background: str
    new_background: str
    seed: int

    @staticmethod
    def caption(objects, background: str) -> str:
        phrases = [o.phrase() for o in objects]
        return " and ".join(phrases) + f" on a {background} background"

    @property
    def source_prompt(self) -> str:
        return self.caption(self.objects, self.background)

    @property
    def edited_objects(self) -> tuple[SceneObjectSpec, ...]:
        if self.type == "add":
            return (*self.objects, self.new)
        if self.type == "remove":
            return self.objects[1:]
        if self.type == "background":
            return self.objects
        return (self.new, *self.objects[1:])

    @property
    def edited_prompt(self) -> str:
        return self.caption(self.edited_objects, self.new_background)

    @property
    def edited_words(self) -> tuple[str, ...]:
        before, after = self.source_prompt.split(), self.edited_prompt.split()
        return tuple(w for w in after if w not in before) or tuple(w for w in before if w not in after)


def edit_cases(per_type: int = 20, seed: int = 0, types: tuple[str, ...] = EDIT_TYPES) -> list[EditCase]:
    """`per_type` cases of each type, drawn from the grammar by `seed`: one or two objects (distinct colours and
    shapes) on a plain background; half of the single-object cases of a size edit name the size."""
    rng = np.random.default_rng(seed)
    colours = [c for c in COLOURS if c not in ("gray", "white", "black")]  # visible on every background
    cases = []
    for kind in types:
        for i in range(per_type):
            count = {"add": 1, "remove": 2}.get(kind) or 1 + int(rng.random() < 0.3)
            picked_colours = rng.choice(colours, size=count + 1, replace=False)
            picked_shapes = rng.choice(SHAPES, size=count + 1, replace=count + 1 > len(SHAPES))
            size = str(rng.choice(list(SIZES))) if kind == "size" else None
            objects = tuple(SceneObjectSpec(str(c), str(s), size if j == 0 else None)
                            for j, (c, s) in enumerate(zip(picked_colours[:count], picked_shapes[:count])))
            first = objects[0]
            new, background, new_background = None, "gray", "gray"
            if kind == "colour":
                new = dataclasses.replace(first, colour=str(picked_colours[count]))
            elif kind == "shape":
                shape = str(rng.choice([s for s in SHAPES if s != first.shape]))
                new = dataclasses.replace(first, shape=shape)
            elif kind == "size":
                new = dataclasses.replace(first, size="big" if first.size == "small" else "small")
            elif kind == "add":
                new = SceneObjectSpec(str(picked_colours[count]), str(picked_shapes[count]))
            elif kind == "background":
                new_background = str(rng.choice([b for b in BACKGROUNDS if b != "gray"]))
            cases.append(EditCase(kind, objects, new, background, new_background, seed=1000 * seed + i))
    return cases


def _centre(obj: FoundObject) -> np.ndarray:
    ys, xs = np.nonzero(obj.mask)
    return np.array([ys.mean(), xs.mean()])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _side(obj: FoundObject) -> int:
    y0, x0, y1, x1 = obj.bbox
    return max(y1 - y0, x1 - x0)


def source_objects(case: EditCase, image) -> dict[int, FoundObject] | None:
    """The source picture's objects by index into `case.objects` (largest found with that colour and shape), or
    None when one is missing (or only a fragment of it, under `MIN_OBJECT_PIXELS`, is there): the model did not
    draw the source, and the case says nothing about editing."""
    found = find_objects(image, case.background)
    chosen: dict[int, FoundObject] = {}
    for i, spec in enumerate(case.objects):
        match = next((o for o in found if (o.colour, o.shape) == (spec.colour, spec.shape)
                      and o.pixels >= MIN_OBJECT_PIXELS), None)
        if match is None:
            return None
        chosen[i] = match
    return chosen


def judge(case: EditCase, source: dict[int, FoundObject], edited_image) -> dict[str, Any]:
    """Whether `edited_image` did what `case` typed, given the source's objects (`source_objects`): "success",
    "iou" (attribute edits: of the edited object's mask with the source object's), "found"."""
    found = find_objects(edited_image, case.new_background if case.type == "background" else case.background)
    # every source object but the edited one (the first) must stay; adding or recolouring the background edits none
    unchanged = range(len(case.objects)) if case.type in ("add", "background") else range(1, len(case.objects))
    kept = all(any((o.colour, o.shape) == (case.objects[i].colour, case.objects[i].shape)
                   and np.linalg.norm(_centre(o) - _centre(source[i])) <= PLACE_TOLERANCE for o in found)
               for i in unchanged)
    result: dict[str, Any] = {"found": [(o.colour, o.shape, o.bbox) for o in found], "others_kept": kept}
    if case.type in ("colour", "shape", "size"):
        old = source[0]
        overlapping = sorted(found, key=lambda o: -_iou(o.mask, old.mask))
        edited = overlapping[0] if overlapping and _iou(overlapping[0].mask, old.mask) > 0 else None
        if edited is None:
            attribute = False
        elif case.type == "size":
            low, high = SIZES[case.new.size]
            attribute = (edited.colour, edited.shape) == (case.new.colour, case.new.shape) and \
                low - SIZE_SLACK <= _side(edited) <= high + SIZE_SLACK
        else:
            attribute = (edited.colour, edited.shape) == (case.new.colour, case.new.shape)
        result["iou"] = _iou(edited.mask, old.mask) if edited is not None else 0.0
        result["attribute"] = attribute
    elif case.type == "add":
        result["attribute"] = any((o.colour, o.shape) == (case.new.colour, case.new.shape) for o in found)
    elif case.type == "remove":
        gone = case.objects[0]
        result["attribute"] = not any(o.colour == gone.colour and _iou(o.mask, source[0].mask) > 0.2 for o in found)
    else:
        result["attribute"] = _background_name(edited_image) == case.new_background
    result["success"] = bool(result["attribute"] and kept)
    return result


def _background_name(image) -> str:
    from .evaluator import _as_rgb, _background_name as name

    return name(_as_rgb(image))
