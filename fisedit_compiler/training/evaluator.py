"""Find the objects in a shape-scene image from pixel statistics alone (no learned classifier).

Used to check what a generated or edited image shows: which colours and shapes, where.  The steps:

1. background: the named one, or estimated from the image border (its median colour, the nearest background
   tone names it; an object colour with the background's name is then not looked for);
2. each pixel takes the nearest colour among the object palette and the background tones, or none when it is far
   from all of them (the mixed colours of anti-aliased edges); stray pixels take their neighbours' colour;
3. connected components (8-neighbourhood) of same-colour pixels, found by propagating the largest pixel id through
   each component; components under ``min_pixels`` are dropped;
4. each component's shape is the nearest template (circle, square, triangle, cross), comparing the masks cropped
   to their bounding boxes and resampled to 16x16.

    found = find_objects(image)                       # [FoundObject(colour, shape, bbox, mask, ...)]
    count_matches(found, [("red", "circle")])         # how many wanted (colour, shape) pairs are there
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .shapes import BACKGROUNDS, COLOURS, SHAPES, SceneObject, inside_shape

__all__ = ["FoundObject", "count_matches", "find_objects", "match_objects", "shape_templates"]

TEMPLATE_SIZE = 16  # side of the resampled masks compared with the shape templates
BORDER = 2  # width of the image frame the background is estimated from


@dataclass
class FoundObject:
    """An object found in an image: ``bbox`` (y0, x0, y1, x1), end exclusive; ``mask`` (H, W) bool.

    ``shape_distance`` is the mean absolute difference to the chosen template (0: a perfect match, about 0.2 and
    more: the component hardly looks like any shape).
    """

    colour: str
    shape: str
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    pixels: int
    shape_distance: float


def _as_rgb(image) -> np.ndarray:
    """An (H, W, 3) float32 array in [0, 255] from a PIL image, an (H, W, 3) array, or a (3, H, W) tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        array = image.detach().float().cpu()
        if array.ndim == 3 and array.shape[0] == 3:
            array = array.permute(1, 2, 0)
        array = array.numpy() * 255.0
    else:
        array = np.asarray(image)
        array = array.astype(np.float32) * (255.0 if array.dtype.kind == "f" else 1.0)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {tuple(np.shape(image))}")
    return array.astype(np.float32)


def _background_name(rgb: np.ndarray) -> str:
    """The background whose tones are nearest the median colour of the image border."""
    border = np.concatenate([
        rgb[:BORDER].reshape(-1, 3), rgb[-BORDER:].reshape(-1, 3),
        rgb[:, :BORDER].reshape(-1, 3), rgb[:, -BORDER:].reshape(-1, 3),
    ])
    median = np.median(border, axis=0)
    distance = {name: min(np.linalg.norm(median - np.array(tone)) for tone in tones)
                for name, tones in BACKGROUNDS.items()}
    return min(distance, key=distance.get)


def _remove_stray_pixels(labels: np.ndarray, classes: int) -> np.ndarray:
    """A pixel whose label fewer than 3 of its 3x3 neighbourhood share takes the neighbourhood's most frequent label.

    (A plain majority filter would also erase the corner pixels of squares, which share their label with 4 of 9.)
    """
    height, width = labels.shape
    one_hot = np.pad(labels[None] == np.arange(classes)[:, None, None], ((0, 0), (1, 1), (1, 1))).astype(np.int32)
    counts = sum(one_hot[:, dy: dy + height, dx: dx + width] for dy in range(3) for dx in range(3))
    own_count = np.take_along_axis(counts, labels[None], axis=0)[0]
    return np.where(own_count >= 3, labels, counts.argmax(axis=0))


