"""Hard negative captions of the shapes domain: a caption changed in one respect, so that it no longer
describes the image (for contrastive training with hard negatives, as NegCLIP, Yuksekgonul et al. 2023,
and for the hard-negative score of generated images)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from torch import Tensor

from ldm.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    ShapeObject,
    ShapesDataset,
    parse_caption,
    scene_matches,
    to_unit_range,
)

# what each kind changes: one object's colour / shape (or the only object's), the two objects' colours or
# shapes swapped, the relation reversed, the stated position / size / background replaced
NEGATIVE_KINDS = ("colour", "shape", "colour_swap", "shape_swap", "relation", "position", "size", "background")
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


def format_caption(parts: dict[str, str | None]) -> str:
    """The caption of parsed ``parts`` (``parse_caption``'s output): the inverse of parsing."""
    bg = f" on a {parts['background']} background" if parts.get("background") else ""
    if parts.get("relation"):
        return f"a {parts['colour']} {parts['shape']} {parts['relation']} a {parts['colour2']} {parts['shape2']}{bg}"
    size = f" {parts['size']}" if parts.get("size") else ""
    position = f" {parts.get('prep') or 'in the'} {parts['position']}" if parts.get("position") else ""
    return f"a{size} {parts['colour']} {parts['shape']}{position}{bg}"


@functools.lru_cache(maxsize=65536)
def parsed(caption: str) -> dict[str, str | None]:
    """``parse_caption``, memoised (the grammar has about 11 000 captions)."""
    return parse_caption(caption)


def _other(rng: np.random.Generator, options: Any, *exclude: str | None) -> str:
    return str(rng.choice([o for o in options if o not in exclude]))


def _changes(p: dict[str, str | None], rng: np.random.Generator) -> dict[str, dict[str, str | None]]:
    """Per applicable kind, the changed parts (before checking that they differ from the scene)."""
    out: dict[str, dict[str, str | None]] = {}
    two = bool(p.get("relation"))
    which = "2" if two and rng.random() < 0.5 else ""  # the object to change: either of two
    out["colour"] = {**p, "colour" + which: _other(rng, COLOURS, p["colour"], p.get("colour2"))}
    out["shape"] = {**p, "shape" + which: _other(rng, SHAPES, p["shape" + which])}
    if two:
        out["colour_swap"] = {**p, "colour": p["colour2"], "colour2": p["colour"]}
        out["shape_swap"] = {**p, "shape": p["shape2"], "shape2": p["shape"]}
        out["relation"] = {**p, "relation": OPPOSITE[str(p["relation"])]}
    for key, options in (("position", POSITIONS), ("size", ("small", "large")), ("background", BACKGROUNDS)):
        if p.get(key):
            out[key] = {**p, key: _other(rng, options, p[key])}
    return out


def hard_negatives(caption: str, background: str | None, objects: list[ShapeObject] | None,
                   rng: np.random.Generator) -> dict[str, str]:
    """Per kind of ``NEGATIVE_KINDS`` that applies to ``caption``, one caption changed in that respect that the
    scene (``background``, ``objects``) does not show; kinds that cannot make such a caption are left out. Without
    a scene (``objects`` None: a prompt), a negative only has to differ from the caption (a swap of two equal
    colours or shapes does not)."""
    out = {}
    for kind, parts in _changes(parsed(caption), rng).items():
        negative = format_caption(parts)
        if negative != caption and (objects is None or not scene_matches(parsed(negative), background, objects)):
            out[kind] = negative
    return out


def caption_fits(caption: str, background: str, objects: list[ShapeObject]) -> bool:
    """Whether the scene shows what ``caption`` states (a short caption fits many scenes)."""
    return scene_matches(parsed(caption), background, objects)


class ContrastiveShapesDataset(ShapesDataset):
    """Shapes samples with their hard negatives (``negatives``: one caption per kind of ``NEGATIVE_KINDS``,
    "" where the kind does not apply) and the scene (``scene``: background and objects), for masking
    captions of other images that also fit. The negatives of sample i draw from ``default_rng([seed, i, 2])``."""

    def __getitem__(self, index: int) -> dict[str, Tensor | str | Any]:
        s = self.sample(index)
        found = hard_negatives(s.caption, s.background, s.objects, np.random.default_rng([self.seed, index, 2]))
        negatives = [found.get(kind, "") for kind in NEGATIVE_KINDS]
        return {"image": to_unit_range(s.image), "caption": s.caption, "negatives": negatives,
                "scene": (s.background, s.objects)}
