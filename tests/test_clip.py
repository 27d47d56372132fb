"""The domain CLIP: transformers' CLIPModel as the reference for the saved folder, the detector as the judge of
hard negatives, the InfoNCE loss against a direct computation, and `ldm train-clip` runs (resume, text tower)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.conditioning.tokenizer import ClipTokenizer
from ldm.data.negatives import NEGATIVE_KINDS, ContrastiveShapesDataset, caption_fits, hard_negatives, parsed
from ldm.data.shapes import caption_matches, make_sample
from ldm.io.files import load_state_dict
from ldm.modules.clip import ClipConfig, build_clip, image_embeddings, load_clip, save_clip, text_embeddings
from ldm.training.clip import contrastive_loss, fits_mask

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "demo" / "clip-smoke.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = ClipConfig(text={"width": 32, "layers": 2, "heads": 2, "max_length": 32}, image_size=32, patch_size=8,
                  vision_width=32, vision_layers=2, vision_heads=2, projection_dim=16)


@pytest.mark.slow
def test_saved_folder_loads_as_transformers_clipmodel_with_the_same_embeddings(tmp_path: Path) -> None:
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = build_clip(TINY).eval()
    save_clip(model, tmp_path)
    reference = CLIPModel.from_pretrained(tmp_path).eval()
    ours = load_clip(tmp_path)
    tokens = ClipTokenizer(max_length=32)(["a red circle", "a blue square above a green triangle", ""])
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = reference(input_ids=tokens[:2], pixel_values=images)  # CLIPModel's own forward: normalised embeds
        torch.testing.assert_close(text_embeddings(ours, tokens[:2]), out.text_embeds, atol=1e-6, rtol=0)
        torch.testing.assert_close(image_embeddings(ours, images), out.image_embeds, atol=1e-6, rtol=0)


CHANGES = {"colour": [{"colour"}, {"colour2"}], "shape": [{"shape"}, {"shape2"}],
           "colour_swap": [{"colour", "colour2"}], "shape_swap": [{"shape", "shape2"}], "relation": [{"relation"}],
           "position": [{"position"}], "size": [{"size"}], "background": [{"background"}]}


def test_hard_negatives_are_false_for_the_image_by_the_detector() -> None:
    seen = dict.fromkeys(NEGATIVE_KINDS, 0)
    for index in range(150):
        s = make_sample(7, index, two_object_prob=0.5, drop_prob=0.3)
        assert caption_matches(s.caption, s.image)
        for kind, negative in hard_negatives(s.caption, s.background, s.objects, np.random.default_rng(index)).items():
            assert not caption_matches(negative, s.image), (kind, s.caption, negative)  # the pixels disagree
            changed = {k for k, v in parsed(negative).items() if parsed(s.caption)[k] != v}
            assert changed in CHANGES[kind], (kind, changed)  # in that one respect
            seen[kind] += 1
    assert all(seen.values()), seen  # every kind occurs


def test_fits_mask_marks_short_captions_that_fit_other_images() -> None:
    samples = [make_sample(8, i, 0.0, 0.0) for i in range(2)]
    captions = [f"a {samples[1].objects[0].colour} {samples[1].objects[0].shape}", samples[1].caption]
    mask = fits_mask(captions, [(s.background, s.objects) for s in samples])
    assert mask[0, 1] and not mask[0, 0] and not mask[1, 1]  # caption 0 also fits image 1; the diagonal is False
    assert bool(mask[1, 0]) == caption_fits(captions[1], samples[0].background, samples[0].objects)


def test_contrastive_loss_is_the_masked_symmetric_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    images, texts = (torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=-1) for _ in range(2))
    negatives = torch.nn.functional.normalize(torch.randn(3, 2, 4, generator=g), dim=-1)
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    fits = torch.zeros(3, 3, dtype=torch.bool)
    fits[0, 2] = True  # caption 0 also fits image 2
    loss = contrastive_loss(images, texts, negatives, valid, fits, torch.tensor(math.log(10.0)))
    expected = 0.0
    for j in range(3):  # image j against the captions that do not also fit it, and its own valid negatives
        scores = [10 * float(images[j] @ texts[i]) for i in range(3) if i == j or not fits[i, j]]
        scores += [10 * float(images[j] @ negatives[j, k]) for k in range(2) if valid[j, k]]
        expected += -10 * float(images[j] @ texts[j]) + math.log(sum(math.exp(v) for v in scores))
    for i in range(3):  # caption i against the images it does not also fit
        scores = [10 * float(texts[i] @ images[j]) for j in range(3) if j == i or not fits[i, j]]
        expected += -10 * float(texts[i] @ images[i]) + math.log(sum(math.exp(v) for v in scores))
    assert float(loss) == pytest.approx(expected / 6, rel=1e-5)


def test_contrastive_items_carry_a_negative_per_kind() -> None:
    item = ContrastiveShapesDataset(seed=3, length=4, two_object_prob=1.0, drop_prob=0.0, image_size=32)[0]
    assert len(item["negatives"]) == len(NEGATIVE_KINDS) and item["image"].shape == (3, 32, 32)
    assert item["negatives"][NEGATIVE_KINDS.index("relation")]  # a two-object caption has a reversed relation


@pytest.fixture(scope="module")
def smoke_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clip")
    subprocess.run([sys.executable, "-m", "ldm_toolkit.train", SMOKE, "--task", "clip", "--output-dir", str(out)],
                   check=True, env=ENV, capture_output=True, cwd=ROOT)
    return out


@pytest.mark.slow
def test_train_clip_resumes_bitwise(smoke_clip: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "ldm_toolkit.train", SMOKE, "--task", "clip", "--output-dir", str(tmp_path)]
    subprocess.run(command + ["--max-steps", "3"], check=True, env=ENV, capture_output=True, cwd=ROOT)
    subprocess.run(command, check=True, env=ENV, capture_output=True, cwd=ROOT)  # continues from step 3 to 6
    for name in ("model.safetensors", "training.safetensors"):
        a, b = load_state_dict(smoke_clip / "model" / name), load_state_dict(tmp_path / "model" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.fixture(scope="module")
def clip_t2i(smoke_clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke text-to-image run on the smoke CLIP's text tower (frozen)."""
    out = tmp_path_factory.mktemp("clip-t2i")
    smoke = str(ROOT / "configs" / "demo" / "smoke.yaml")
    subprocess.run([sys.executable, "-m", "ldm_toolkit.train", smoke, "--output-dir", str(out), "--max-steps", "2",
                    "--set", f"model.text_encoder_from={smoke_clip / 'model'}", "--set", "model.text_encoder={}",
                    "--set", "model.train_text_encoder=false", "--set", "model.unet.context_dim=32"],
                   check=True, env=ENV, capture_output=True, cwd=ROOT)
    return out / "model"


