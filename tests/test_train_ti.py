"""`ldm train-ti`: textual inversion of a small random-weight SD-layout model on 8 coloured squares lowers the
denoising loss of its captions (fixed timesteps and noise, before and after, with contexts computed here from the
base text encoder with the learned vector written into the init word's row), changes nothing but the new token's
vector, saves a file diffusers' load_textual_inversion reads to the same prompt embeddings as ours, and resumes
from a checkpoint bit for bit."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_fixtures import caption_folder, run_capturing_task
from safetensors.torch import load_file
from sd_fixtures import small_models

import ldm_toolkit.train
from ldm.conditioning.text import SplicedEmbedding, TextEncoder, TextEncoderConfig
from ldm.training.loop import unwrap
from ldm_toolkit.cli import main as cli_main
from pipelines import TextToImagePipeline, load_models
from pipelines.training.textual_inversion import TextualInversionTask, read_settings

ROOT = Path(__file__).resolve().parents[1]
TI_SMOKE = str(ROOT / "configs" / "demo" / "ti-smoke.yaml")
TOKEN, INIT = "<my-thing>", "square"
STEPS = 50
# ᾱ_t of small_models()' schedule (SD's scaled_linear betas, Ho et al. 2020 eq. 4), computed here, not by ldm
ALPHA_BAR = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``base/``: small_models() in our format (8×8 latents, VAE factor 2: native 16 px) with its cross-attention
    values ×20, so that the U-Net reads its context (a token can only act through cross-attention; in the plain
    random model the best any vector reaches is 1% below the init word's loss); ``images/``: 8 coloured 8×8
    squares on black, 16×16 PNGs, captioned "a <colour> <my-thing> on the <side>"."""
    root = tmp_path_factory.mktemp("ti")
    models = small_models()
    with torch.no_grad():
        for name, p in models.unet.named_parameters():
            if ".attn2.to_v." in name:
                p.mul_(20.0)
    models.save(root / "base")
    caption_folder(root / "images", TOKEN)
    return root


def ti_args(data: Path, out: Path, steps: int, *sets: str, checkpoint_every: int = 10) -> list[str]:
    options = [f"model.init_from={data / 'base'}", "data.kind=folder", f"data.path={data / 'images'}",
               "data.image_size=16", "optim.batch_size=8", "optim.lr=5e-2", f"ti.token={TOKEN}",
               f"ti.init_word={INIT}", "ti.templates=[]", "tracker=null", *sets]
    return ["train-ti", TI_SMOKE, "--output-dir", str(out), "--max-steps", str(steps), "--checkpoint-every",
            str(checkpoint_every), "--seed", "0", *[arg for option in options for arg in ("--set", option)]]


@dataclass
class TiRun:
    out: Path
    task: TextualInversionTask




@pytest.fixture(scope="module")
def ti_run(data: Path) -> TiRun:
    out = data / "run"
    return TiRun(out, run_capturing_task(ti_args(data, out, STEPS), TextualInversionTask))


def learned(folder: Path) -> torch.Tensor:
    (vectors,) = load_file(folder / "learned_embeds.safetensors").values()
    return vectors.reshape(-1, vectors.shape[-1])


def captions(data: Path) -> list[str]:
    return [json.loads(row)["text"] for row in (data / "images" / "metadata.jsonl").read_text().splitlines()]


@torch.no_grad()
def denoising_loss(data: Path, vector: torch.Tensor) -> float:
    """‖ε̂ − ε‖² of the base U-Net on the 8 training images at t = 100, 300, ..., 900 (each t with fresh noise from
    one generator seeded 0), the contexts those of the captions with the token replaced by "square" under the base
    text encoder whose "square" row holds ``vector``: independent of the trainer's and the loaders' code."""
    base = load_models(data / "base")
    rows = (data / "images" / "metadata.jsonl").read_text().splitlines()
    files = [json.loads(row)["file_name"] for row in rows]
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(data / "images" / f))) for f in files])
    z = base.vae.encode(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1).mean * base.vae.config.scale_factor
    (square,) = base.tokenizer.encode(INIT)
    base.text_encoder.token_embedding_layer.weight[square] = vector
    context = base.text_encoder(base.tokenizer([c.replace(TOKEN, INIT) for c in captions(data)]))
    generator, total = torch.Generator().manual_seed(0), 0.0
    for t in (100, 300, 500, 700, 900):
        noise, alpha_bar = torch.randn(z.shape, generator=generator), ALPHA_BAR[t].float()
        x_t = alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * noise
        total += (base.unet(x_t, torch.full((len(z),), float(t)), context) - noise).pow(2).mean().item()
    return total / 5