def _connected_components(labels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Component ids (>= 1) of the 8-connected same-label regions of ``foreground``; 0 elsewhere.

    Every foreground pixel starts with its own id and repeatedly takes the largest id among its same-label
    neighbours, until nothing changes: each component ends with one id.
    """
    height, width = labels.shape
    ids = np.where(foreground, np.arange(1, height * width + 1).reshape(height, width), 0)
    fg_labels = np.pad(np.where(foreground, labels, -1), 1, constant_values=-1)
    shifts = [(dy, dx) for dy in range(3) for dx in range(3) if (dy, dx) != (1, 1)]
    same_label = [(fg_labels[dy: dy + height, dx: dx + width] == fg_labels[1:-1, 1:-1]) & foreground
                  for dy, dx in shifts]
    while True:
        padded = np.pad(ids, 1)
        new_ids = ids.copy()
        for (dy, dx), same in zip(shifts, same_label):
            np.maximum(new_ids, np.where(same, padded[dy: dy + height, dx: dx + width], 0), out=new_ids)
        if np.array_equal(new_ids, ids):
            return ids
        ids = new_ids


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the true pixels of a non-empty ``mask``, end exclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _normalised_mask(mask: np.ndarray) -> np.ndarray:
    """``mask`` cropped to its bounding box and area-resampled to TEMPLATE_SIZE x TEMPLATE_SIZE (values in [0, 1])."""
    y0, x0, y1, x1 = _bbox(mask)
    crop = mask[y0:y1, x0:x1].astype(np.float32)
    height, width = crop.shape
    # Exact area resampling: repeat each pixel TEMPLATE_SIZE times per axis, then average blocks of height x width.
    upsampled = np.repeat(np.repeat(crop, TEMPLATE_SIZE, axis=0), TEMPLATE_SIZE, axis=1)
    return upsampled.reshape(TEMPLATE_SIZE, height, TEMPLATE_SIZE, width).mean(axis=(1, 3))


def shape_templates(side: int = 64) -> dict[str, np.ndarray]:
    """Each shape's mask drawn at ``side`` pixels and normalised like a found component's."""
    centres = (np.arange(side) + 0.5) / side * 2 - 1
    return {shape: _normalised_mask(inside_shape(shape, centres[None, :], centres[:, None])) for shape in SHAPES}


_TEMPLATES = shape_templates()


def find_objects(
    image, background: str | None = None, min_pixels: int = 40, max_colour_distance: float = 90.0
) -> list[FoundObject]:
    """The objects in ``image`` (a shape scene), largest first.

    ``background``: the background's name if known (e.g. "gray"); otherwise it is estimated from the border.
    ``min_pixels``: smaller components are noise (the smallest drawn object, a small triangle, has about 150).
    ``max_colour_distance``: a pixel further (RGB, 0-255) from every palette colour and background tone belongs to
    nothing; the palette colours are at least 110 apart, and a half-covered edge pixel is about 100 from both of
    its colours, so edges do not grow objects by a pixel or join as thin objects of a third colour.
    """
    rgb = _as_rgb(image)
    if background is None:
        background = _background_name(rgb)
    elif background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
    object_colours = [name for name in COLOURS if name != background]
    references = np.array([COLOURS[name] for name in object_colours] + list(BACKGROUNDS[background]), np.float32)
    distances = np.linalg.norm(rgb[:, :, None, :] - references[None, None], axis=-1)
    unknown = len(references)  # far from every reference: a mixed edge colour, or noise
    nearest = np.where(distances.min(axis=-1) <= max_colour_distance, distances.argmin(axis=-1), unknown)
    labels = _remove_stray_pixels(nearest, len(references) + 1)
    foreground = labels < len(object_colours)
    ids = _connected_components(labels, foreground)

    found = []
    component_ids, sizes = np.unique(ids[foreground], return_counts=True)
    for component, size in zip(component_ids.tolist(), sizes.tolist()):
        if size < min_pixels:
            continue
        mask = ids == component
        normalised = _normalised_mask(mask)
        shape_distances = {shape: float(np.abs(normalised - template).mean()) for shape, template in _TEMPLATES.items()}
        shape = min(shape_distances, key=shape_distances.get)
        colour = object_colours[int(labels[mask][0])]
        found.append(FoundObject(colour, shape, _bbox(mask), mask, size, shape_distances[shape]))
    return sorted(found, key=lambda obj: -obj.pixels)


def match_objects(
    found: list[FoundObject], expected: list[SceneObject], min_iou: float = 0.5
) -> list[tuple[SceneObject, FoundObject | None]]:
    """Pair each expected object with the found object whose mask overlaps it most (IoU >= ``min_iou``), or None."""
    pairs = []
    for target in expected:
        best, best_iou = None, min_iou
        for candidate in found:
            union = np.logical_or(target.mask, candidate.mask).sum()
            iou = np.logical_and(target.mask, candidate.mask).sum() / max(union, 1)
            if iou >= best_iou:
                best, best_iou = candidate, iou
        pairs.append((target, best))
    return pairs


def count_matches(found: list[FoundObject], wanted: list[tuple[str, str]]) -> int:
    """How many of the ``wanted`` (colour, shape) pairs are among the found objects (as multisets)."""
    have = Counter((obj.colour, obj.shape) for obj in found)
    return sum((Counter(wanted) & have).values())