@pytest.mark.slow
def test_text_encoder_from_a_clip_folder_is_its_text_tower_and_stays_frozen(smoke_clip: Path, clip_t2i: Path) -> None:
    from pipelines import load_models

    clip, models = load_clip(smoke_clip / "model"), load_models(clip_t2i)
    tokens = models.tokenizer(["a red circle in the top left", ""])
    with torch.no_grad():
        expected = clip.text_model(input_ids=tokens).last_hidden_state  # transformers' own text tower
        torch.testing.assert_close(models.text_encoder(tokens), expected, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_text_encoder_from_replaces_the_encoder_of_init_from(clip_t2i: Path, tmp_path: Path) -> None:
    from ldm.config import ConfigError
    from ldm.training.config import DataConfig, ModelSpec
    from ldm_toolkit.train import build_models
    from pipelines import load_models

    torch.manual_seed(1)
    other = build_clip(TINY)  # another CLIP of the U-Net's context width (32)
    save_clip(other, tmp_path / "other")
    models = build_models(ModelSpec(init_from=str(clip_t2i), text_encoder_from=str(tmp_path / "other")), DataConfig())
    tower = {k: v for k, v in other.state_dict().items() if k.startswith("text_model.")}
    assert all(torch.equal(models.text_encoder.state_dict()[k], v) for k, v in tower.items())
    trained = load_models(clip_t2i).unet.state_dict()  # the U-Net is the trained one (its EMA weights)
    assert all(torch.equal(models.unet.state_dict()[k], v) for k, v in trained.items())
    wide = ClipConfig(text={"width": 64, "layers": 1, "heads": 2, "max_length": 32}, image_size=32,
                      vision_width=32, vision_layers=1, vision_heads=2, projection_dim=16)
    save_clip(build_clip(wide), tmp_path / "wide")
    with pytest.raises(ConfigError, match="has width 64; allowed: the U-Net's context_dim 32"):
        build_models(ModelSpec(init_from=str(clip_t2i), text_encoder_from=str(tmp_path / "wide")), DataConfig())


class _Judge:
    """Embeds an image as ``image`` and a caption as e0 if it is one of ``true`` captions, else e1."""

    def __init__(self, true: list[str], image: list[float]) -> None:
        self.true, self.image = set(true), torch.tensor(image)

    def images(self, images: list) -> torch.Tensor:
        return self.image.expand(len(images), 2)

    def texts(self, captions: list[str]) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0] if c in self.true else [0.0, 1.0] for c in captions])


def test_clip_scores_count_each_kind_of_negative() -> None:
    from pipelines.evaluation.clip_score import clip_scores

    samples = [make_sample(9, i, 0.5, 0.0) for i in range(20)]
    captions, images = [s.caption for s in samples], [s.image for s in samples]
    right = clip_scores(_Judge(captions, [1.0, 0.0]), images, captions)  # every image at its caption
    assert right["clip_score"] == pytest.approx(100) and right["hard_negative"] == 1.0
    assert set(right["by_kind"]) == set(NEGATIVE_KINDS)  # full captions: every kind occurs
    wrong = clip_scores(_Judge(captions, [0.0, 1.0]), images, captions)  # every image at the negatives
    assert wrong["clip_score"] == 0 and wrong["hard_negative"] == 0.0
    pairs = sum(len(hard_negatives(c, None, None, np.random.default_rng(0))) for c in captions)
    assert sum(entry["pairs"] for entry in wrong["by_kind"].values()) == pairs
