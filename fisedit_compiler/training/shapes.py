"""Procedural shape scenes: the training data of the embedded text-to-image model.

A scene is a 128x128 RGB image of one to three objects (a shape in a colour and a size, at a random place, never
overlapping) on a plain or textured background, with a caption a user could type ("a big red circle and a small
blue square on a gray background") and, per object, its bounding box and pixel mask.  Everything is drawn from a
numpy ``Generator``, so a seed gives the same scene on every machine::

    scene = sample_scene(7)                      # seeded
    scene = render_scene(np.random.default_rng(7))  # the same scene
    scene = scene_from_description([ObjectSpec("circle", "red", "big", (64, 64), 44)], background="gray")

The palette, shapes and sizes are chosen so that pixel statistics alone tell them apart (see ``evaluator.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "GRAMMAR_WORDS",
    "IMAGE_SIZE",
    "ObjectSpec",
    "Scene",
    "SceneObject",
    "SceneSpec",
    "SHAPES",
    "SIZES",
    "TEXTURES",
    "caption_for",
    "inside_shape",
    "render",
    "render_scene",
    "sample_scene",
    "sample_spec",
    "scene_from_description",
    "with_article",
]

IMAGE_SIZE = 128

# Fill ratios of the bounding box: circle 0.79, square 1.0, triangle 0.5, cross 0.64 (arms 0.4 of the side), and the
# cross is the only one with four empty corners, so each is recognisable from its mask.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
CROSS_ARM = 0.4  # arm width as a fraction of the side

# Object colours, far apart in RGB (every pair at least ~110 apart).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 130, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}

# Background colours: the base tone and the second tone of its textures (close to the base, so that a textured
# background still reads as "gray"/"white"/"black").  An object never has the background's colour name.
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "gray": ((128, 128, 128), (100, 100, 100)),
    "white": ((238, 238, 238), (208, 208, 208)),
    "black": ((30, 30, 30), (60, 60, 60)),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered")
TEXTURE_PERIOD = 16  # pixels per stripe pair / checker pair

# Side of the object's bounding box in pixels, per size word (inclusive range).
SIZES: dict[str, tuple[int, int]] = {"small": (18, 26), "big": (36, 50)}

# Scene statistics.
OBJECT_COUNT_PROBS = (0.5, 0.3, 0.2)  # 1, 2, 3 objects
TEXTURE_PROBS = (0.6, 0.2, 0.2)  # plain, striped, checkered
MARGIN = 4  # free pixels between an object and the image border
GAP = 6  # free pixels between two objects' bounding boxes
SUPERSAMPLING = 4  # anti-aliasing: sub-pixels per pixel side

# Caption grammar choices.
P_SIZE_WORD = 0.5  # an object phrase says its size
P_BACKGROUND_PHRASE = 0.7  # the caption names the background

# Every word a caption can contain: the text model's tokenizer makes each one token.
GRAMMAR_WORDS: tuple[str, ...] = (
    "a", "an", "and", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS, *SIZES, "striped", "checkered",
)
_TEXTURE_WORDS = {"plain": "", "striped": "striped ", "checkered": "checkered "}


@dataclass(frozen=True)
class ObjectSpec:
    """One object to draw: ``centre`` is (y, x) in pixels, ``side`` the side of its bounding box in pixels."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    side: int


@dataclass(frozen=True)
class SceneSpec:
    """What a scene contains; ``texture_phase`` shifts the background texture (pixels)."""

    objects: tuple[ObjectSpec, ...]
    background: str = "gray"
    texture: str = "plain"
    texture_phase: int = 0


@dataclass
class SceneObject:
    """A drawn object: ``bbox`` is (y0, x0, y1, x1), end exclusive; ``mask`` (H, W) bool marks its pixels."""

    shape: str
    colour: str
    size: str
    bbox: tuple[int, int, int, int]
    mask: np.ndarray


@dataclass
class Scene:
    """A rendered scene: ``image`` (H, W, 3) uint8, its caption, its objects and the spec it was drawn from."""

    image: np.ndarray
    caption: str
    objects: list[SceneObject]
    spec: SceneSpec


