"""Prompt adherence: which of a prompt's stated attributes the detector finds in an image."""

from __future__ import annotations

import numpy as np

from ldm.data.shapes import ShapeObject, detect_background, detect_objects, parse_caption, relation

ONE_ATTRIBUTES = ("shape", "colour", "size", "position", "background")
TWO_ATTRIBUTES = ("objects", "relation", "background")


def score_adherence(caption: str, image: np.ndarray) -> dict[str, bool | None]:
    """Per stated attribute, whether the image (S, S, 3) uint8 shows it (None: not stated).

    One-object prompts: shape, colour, size, position (of the largest object found), background,
    ``count`` (exactly one object), ``whole`` (all of them) and ``shape_<class>`` (the shape score
    under the stated class's name, for accuracy per class). Two-object prompts: ``objects``
    (two objects of the stated colours and shapes, nothing else), ``relation`` (those two, in the
    stated relation), background and ``whole``."""
    wanted = parse_caption(caption)
    found = detect_objects(image)
    scores: dict[str, bool | None] = {"background": None}
    if wanted["background"]:
        scores["background"] = detect_background(image) == wanted["background"]
    if wanted.get("relation"):
        pair = _stated_pair(wanted, found)
        scores["objects"] = pair is not None
        scores["relation"] = pair is not None and relation(*pair) == wanted["relation"]
        parts = ("objects", "relation", "background")
    else:
        obj = found[0] if found else None
        for key in ("shape", "colour", "size", "position"):
            scores[key] = None if wanted[key] is None else obj is not None and getattr(obj, key) == wanted[key]
        scores["count"] = len(found) == 1
        if wanted["shape"] is not None:  # the shape again, by the stated class: is a square drawn as a square?
            scores[f"shape_{wanted['shape']}"] = scores["shape"]
        parts = ("shape", "colour", "size", "position", "background", "count")
    scores["whole"] = all(scores[key] is not False for key in parts)
    return scores


def _stated_pair(wanted: dict, found: list[ShapeObject]) -> tuple[ShapeObject, ShapeObject] | None:
    """The two found objects in the caption's order (first, second), if they are what it states."""
    if len(found) != 2:
        return None
    for a, b in (found, found[::-1]):
        stated = (wanted["colour"], wanted["shape"], wanted["colour2"], wanted["shape2"])
        if (a.colour, a.shape, b.colour, b.shape) == stated:
            return a, b
    return None


def summarize_adherence(scores: list[dict[str, bool | None]]) -> dict[str, float]:
    """Mean of each score over the prompts that state it, plus ``attributes``: the share of all
    stated one-object attributes (shape, colour, size, position, background) that are right."""
    keys = sorted({key for s in scores for key in s})
    summary = {}
    for key in keys:
        values = [s[key] for s in scores if s.get(key) is not None]
        if values:
            summary[key] = float(np.mean(values))
    stated = [s[k] for s in scores if "shape" in s for k in ONE_ATTRIBUTES if s.get(k) is not None]
    if stated:
        summary["attributes"] = float(np.mean(stated))
    summary["count_prompts"] = len(scores)
    return summary
