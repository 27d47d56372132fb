"""The shapes domain against docs/shapes.md (vocabulary and colours retyped here from the spec, not
imported), the detector against the renderer, and every validation error of image folders."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data import ImageCaptionFolder, ShapesDataset, caption_matches, detect_background, detect_objects, make_sample

# ------------------------------------------------------------------ SHAPES.md, retyped
BG = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 190), "orange": (245, 130, 20),
}  # fmt: skip
SEMANTIC = {"circle": 1, "square": 2, "triangle": 3}
CELLS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
SIDES = {"small": range(11, 16), "large": range(23, 30)}  # bbox side ≈ 1/5 and ≈ 2/5 of 64
_C, _S = "|".join(COLOURS), "(circle|square|triangle)"
_BGX = r"(?: on a (white|black|gray) background)?"
ONE = re.compile(rf"a(?: (small|large))? ({_C}) {_S}(?: (?:in the|at the|on the) ({'|'.join(CELLS)}))?{_BGX}")
TWO = re.compile(rf"a ({_C}) {_S} (to the left of|to the right of|above|below) a ({_C}) {_S}{_BGX}")


@pytest.fixture(scope="module")
def samples() -> list:
    data = ShapesDataset(seed=3, length=300, two_object_prob=0.5)
    return [data.sample(i) for i in range(len(data))]


def _colours(image: np.ndarray) -> set[tuple[int, ...]]:
    packed = np.unique(image.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))  # (H, W, 3) → ints
    return {(int(v) >> 16, int(v) >> 8 & 255, int(v) & 255) for v in packed}


def _cell(x: float, y: float) -> str:
    return CELLS[int(y // (64 / 3)) * 3 + int(x // (64 / 3))]


def _parse(caption: str) -> tuple[str, tuple]:
    one, two = ONE.fullmatch(caption), TWO.fullmatch(caption)
    assert one or two, f"caption outside the grammar: {caption!r}"
    return ("one", one.groups()) if one else ("two", two.groups())


# ------------------------------------------------------------------ pixels


def test_background_is_exact_at_corners_and_border(samples: list) -> None:
    for s in samples:
        border = np.concatenate([s.image[[0, -1]].reshape(-1, 3), s.image[:, [0, -1]].reshape(-1, 3)])
        assert (border == BG[s.background]).all()


def test_pixels_are_background_or_object_colours(samples: list) -> None:
    for s in samples:
        allowed = {BG[s.background]} | {COLOURS[o.colour] for o in s.objects}
        assert _colours(s.image) == allowed


def test_semantic_map_agrees_with_pixels(samples: list) -> None:
    for s in samples:
        foreground = (s.image != BG[s.background]).any(-1)
        assert np.array_equal(foreground, s.semantic > 0)
        covered = 0
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            patch, sem = s.image[y0:y1, x0:x1], s.semantic[y0:y1, x0:x1]
            mine = (patch == COLOURS[o.colour]).all(-1)
            assert np.array_equal(mine, sem == SEMANTIC[o.shape])
            covered += mine.sum()
        assert covered == foreground.sum()  # nothing drawn outside the objects' boxes


def test_objects_have_spec_shape_size_and_cell(samples: list) -> None:
    for s in samples:
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            mask = s.semantic[y0:y1, x0:x1] == SEMANTIC[o.shape]
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x1 - x0, y1 - y0)  # fills its box
            assert x1 - x0 == y1 - y0 and x1 - x0 in SIDES[o.size]
            fill = mask.mean()
            expected = {"square": (1.0, 1.0), "circle": (0.74, 0.86), "triangle": (0.5, 0.62)}[o.shape]
            assert expected[0] <= fill <= expected[1], (o, fill)
            if o.shape == "triangle":  # points up: narrow apex row, full base row
                assert mask[0].sum() <= 2 and mask[-1].all()
            assert o.centre == ((x0 + x1) / 2, (y0 + y1) / 2) and _cell(*o.centre) == o.position
            assert min(x0, y0) >= 1 and max(x1, y1) <= 63  # inside, off the border


def test_two_objects_do_not_overlap(samples: list) -> None:
    pairs = [s for s in samples if len(s.objects) == 2]
    assert len(pairs) > 100
    for s in pairs:
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o.bbox for o in s.objects)
        assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0  # boxes apart by at least a pixel


def test_low_res_is_area_downsampling(samples: list) -> None:
    for s in samples[:50]:
        image = torch.from_numpy(s.image).permute(2, 0, 1)[None].double()
        area = F.interpolate(image, size=(16, 16), mode="area")[0].permute(1, 2, 0).numpy()
        assert s.low_res.shape == (16, 16, 3) and s.low_res.dtype == np.uint8
        assert np.abs(area - s.low_res).max() <= 0.5


# ------------------------------------------------------------------ captions


def test_captions_follow_grammar_and_state_true_attributes(samples: list) -> None:
    for s in samples:
        kind, full = _parse(s.full_caption)
        _, short = _parse(s.caption)
        assert all(part in (None, whole) for part, whole in zip(short, full))  # caption = full minus parts
        assert None not in full and full[-1] == s.background
        if kind == "one":
            (o,) = s.objects
            assert full[:4] == (o.size, o.colour, o.shape, o.position) and s.label == SEMANTIC[o.shape] - 1
        else:
            a, b = s.objects
            assert (full[0], full[1], full[3], full[4]) == (a.colour, a.shape, b.colour, b.shape) and s.label == -1


def test_relation_words_match_centres(samples: list) -> None:
    for s in samples:
        kind, parts = _parse(s.full_caption)
        if kind == "two":
            (ax, ay), (bx, by) = (o.centre for o in s.objects)
            dx, dy = ax - bx, ay - by
            holds = {
                "to the left of": dx < -abs(dy), "to the right of": dx > abs(dy),
                "above": dy < -abs(dx), "below": dy > abs(dx),
            }  # fmt: skip
            assert holds[parts[2]], (parts, s.objects)


def test_parts_are_dropped_by_drop_prob(samples: list) -> None:
    kept = [_parse(s.caption)[1][0] is not None for s in samples if len(s.objects) == 1]
    assert 0.35 < np.mean(kept) < 0.65
    for prob, expected in ((0.0, "full"), (1.0, "bare")):
        data = ShapesDataset(seed=3, length=40, two_object_prob=0.5, drop_prob=prob)
        for i in range(len(data)):
            s = data.sample(i)
            assert s.caption == s.full_caption if expected == "full" else not s.caption.endswith("background")
            if expected == "bare" and len(s.objects) == 1:
                assert s.caption == f"a {s.objects[0].colour} {s.objects[0].shape}"


# ------------------------------------------------------------------ dataset


def test_same_seed_and_index_give_identical_samples() -> None:
    a, b = make_sample(7, 11, 0.5), make_sample(7, 11, 0.5)
    for key in ("image", "semantic", "low_res"):
        assert np.array_equal(getattr(a, key), getattr(b, key))
    assert (a.caption, a.objects) == (b.caption, b.objects)
    assert np.array_equal(make_sample(7, 11, 0.5, drop_prob=0.9).image, a.image)  # wording never moves pixels
    others = [make_sample(8, 11, 0.5), make_sample(7, 12, 0.5)]
    assert all(not np.array_equal(o.image, a.image) for o in others)


def test_dataset_items_and_batches() -> None:
    data = ShapesDataset(seed=1, length=16)
    item = data[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["low_res"].shape == (3, 16, 16) and item["semantic"].shape == (64, 64)
    assert item["semantic"].dtype == torch.long and item["label"].dtype == torch.long
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    batch = next(iter(DataLoader(data, batch_size=8)))
    assert batch["image"].shape == (8, 3, 64, 64) and len(batch["caption"]) == 8
    ones = ShapesDataset(seed=1, length=30, kind="one")
    for i in range(len(ones)):
        item = ones[i]
        assert item["label"] >= 0 and set(item["semantic"].unique().tolist()) == {0, int(item["label"]) + 1}
    assert all(ShapesDataset(seed=1, length=10, kind="two")[i]["label"] == -1 for i in range(10))


@pytest.mark.parametrize("size", [32, 128])
def test_other_image_sizes_scale_the_scene(size: int) -> None:
    data = ShapesDataset(seed=2, length=20, two_object_prob=0.5, image_size=size)
    for i in range(len(data)):
        s = data.sample(i)
        assert s.image.shape == (size, size, 3) and s.low_res.shape == (size // 4, size // 4, 3)
        assert sorted(detect_objects(s.image), key=str) == sorted(s.objects, key=str)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"kind": "pairs"}, "kind"), ({"image_size": 30}, "image_size"), ({"drop_prob": 1.5}, "drop_prob")],
)
def test_bad_dataset_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShapesDataset(**kwargs)


def test_index_out_of_range() -> None:
    with pytest.raises(IndexError):
        ShapesDataset(length=3)[3]


# ------------------------------------------------------------------ detector


def test_detector_recovers_every_attribute_of_rendered_objects() -> None:
    data = ShapesDataset(seed=11, length=500, two_object_prob=0.5)
    hits = 0
    for i in range(len(data)):
        s = data.sample(i)
        same_objects = sorted(detect_objects(s.image), key=str) == sorted(s.objects, key=str)
        hits += same_objects and detect_background(s.image) == s.background
    assert hits / len(data) >= 0.99


def test_detector_tolerates_colour_noise_and_scores_captions() -> None:
    rng = np.random.default_rng(0)
    data = ShapesDataset(seed=12, length=100, two_object_prob=0.5)
    hits = 0
    for i in range(len(data)):
        s = data.sample(i)
        noisy = np.clip(s.image + rng.normal(0, 8, s.image.shape), 0, 255).astype(np.uint8)
        found = sorted(o.attributes for o in detect_objects(noisy))
        hits += found == sorted(o.attributes for o in s.objects) and caption_matches(s.full_caption, noisy)
    assert hits / len(data) >= 0.97
    s = data.sample(0)
    wrong = s.full_caption.replace(s.objects[0].colour, "green" if s.objects[0].colour != "green" else "red", 1)
    assert caption_matches(s.caption, s.image) and not caption_matches(wrong, s.image)


# ------------------------------------------------------------------ image folders


def _folder(root: Path, lines: list[str], images: dict[str, tuple[int, int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, (w, h) in images.items():
        Image.new("RGB", (w, h), (200, 10, 10)).save(root / name)
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_image_caption_folder_items(tmp_path: Path) -> None:
    lines = [json.dumps({"file_name": "a.png", "text": "red"}), "", json.dumps({"file_name": "b.png", "text": "wide"})]
    data = ImageCaptionFolder(_folder(tmp_path, lines, {"a.png": (40, 40), "b.png": (90, 30)}), image_size=24)
    assert len(data) == 2
    item = data[1]
    assert item["caption"] == "wide" and item["image"].shape == (3, 24, 24)
    assert torch.allclose(item["image"][:, 12, 12], torch.tensor([200, 10, 10]) / 127.5 - 1, atol=0.02)
    assert ImageCaptionFolder(tmp_path, 16, center_crop=False)[1]["image"].shape == (3, 16, 16)


GOOD = json.dumps({"file_name": "a.png", "text": "x"})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, "{not json"], r"metadata.jsonl:2: not valid JSON"),
        ([json.dumps({"file_name": "a.png"})], r"metadata.jsonl:1: missing key\(s\) text"),
        ([json.dumps(["a.png", "x"])], r"metadata.jsonl:1: expected a JSON object"),
        ([json.dumps({"file_name": "gone.png", "text": "x"})], r"gone.png does not exist"),
        ([json.dumps({"file_name": "broken.png", "text": "x"})], r"broken.png cannot be read"),
        ([""], r"lists no images"),
    ],
)
def test_image_caption_folder_errors(tmp_path: Path, lines: list[str], message: str) -> None:
    root = _folder(tmp_path / "data", lines, {"a.png": (8, 8)})
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match=message):
        ImageCaptionFolder(root, image_size=8)


def test_image_caption_folder_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nowhere does not exist"):
        ImageCaptionFolder(tmp_path / "nowhere", image_size=8)
    with pytest.raises(ValueError, match=r"has no metadata.jsonl"):
        ImageCaptionFolder(tmp_path, image_size=8)


@pytest.mark.parametrize("name", ["../outside.png", "../missing.png", "ABSOLUTE", "link.png"])
def test_image_paths_stay_inside_the_folder_and_say_nothing_of_outside(tmp_path: Path, name: str) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    root = tmp_path / "data"
    root.mkdir()
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    name = str(tmp_path / "outside.png") if name == "ABSOLUTE" else name
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: file_name .* leads outside the image folder") as err:
        ImageCaptionFolder(root, image_size=8)
    assert "exist" not in str(err.value)  # the same words whether the outside file exists or not


def test_a_truncated_image_fails_when_the_folder_is_read(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", [json.dumps({"file_name": "cut.jpg", "text": "x"})], {})
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (root / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: image .*cut.jpg cannot be read"):
        ImageCaptionFolder(root, image_size=8)