def inside_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points at normalised coordinates (u right, v down, both in [-1, 1] over the box) are in ``shape``."""
    in_box = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return in_box
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return in_box & (np.abs(u) <= (v + 1) / 2)
    if shape == "cross":
        return in_box & ((np.abs(u) <= CROSS_ARM) | (np.abs(v) <= CROSS_ARM))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _background(spec: SceneSpec) -> np.ndarray:
    """The (H, W, 3) float32 background of ``spec``."""
    if spec.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {spec.background!r}; expected one of {tuple(BACKGROUNDS)}")
    base, second = (np.array(c, dtype=np.float32) for c in BACKGROUNDS[spec.background])
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    half = TEXTURE_PERIOD // 2
    if spec.texture == "plain":
        second_tone = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    elif spec.texture == "striped":  # diagonal stripes
        second_tone = ((xx + yy + spec.texture_phase) // half) % 2 == 1
    elif spec.texture == "checkered":
        second_tone = (((xx + spec.texture_phase) // half) + ((yy + spec.texture_phase) // half)) % 2 == 1
    else:
        raise ValueError(f"unknown texture {spec.texture!r}; expected one of {TEXTURES}")
    return np.where(second_tone[..., None], second, base).astype(np.float32)


def _coverage(obj: ObjectSpec) -> np.ndarray:
    """The (H, W) fraction of each pixel covered by ``obj``, from SUPERSAMPLING² sub-pixel samples."""
    cy, cx = obj.centre
    half = obj.side / 2
    y0, x0 = max(int(np.floor(cy - half)) - 1, 0), max(int(np.floor(cx - half)) - 1, 0)
    y1, x1 = min(int(np.ceil(cy + half)) + 1, IMAGE_SIZE), min(int(np.ceil(cx + half)) + 1, IMAGE_SIZE)
    offsets = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1)
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1)
    v, u = (ys[:, None] - cy) / half, (xs[None, :] - cx) / half
    inside = inside_shape(obj.shape, u, v).astype(np.float32)
    pooled = inside.reshape(y1 - y0, SUPERSAMPLING, x1 - x0, SUPERSAMPLING).mean(axis=(1, 3))
    coverage = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    coverage[y0:y1, x0:x1] = pooled
    return coverage


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the true pixels of ``mask``, end exclusive; (0, 0, 0, 0) when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def render(spec: SceneSpec) -> tuple[np.ndarray, list[SceneObject]]:
    """Draw ``spec``: the (H, W, 3) uint8 image (anti-aliased edges) and its objects with their masks.

    An object's mask is the pixels it covers at least half of (later objects are drawn over earlier ones and take
    those pixels from their masks, should they overlap).
    """
    image = _background(spec)
    objects: list[SceneObject] = []
    for obj in spec.objects:
        if obj.colour not in COLOURS:
            raise ValueError(f"unknown colour {obj.colour!r}; expected one of {tuple(COLOURS)}")
        coverage = _coverage(obj)
        colour = np.array(COLOURS[obj.colour], dtype=np.float32)
        image = coverage[..., None] * colour + (1 - coverage[..., None]) * image
        mask = coverage >= 0.5
        for earlier in objects:
            earlier.mask &= ~mask
        objects.append(SceneObject(obj.shape, obj.colour, obj.size, (0, 0, 0, 0), mask))
    for drawn in objects:
        drawn.bbox = _bbox(drawn.mask)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def _boxes_apart(a: ObjectSpec, b: ObjectSpec) -> bool:
    """Whether the bounding boxes of ``a`` and ``b`` are at least GAP pixels apart along some axis."""
    reach = (a.side + b.side) / 2 + GAP
    return abs(a.centre[0] - b.centre[0]) >= reach or abs(a.centre[1] - b.centre[1]) >= reach


def sample_spec(rng: np.random.Generator) -> SceneSpec:
    """Draw a scene spec: 1-3 objects with distinct (colour, shape), none overlapping, on a background.

    An object that finds no free place in 50 tries is left out (rare: three big objects still fit easily).
    """
    background = str(rng.choice(list(BACKGROUNDS)))
    texture = str(rng.choice(TEXTURES, p=TEXTURE_PROBS))
    texture_phase = int(rng.integers(TEXTURE_PERIOD))
    count = int(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS)) + 1
    colours = [c for c in COLOURS if c != background]
    objects: list[ObjectSpec] = []
    for _ in range(count):
        taken = {(o.colour, o.shape) for o in objects}
        while True:
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(colours))
            if (colour, shape) not in taken:
                break
        size = str(rng.choice(list(SIZES)))
        side = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        low, high = side / 2 + MARGIN, IMAGE_SIZE - side / 2 - MARGIN
        for _ in range(50):
            centre = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
            candidate = ObjectSpec(shape, colour, size, centre, side)
            if all(_boxes_apart(candidate, other) for other in objects):
                objects.append(candidate)
                break
    return SceneSpec(tuple(objects), background, texture, texture_phase)


def with_article(phrase: str) -> str:
    """Prefix the article: "an orange circle", "a red circle"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases: list[str]) -> str:
    """Join object phrases: "A", "A and B", "A, B and C"."""
    return " and ".join(phrases) if len(phrases) <= 2 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_for(spec: SceneSpec, rng: np.random.Generator) -> str:
    """A caption of ``spec`` from the grammar, drawn from ``rng``.

    Every object is named with its colour and shape (in a random order), half the time with its size; 70% of captions
    name the background, with its texture: "a big red circle, a blue square and a green cross on a gray striped
    background".
    """
    phrases = []
    for index in rng.permutation(len(spec.objects)):
        obj = spec.objects[int(index)]
        size_word = f"{obj.size} " if rng.random() < P_SIZE_WORD else ""
        phrases.append(with_article(f"{size_word}{obj.colour} {obj.shape}"))
    caption = _join(phrases)
    if rng.random() < P_BACKGROUND_PHRASE:
        caption += f" on a {spec.background} {_TEXTURE_WORDS[spec.texture]}background"
    return caption


def render_scene(rng: np.random.Generator) -> Scene:
    """Draw a spec and a caption from ``rng`` and render them."""
    spec = sample_spec(rng)
    caption = caption_for(spec, rng)
    image, objects = render(spec)
    return Scene(image, caption, objects, spec)


def sample_scene(seed: int) -> Scene:
    """The scene of ``seed`` (``render_scene`` on ``np.random.default_rng(seed)``)."""
    return render_scene(np.random.default_rng(seed))


def scene_from_description(
    objects: list[ObjectSpec] | tuple[ObjectSpec, ...],
    background: str = "gray",
    texture: str = "plain",
    texture_phase: int = 0,
    caption: str | None = None,
) -> Scene:
    """Render a scene of known content (for tests and edit evaluation).

    ``caption`` defaults to the full grammar caption: every size word, the background named.
    """
    spec = SceneSpec(tuple(objects), background, texture, texture_phase)
    for obj in spec.objects:
        if obj.colour == background:
            raise ValueError(f"a {obj.colour} object on a {background} background would be invisible")
    if caption is None:
        caption = _join([with_article(f"{o.size} {o.colour} {o.shape}") for o in spec.objects])
        caption += f" on a {background} {_TEXTURE_WORDS[texture]}background"
    image, drawn = render(spec)
    return Scene(image, caption, drawn, spec)
