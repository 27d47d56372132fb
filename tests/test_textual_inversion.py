"""Textual-inversion embeddings against diffusers' ``StableDiffusionPipeline.load_textual_inversion`` on the same
random weights and the same files (A1111 ``.pt`` / ``.safetensors``, diffusers ``learned_embeds``), and the SD v2
(open_clip) encoder against the same vectors written into an existing token's row. CPU, float32, nothing
downloaded."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from ldm.io.embeddings import read_textual_inversion
from ldm.io.files import CheckpointError
from pipelines import TextToImagePipeline

WIDTH = 32  # the `folder` model's text width (tests/sd_fixtures.py)
PROMPT = "a photo of {}, highly detailed"


def _vectors(n: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111_pt(path: Path, vectors: torch.Tensor, name: str) -> Path:
    """As A1111's ``Embedding.save``: string_to_token, string_to_param, name, step, checkpoint hash and name."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": 500,
                "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "v1-5"}, path)
    return path


def a1111_safetensors(path: Path, vectors: torch.Tensor) -> Path:
    save_file({"emb_params": vectors}, str(path))
    return path


def diffusers_safetensors(path: Path, token: str, vector: torch.Tensor) -> Path:
    path.mkdir()
    save_file({token: vector}, str(path / "learned_embeds.safetensors"))  # as diffusers' textual_inversion.py
    return path / "learned_embeds.safetensors"


@pytest.fixture()
def ours(folder: Path) -> TextToImagePipeline:
    return TextToImagePipeline.from_pretrained(folder)