@pytest.mark.slow
def test_the_learned_token_lowers_the_denoising_loss(ti_run: TiRun, data: Path) -> None:
    losses = [json.loads(line)["loss"] for line in (ti_run.out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first / last > 1.05, losses  # measured: 3.12 → 2.79, a factor of 1.12
    base = load_models(data / "base")
    (square,) = base.tokenizer.encode(INIT)
    start = base.text_encoder.token_embedding_layer.weight[square].detach()
    before, after = denoising_loss(data, start), denoising_loss(data, learned(ti_run.out / "model")[0])
    # the "before" is the untrained token: init_word's row. Measured: 3.230 → 2.821 (a factor of 0.873)
    assert after < 0.93 * before, (before, after)
    assert (learned(ti_run.out / "model")[0] - start).abs().max() > 1e-2


@pytest.mark.slow
def test_only_the_new_vector_changes_and_only_it_is_saved(ti_run: TiRun, data: Path) -> None:
    base, models = load_models(data / "base"), ti_run.task.models
    for name in ("unet", "vae"):
        got, expected = unwrap(getattr(models, name)).cpu().state_dict(), getattr(base, name).state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    text = unwrap(models.text_encoder).cpu()
    state = {k.replace("token_embedding.base.", "token_embedding."): v for k, v in text.state_dict().items()}
    added = state.pop("text_model.embeddings.token_embedding.added")
    expected = base.text_encoder.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert added.shape == (1, 32) and torch.equal(added, learned(ti_run.out / "model"))
    assert [n for n, p in text.named_parameters() if p.requires_grad] == ["text_model.embeddings.token_embedding.added"]

    model = ti_run.out / "model"
    assert sorted(p.name for p in model.iterdir()) == ["learned_embeds.safetensors", "textual_inversion.json"]
    file = load_file(model / "learned_embeds.safetensors")
    assert list(file) == [TOKEN] and file[TOKEN].shape == (32,)  # diffusers' layout, one vector: (D,)
    settings, base_model = read_settings(model)
    assert (settings.token, settings.init_word, settings.num_vectors, base_model) == (
        TOKEN, INIT, 1, str((data / "base").resolve()))
    saved = (ti_run.out / "config.yaml").read_text()
    assert "cond_dropout: 0.0" in saved  # train-ti's default: no condition dropout
    assert sorted(p.name for p in (ti_run.out / "checkpoints").iterdir()) == ["step-00000040", "step-00000050"]
    assert torch.equal(learned(ti_run.out / "checkpoints" / "step-00000050" / "model"), added)


@pytest.mark.slow
def test_the_embedding_loads_in_diffusers_as_in_ours(ti_run: TiRun, data: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    load_models(data / "base").save(tmp_path / "base-diffusers", to="diffusers")
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "base-diffusers", local_files_only=True)
    theirs.load_textual_inversion(str(ti_run.out / "model"))
    ours = TextToImagePipeline.from_pretrained(data / "base")
    assert ours.load_textual_inversion(ti_run.out / "model") == TOKEN
    prompts = [f"a photo of {TOKEN}, red", "a blue square"]
    with torch.no_grad():
        expected = torch.cat([theirs.encode_prompt(p, torch.device("cpu"), 1, False)[0] for p in prompts])
        got = ours.encode_prompts(prompts)[0]
        trained = unwrap(ti_run.task.models.text_encoder).cpu()(ti_run.task.models.tokenizer(prompts))
    assert got.shape == expected.shape == (2, 77, 32)
    assert (got - expected).abs().max() <= 1e-6
    assert (trained - expected).abs().max() <= 1e-6  # what the trainer optimised is what the file gives
    plain = TextToImagePipeline.from_pretrained(data / "base").encode_prompts([f"a photo of {INIT}, red"])[0]
    assert (got[:1] - plain).abs().max() > 1e-2  # the learned vector is not the init word's


@pytest.mark.slow
def test_resume_after_a_checkpoint_reproduces_the_run_bitwise(data: Path, tmp_path: Path) -> None:
    """Two vectors and templates (a template per image drawn from the step's generator): 6 steps at once, and 3
    steps then 3 more resumed from the step-3 checkpoint, give the same vectors and Adam moments bit for bit."""
    sets = ("ti.num_vectors=2", "ti.templates=['a photo of {}', 'a {} on black']", "optim.lr=1e-2")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli_main(ti_args(data, whole, 6, *sets, checkpoint_every=3)) == 0
    assert cli_main(ti_args(data, split, 3, *sets, checkpoint_every=3)) == 0
    first = learned(split / "model")
    assert cli_main(ti_args(data, split, 6, *sets, checkpoint_every=3)) == 0
    final = learned(whole / "model")
    assert final.shape == (2, 32) and not torch.equal(first, final)
    assert torch.equal(learned(split / "model"), final)
    adam = [torch.load(out / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=True)["optimizers"][0]
            for out in (whole, split)]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(adam[0]["state"][0][key], adam[1]["state"][0][key])
    file = load_file(whole / "model" / "learned_embeds.safetensors")
    assert file[TOKEN].shape == (2, 32)  # diffusers' layout for n vectors: (n, D)


def test_spliced_rows_equal_a_lookup_into_the_whole_table_and_alone_get_gradients() -> None:
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(width=16, layers=1, heads=2, max_length=8)).requires_grad_(False)
    reference = copy.deepcopy(encoder)
    vectors = torch.randn(3, 16)
    reference.append_token_embeddings(vectors)
    assert encoder.splice_token_embeddings(vectors) == [49408, 49409, 49410]
    layer = encoder.token_embedding_layer
    assert isinstance(layer, SplicedEmbedding) and layer.num_embeddings == 49411
    ids = torch.tensor([[49406, 49408, 3, 49410, 49409, 49407, 49407, 49407]])
    assert torch.equal(encoder(ids), reference(ids))
    assert torch.equal(layer.weight, reference.token_embedding_layer.weight)
    encoder(ids).sum().backward()
    assert [n for n, p in encoder.named_parameters() if p.requires_grad] == [
        "text_model.embeddings.token_embedding.added"]
    assert (layer.added.grad.abs().sum(dim=1) > 0).all()  # rows 49408, 49409 and 49410 are all used
    encoder.zero_grad()
    encoder(ids[:, :3]).sum().backward()  # only row 49408 is used
    assert layer.added.grad[0].abs().sum() > 0 and not layer.added.grad[1:].any()
    with pytest.raises(IndexError, match=r"\[0, 49411\)"):
        encoder(torch.tensor([[49411]]))


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["ti=null"], "train-ti needs a ti: section"),
        (["model.init_from=null"], "train-ti needs model.init_from"),
        (["ti.tokn=x"], "unknown key 'ti.tokn'"),
        (["ti.token=two words"], "token='two words' is not allowed"),
        (["ti.templates=['a photo of']"], "templates entry 'a photo of' is not allowed"),
        (["ti.num_vectors=0"], "num_vectors=0 is out of range"),
        (["ti.token=<other>"], "does not contain ti.token '<other>'"),
        (["model.train_text_encoder=true"], "trains the new token's vectors only"),
    ],
)
def test_bad_configs_stop_before_models_are_built(data: Path, tmp_path: Path, capsys, monkeypatch, sets: list[str],
                                                  message: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("models were built")

    monkeypatch.setattr(ldm_toolkit.train, "build_task", refuse)
    assert cli_main(ti_args(data, tmp_path / "o", 1, *[s for s in sets])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_an_init_word_of_several_tokens_is_refused(data: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(ti_args(data, tmp_path / "o", 1, "ti.init_word=red square")) == 2
    assert "ti.init_word='red square' is 2 tokens" in capsys.readouterr().err
