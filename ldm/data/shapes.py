"""The synthetic shapes domain of docs/shapes.md: a renderer, a caption sampler and a detector.

Every sample is a pure function of ``(seed, index)``: the scene (background, objects, sizes,
positions) draws from ``default_rng([seed, index, 0])`` and the caption wording and dropped
parts from ``default_rng([seed, index, 1])``, so changing ``drop_prob`` never changes an image.
Pixels have hard edges, so every pixel is exactly the background or an object colour.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ldm.validation import check_choice, check_float, check_int

log = logging.getLogger(__name__)

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")  # label = index, semantic class = index + 1
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PREPOSITIONS = ("in the", "at the", "on the")
RELATIONS = ("to the left of", "to the right of", "above", "below")
KINDS = ("any", "one", "two")

SIZE_FRACTIONS = {"small": (0.17, 0.23), "large": (0.36, 0.44)}  # bbox side / image side (≈ 1/5, 2/5)
FILL_TRIANGLE_MAX, FILL_CIRCLE_MAX = 0.7, 0.9  # fill ratio of the bbox: triangle ≈ 0.55, circle ≈ π/4, square 1


@dataclass(frozen=True)
class ShapeObject:
    """One object: its attributes and where it lies (``bbox`` = x0, y0, x1, y1 with exclusive ends)."""

    shape: str
    colour: str
    size: str
    position: str
    centre: tuple[float, float]  # (x, y) in pixels = bbox centre
    bbox: tuple[int, int, int, int]

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        """(shape, colour, size, position): what a caption can state about the object."""
        return self.shape, self.colour, self.size, self.position


@dataclass
class ShapeSample:
    """A rendered sample with its captions and side outputs (numpy arrays, uint8)."""

    image: np.ndarray  # (S, S, 3)
    caption: str  # optional parts dropped at random
    full_caption: str  # every part present
    semantic: np.ndarray  # (S, S): 0 background, 1 circle, 2 square, 3 triangle
    low_res: np.ndarray  # (S/4, S/4, 3), area-downsampled image
    label: int  # shape index of a one-object image, -1 for two objects
    background: str
    objects: list[ShapeObject] = field(default_factory=list)


# ----------------------------------------------------------------------------- geometry


def size_range(size: str, side: int) -> tuple[int, int]:
    """Inclusive range of bbox sides (pixels) for a size name at image side ``side``."""
    low, high = SIZE_FRACTIONS[size]
    return round(low * side), round(high * side)


def cell_of(centre: tuple[float, float], side: int) -> str:
    """Name of the 3×3 grid cell holding ``centre`` (x, y)."""
    col, row = (min(2, max(0, int(c * 3 / side))) for c in centre)
    return POSITIONS[row * 3 + col]


def _starts(cell: int, d: int, side: int) -> list[int]:
    """Starts x0 along one axis that keep a side-``d`` object ``side/32`` px inside the image
    (corners stay background) and its centre in ``cell``, ``side/32`` px from inner cell edges."""
    margin = side // 32
    low = cell * side / 3 + (margin if cell > 0 else 0)
    high = (cell + 1) * side / 3 - (margin if cell < 2 else 0)
    return [x0 for x0 in range(margin, side - d - margin + 1) if low <= x0 + d / 2 < high]


def _sample_object(rng: np.random.Generator, side: int, size: str | None = None) -> ShapeObject:
    """A random object: shape, colour, size and a position in a random cell."""
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    size = size or str(rng.choice(SIZES))
    d = int(rng.integers(*size_range(size, side), endpoint=True))
    cell = int(rng.integers(9))
    x0 = int(rng.choice(_starts(cell % 3, d, side)))
    y0 = int(rng.choice(_starts(cell // 3, d, side)))
    centre = (x0 + d / 2, y0 + d / 2)
    return ShapeObject(shape, colour, size, POSITIONS[cell], centre, (x0, y0, x0 + d, y0 + d))


def _apart(a: ShapeObject, b: ShapeObject, gap: int) -> bool:
    """Whether the bboxes are separated by at least ``gap`` pixels along some axis."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def relation(a: ShapeObject, b: ShapeObject, margin: float = 0.0) -> str | None:
    """Where ``a`` lies from ``b`` by centres; None unless one axis' difference exceeds the other's by ``margin``."""
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) > abs(dy) + margin:
        return RELATIONS[0] if dx < 0 else RELATIONS[1]
    if abs(dy) > abs(dx) + margin:
        return RELATIONS[2] if dy < 0 else RELATIONS[3]
    return None


