"""Training data: image-caption folders and the synthetic shapes domain (docs/shapes.md)."""

from ldm.data.folder import ImageCaptionFolder, read_metadata
from ldm.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeObject,
    ShapeSample,
    ShapesDataset,
    caption_matches,
    detect_background,
    detect_objects,
    make_sample,
    parse_caption,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "ImageCaptionFolder",
    "ShapeObject",
    "ShapeSample",
    "ShapesDataset",
    "caption_matches",
    "detect_background",
    "detect_objects",
    "make_sample",
    "parse_caption",
    "read_metadata",
]