@pytest.fixture()
def reference(folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def _diffusers_context(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    embeds, _ = pipe.encode_prompt(prompt, torch.device("cpu"), 1, do_classifier_free_guidance=False)
    return embeds


def _diffusers_ids(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    return pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


CASES = {  # name: (writer(tmp) -> path, token passed to both loaders, token in the prompt, vectors)
    "a1111-pt": (lambda tmp, v: a1111_pt(tmp / "shiny.pt", v, "<shiny>"), None, "<shiny>", 1),
    "a1111-safetensors-multi": (lambda tmp, v: a1111_safetensors(tmp / "watercolor-style.safetensors", v),
                                "watercolor-style", "watercolor-style", 3),
    "diffusers-learned-embeds": (lambda tmp, v: diffusers_safetensors(tmp / "cat-toy", "<cat-toy>", v[0]),
                                 None, "<cat-toy>", 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_embeddings_equal_diffusers(case: str, ours: TextToImagePipeline,
                                           reference: StableDiffusionPipeline, tmp_path: Path) -> None:
    write, token_arg, token, n = CASES[case]
    vectors = _vectors(n, seed=len(case))
    path = write(tmp_path, vectors)
    prompt = PROMPT.format(token)
    before = ours.encode_prompts([prompt])[0]

    assert ours.load_textual_inversion(path) == token  # the file's own token (A1111 emb_params: the file name)
    # diffusers needs the token for emb_params (one key, "emb_params"); for the others it reads the file's own.
    reference.load_textual_inversion(str(path), token=token if token_arg else None)

    ids = ours.tokenizer([prompt])
    assert torch.equal(ids, _diffusers_ids(reference, prompt))
    assert ids.max() == 49408 + n - 1 and (ids >= 49408).sum() == n  # n ids, placed after the vocabulary
    got = ours.encode_prompts([prompt])[0]
    expected = _diffusers_context(reference, prompt)
    assert got.shape == expected.shape == (1, 77, WIDTH)
    assert (got - expected).abs().max() <= 1e-6
    assert (got - before).abs().max() > 1e-2  # the embedding changed the context
    # the same in a batch beside a plain prompt
    both = ours.encode_prompts([prompt, "a plain prompt"])[0]
    assert (both[:1] - expected).abs().max() <= 1e-6


def test_unload_restores_the_model_and_keeps_other_tokens(ours: TextToImagePipeline, tmp_path: Path) -> None:
    plain = ours.encode_prompts(["a photo of <a>"])[0]
    rows = ours.text_encoder.token_embedding_layer.weight.shape[0]
    a = a1111_pt(tmp_path / "a.pt", _vectors(2, 1), "<a>")
    b = a1111_safetensors(tmp_path / "b.safetensors", _vectors(3, 2))
    ours.load_textual_inversion(a)
    ours.load_textual_inversion(b, token="<b>")
    with_b = ours.encode_prompts(["a photo of <b>"])[0]
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_textual_inversion(b, token="<b>")
    assert ours.text_encoder.token_embedding_layer.weight.shape[0] == rows + 5  # the refused load added nothing

    ours.unload_textual_inversion("<a>")  # <b> moves down to the rows right after the vocabulary
    assert ours.tokenizer.added_tokens == {"<b>": (49408, 49409, 49410)}
    assert torch.equal(ours.encode_prompts(["a photo of <b>"])[0], with_b)
    ours.unload_textual_inversion()
    assert ours.tokenizer.added_tokens == {}
    assert ours.text_encoder.token_embedding_layer.weight.shape[0] == rows
    assert torch.equal(ours.encode_prompts(["a photo of <a>"])[0], plain)
    with pytest.raises(ValueError, match="not loaded"):
        ours.unload_textual_inversion("<a>")


def test_openclip_encoder_takes_the_vectors_as_a_token_row(tmp_path: Path) -> None:
    """SD v2: "<tok>" with the embedding equals a known word whose embedding row holds the same vectors."""
    from sd_fixtures import small_v2_models

    pipe = TextToImagePipeline(small_v2_models())
    width = pipe.text_encoder.config.width
    vectors = _vectors(2, 7, width)
    words = pipe.tokenizer.encode("cat dog")
    reference = copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        reference.token_embedding.weight[words] = vectors
    expected = reference(pipe.tokenizer(["a photo of cat dog , red"]))

    pipe.load_textual_inversion(a1111_safetensors(tmp_path / "v2-style.safetensors", vectors))
    got = pipe.encode_prompts(["a photo of v2-style, red"])[0]
    assert (got - expected).abs().max() <= 1e-6
    assert (got - pipe.text_encoder(pipe.tokenizer(["a photo of cat dog , red"]))).abs().max() > 1e-2


def test_wrong_width_is_one_line_naming_file_shape_and_width(ours: TextToImagePipeline, tmp_path: Path) -> None:
    path = a1111_pt(tmp_path / "sd2-style.pt", _vectors(4, 3, width=1024), "sd2-style")
    with pytest.raises(ValueError) as info:
        ours.load_textual_inversion(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "(4, 1024)" in message and "(n, 32)" in message
    assert ours.tokenizer.added_tokens == {} and ours.text_encoder.token_embedding_layer.weight.shape[0] == 49408


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_files_are_never_unpickled_beyond_tensors(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _vectors(1, 0)}, "name": "evil", "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_textual_inversion(path)
    other = tmp_path / "two.safetensors"
    save_file({"a": _vectors(1, 0), "b": _vectors(1, 1)}, str(other))
    with pytest.raises(CheckpointError, match="not a textual-inversion embedding"):
        read_textual_inversion(other)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"clip_l": _vectors(1, 0, 768), "clip_g": _vectors(1, 0, 1280)}, str(sdxl))
    with pytest.raises(CheckpointError, match="SDXL"):
        read_textual_inversion(sdxl)


def test_diffusers_bin_and_folder(tmp_path: Path) -> None:
    vector = _vectors(1, 5)[0]
    torch.save({"<bin>": vector}, tmp_path / "learned_embeds.bin")
    loaded = read_textual_inversion(tmp_path)  # a folder: diffusers' learned_embeds.*
    assert (loaded.token, loaded.layout, tuple(loaded.vectors.shape)) == ("<bin>", "diffusers", (1, WIDTH))
    assert torch.equal(loaded.vectors[0], vector)