def _sample_pair(rng: np.random.Generator, side: int, tries: int = 1000) -> tuple[ShapeObject, ShapeObject, str]:
    """Two distinct, non-overlapping objects in an unambiguous relation (rejection sampling;
    after 100 failed tries both objects are small)."""
    for attempt in range(tries):
        if attempt == 100:
            log.debug("two-object scene: 100 rejected tries at side %d, falling back to small objects", side)
        size = "small" if attempt >= 100 else None
        a, b = _sample_object(rng, side, size), _sample_object(rng, side, size)
        rel = relation(a, b, margin=side / 8)
        if rel and _apart(a, b, gap=max(1, side // 32)) and (a.shape, a.colour) != (b.shape, b.colour):
            return a, b, rel
    raise RuntimeError(f"no valid two-object scene after {tries} tries")  # never reached in practice


# ----------------------------------------------------------------------------- rendering


def shape_mask(shape: str, d: int) -> np.ndarray:
    """Filled (d, d) boolean mask of a shape touching all four sides of its box, sampled at
    pixel centres (triangle rows at their lower edge, so its apex row is never empty)."""
    y, x = np.mgrid[0:d, 0:d] + 0.5
    if shape == "square":
        return np.ones((d, d), dtype=bool)
    if shape == "circle":
        return (x - d / 2) ** 2 + (y - d / 2) ** 2 <= (d / 2) ** 2
    return np.abs(x - d / 2) <= (y + 0.5) / 2  # triangle, apex up: half-width grows to d/2 at the base


def render(background: str, objects: list[ShapeObject], side: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (side, side, 3) uint8 and semantic map (side, side) uint8 of a scene."""
    image = np.empty((side, side, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[background]
    semantic = np.zeros((side, side), dtype=np.uint8)
    for obj in objects:
        x0, y0, x1, y1 = obj.bbox
        mask = shape_mask(obj.shape, x1 - x0)
        image[y0:y1, x0:x1][mask] = COLOURS[obj.colour]
        semantic[y0:y1, x0:x1][mask] = SHAPES.index(obj.shape) + 1
    return image, semantic


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``×``factor`` blocks, rounded half up, as uint8."""
    h, w, c = image.shape
    blocks = image.reshape(h // factor, factor, w // factor, factor, c).astype(np.float64)  # (h', f, w', f, c)
    return np.floor(blocks.mean(axis=(1, 3)) + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- captions


def _caption(objects: list[ShapeObject], rel: str | None, background: str, preposition: str, keep: np.ndarray) -> str:
    """A caption of the docs/shapes.md grammar with the optional parts (size, position, background) in ``keep``."""
    bg = f" on a {background} background" if keep[2] else ""
    if len(objects) == 2:
        a, b = objects
        return f"a {a.colour} {a.shape} {rel} a {b.colour} {b.shape}{bg}"
    (obj,) = objects
    size = f" {obj.size}" if keep[0] else ""
    position = f" {preposition} {obj.position}" if keep[1] else ""
    return f"a{size} {obj.colour} {obj.shape}{position}{bg}"


def _captions(
    rng: np.random.Generator, objects: list[ShapeObject], rel: str | None, background: str, drop_prob: float
) -> tuple[str, str]:
    """(caption with optional parts dropped independently with ``drop_prob``, full caption)."""
    preposition = str(rng.choice(PREPOSITIONS))
    keep = rng.random(3) >= drop_prob  # size, position, background
    full = _caption(objects, rel, background, preposition, np.ones(3, dtype=bool))
    return _caption(objects, rel, background, preposition, keep), full


_WORDS = {
    "size": "|".join(SIZES),
    "colour": "|".join(COLOURS),
    "shape": "|".join(SHAPES),
    "position": "|".join(sorted(POSITIONS, key=len, reverse=True)),
    "prep": "|".join(PREPOSITIONS),
    "relation": "|".join(RELATIONS),
    "bg": "|".join(BACKGROUNDS),
}
_WORDS["bg_part"] = r"(?: on a (?P<background>{bg}) background)?".format(**_WORDS)
_ONE = re.compile(
    r"an?(?: (?P<size>{size}))? (?P<colour>{colour}) (?P<shape>{shape})"
    r"(?: (?P<prep>{prep}) (?P<position>{position}))?{bg_part}$".format(**_WORDS)
)
_TWO = re.compile(
    r"an? (?P<colour>{colour}) (?P<shape>{shape}) (?P<relation>{relation}) "
    r"an? (?P<colour2>{colour}) (?P<shape2>{shape}){bg_part}$".format(**_WORDS)
)


def parse_caption(caption: str) -> dict[str, str | None]:
    """The attributes a caption states (absent optional parts are None); ``ValueError`` if the
    caption is outside the docs/shapes.md grammar ("an" is accepted for "a" in prompts).
    One-object captions also give the preposition ``prep``; two-object ones colour2, shape2, relation."""
    match = _ONE.match(caption) or _TWO.match(caption)
    if match is None:
        raise ValueError(f"caption {caption!r} does not follow the shapes grammar (docs/shapes.md)")
    return match.groupdict()


# ----------------------------------------------------------------------------- samples


def make_sample(
    seed: int, index: int, two_object_prob: float = 0.3, drop_prob: float = 0.5, image_size: int = 64
) -> ShapeSample:
    """The sample ``index`` of the stream ``seed``: scene, image, captions and side outputs."""
    rng = np.random.default_rng([seed, index, 0])
    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < two_object_prob:
        a, b, rel = _sample_pair(rng, image_size)
        objects, label = [a, b], -1
    else:
        objects, rel = [_sample_object(rng, image_size)], None
        label = SHAPES.index(objects[0].shape)
    caption, full = _captions(np.random.default_rng([seed, index, 1]), objects, rel, background, drop_prob)
    image, semantic = render(background, objects, image_size)
    return ShapeSample(image, caption, full, semantic, area_downsample(image, 4), label, background, objects)


def to_unit_range(image: np.ndarray) -> Tensor:
    """uint8 (H, W, C) → float (C, H, W) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0


class ShapesDataset(Dataset):
    """``length`` samples of the shapes domain as tensors; ``kind`` "one" keeps one-object images
    only (for classifier training), "two" two-object images only, "any" mixes by ``two_object_prob``."""

    def __init__(
        self,
        seed: int = 0,
        length: int = 10_000,
        two_object_prob: float = 0.3,
        drop_prob: float = 0.5,
        image_size: int = 64,
        kind: str = "any",
    ) -> None:
        self.seed = check_int("seed", seed, 0)
        self.length = check_int("length", length, 1)
        self.kind = check_choice("kind", kind, KINDS)
        prob = check_float("two_object_prob", two_object_prob, 0.0, 1.0)
        self.two_object_prob = {"any": prob, "one": 0.0, "two": 1.0}[kind]
        self.drop_prob = check_float("drop_prob", drop_prob, 0.0, 1.0)
        self.image_size = check_int("image_size", image_size, 32)
        if image_size % 4:
            raise ValueError(f"image_size={image_size!r} must be a multiple of 4 (the low-res copy is 1/4 of the side)")

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> ShapeSample:
        """The structured sample ``index`` (numpy arrays, objects, both captions)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for a ShapesDataset of length {self.length}")
        return make_sample(self.seed, index, self.two_object_prob, self.drop_prob, self.image_size)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        s = self.sample(index)
        return {
            "image": to_unit_range(s.image),  # (3, S, S)
            "caption": s.caption,
            "semantic": torch.from_numpy(s.semantic).long(),  # (S, S)
            "low_res": to_unit_range(s.low_res),  # (3, S/4, S/4)
            "label": torch.tensor(s.label, dtype=torch.long),
        }


# ----------------------------------------------------------------------------- detection


def _nearest(pixels: np.ndarray, palette: np.ndarray, tolerance: float) -> np.ndarray:
    """Index of the nearest palette colour per pixel (..., 3), or -1 when farther than ``tolerance``."""
    dist2 = ((pixels[..., None, :].astype(np.int32) - palette.astype(np.int32)) ** 2).sum(axis=-1)  # (..., K)
    index = dist2.argmin(axis=-1)
    return np.where(np.take_along_axis(dist2, index[..., None], -1)[..., 0] <= tolerance**2, index, -1)


def detect_background(image: np.ndarray, tolerance: float = 60.0) -> str | None:
    """The background colour most of the border pixels match, or None if none matches."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])  # (4S-4, 3)
    index = _nearest(border, np.array(list(BACKGROUNDS.values())), tolerance)
    counts = np.bincount(index[index >= 0], minlength=len(BACKGROUNDS))
    return list(BACKGROUNDS)[int(counts.argmax())] if counts.any() else None


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero values: a component id per pixel (0 where
    ``labels`` is 0), by min-label propagation with pointer jumping."""
    h, w = labels.shape
    ids = np.where(labels > 0, np.arange(1, h * w + 1).reshape(h, w), 0)
    down = (labels[1:] == labels[:-1]) & (labels[1:] > 0)  # (h-1, w): pixel joined to the one below
    right = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] > 0)  # (h, w-1)
    while True:
        new = ids.copy()
        new[:-1] = np.where(down, np.minimum(new[:-1], ids[1:]), new[:-1])
        new[1:] = np.where(down, np.minimum(new[1:], ids[:-1]), new[1:])
        new[:, :-1] = np.where(right, np.minimum(new[:, :-1], ids[:, 1:]), new[:, :-1])
        new[:, 1:] = np.where(right, np.minimum(new[:, 1:], ids[:, :-1]), new[:, 1:])
        flat = np.concatenate([[0], new.ravel()])
        new = flat[new]  # pointer jumping: adopt the label of the pixel my label names
        if np.array_equal(new, ids):
            return ids
        ids = new


def _classify(mask: np.ndarray, colour: str, side: int) -> ShapeObject:
    """Shape (fill ratio of the bbox), size (bbox side), cell (bbox centre) of one component."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    fill = len(xs) / ((x1 - x0) * (y1 - y0))
    shape = "triangle" if fill < FILL_TRIANGLE_MAX else "circle" if fill < FILL_CIRCLE_MAX else "square"
    threshold = (size_range("small", side)[1] + size_range("large", side)[0]) / 2
    size = "large" if max(x1 - x0, y1 - y0) > threshold else "small"
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    return ShapeObject(shape, colour, size, cell_of(centre, side), centre, (x0, y0, x1, y1))


def object_mask(image: np.ndarray, tolerance: float = 60.0) -> np.ndarray:
    """(S, S) bool: the pixels whose nearest palette colour (within ``tolerance``) is an object colour."""
    palette = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()))
    index = _nearest(image, palette, tolerance)
    return (index >= 0) & (index < len(COLOURS))


def detect_objects(image: np.ndarray, tolerance: float = 60.0, min_area: int | None = None) -> list[ShapeObject]:
    """Objects in a (S, S, 3) uint8 image, largest first: pixels take the nearest palette colour
    within ``tolerance`` (RGB distance), connected components of one object colour smaller than
    ``min_area`` (default 1% of the image) are ignored."""
    side = image.shape[0]
    min_area = max(4, round(0.01 * side * side)) if min_area is None else min_area
    palette = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()))
    index = _nearest(image, palette, tolerance)
    labels = np.where((index >= 0) & (index < len(COLOURS)), index + 1, 0)  # 1..6 object colours
    ids = connected_components(labels)
    found = []
    for comp, area in zip(*np.unique(ids[ids > 0], return_counts=True)):
        if area >= min_area:
            mask = ids == comp
            colour = list(COLOURS)[int(labels[mask][0]) - 1]
            found.append((int(area), _classify(mask, colour, side)))
    return [obj for _, obj in sorted(found, key=lambda pair: -pair[0])]


def caption_matches(caption: str, image: np.ndarray, tolerance: float = 60.0) -> bool:
    """Whether the image shows exactly what the caption states (prompt adherence): the number of
    objects, each stated attribute, the relation between two objects and the background."""
    wanted = parse_caption(caption)
    background = detect_background(image, tolerance) if wanted["background"] else None
    return scene_matches(wanted, background, detect_objects(image, tolerance))


def scene_matches(wanted: dict[str, str | None], background: str | None, found: list[ShapeObject]) -> bool:
    """Whether a scene (its background and objects) shows what the parsed caption ``wanted`` states."""
    if wanted["background"] and background != wanted["background"]:
        return False
    if wanted.get("relation"):
        return _pair_matches(wanted, found)
    if len(found) != 1:
        return False
    obj = found[0]
    stated = {"shape": obj.shape, "colour": obj.colour, "size": obj.size, "position": obj.position}
    return all(wanted[key] in (None, value) for key, value in stated.items())


def _pair_matches(wanted: dict[str, str | None], found: list[ShapeObject]) -> bool:
    if len(found) != 2:
        return False
    stated = (wanted["colour"], wanted["shape"], wanted["colour2"], wanted["shape2"])
    pairs = [(a, b) for a, b in (found, found[::-1]) if (a.colour, a.shape, b.colour, b.shape) == stated]
    return bool(pairs) and relation(*pairs[0]) == wanted["relation"]
