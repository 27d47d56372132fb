"""`ldm finetune`: a LoRA fine-tune of a small random-weight SD-layout model on 8 images lowers the denoising
loss on those images (fixed timesteps and noise, before and after), saves only the adapters (a small fraction
of the model), loads back, and the merged model is W + (α/r)·B·A at the adapted projections and the base
everywhere else, computing what the adapter model computes (ours, by hand and its diffusers export); a full
fine-tune learns to predict the noise on those images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_fixtures import caption_folder
from safetensors.torch import load_file
from sd_fixtures import small_models

import ldm_toolkit.train
import pipelines.training.lora
from ldm.training.loop import unwrap
from ldm_toolkit.cli import main as cli_main
from pipelines import load_models
from pipelines.training.lora import LoraTask, load_lora, merge_lora, read_lora_settings

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(ROOT / "configs" / "demo" / "finetune-smoke.yaml")
STEPS = 25
ADAPTED = ("to_q", "to_k", "to_v", "to_out.0")  # the default lora.target_modules
# ᾱ_t of small_models()' schedule (SD's scaled_linear betas, Ho et al. 2020 eq. 4), computed here, not by ldm
ALPHA_BAR = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``base/``: small_models() in our format (8×8 latents, VAE factor 2: native 16 px);
    ``images/``: 8 coloured 8×8 squares on black, 16×16 PNGs, with metadata.jsonl."""
    root = tmp_path_factory.mktemp("finetune")
    small_models().save(root / "base")
    caption_folder(root / "images", "square")
    return root


def finetune_args(data: Path, out: Path, steps: int, *sets: str) -> list[str]:
    options = [f"model.init_from={data / 'base'}", "data.kind=folder", f"data.path={data / 'images'}",
               "data.image_size=16", "optim.batch_size=8", "optim.lr=1e-2", *sets]
    return ["finetune", FINETUNE, "--output-dir", str(out), "--max-steps", str(steps), "--checkpoint-every", "20",
            "--seed", "0", *[arg for option in options for arg in ("--set", option)]]


@dataclass
class LoraRun:
    out: Path
    task: LoraTask  # after the run: its U-Net is merged (export_finetuned merges in place)
    adapter_output: torch.Tensor  # the trained adapter model's U-Net output on unet_inputs()


@pytest.fixture(scope="module")
def lora_run(data: Path) -> LoraRun:
    """The CLI run (25 steps, seed 0), and the trained adapter model's output, taken just before the
    run merges the adapters for its exports."""
    out, found = data / "lora", {}
    real_export = pipelines.training.lora.export_finetuned

    def spy(task: LoraTask, output_dir: str) -> list[Path]:
        task.models.unet = unwrap(task.models.unet).cpu().eval()  # trained on an accelerator where there is one
        found["task"], found["output"] = task, unet_output(task.models.unet)
        return real_export(task, output_dir)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipelines.training.lora, "export_finetuned", spy)
        assert cli_main(finetune_args(data, out, STEPS)) == 0
    assert isinstance(found["task"], LoraTask)
    return LoraRun(out, found["task"], found["output"])


def unet_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 32, generator=g)


@torch.no_grad()
def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    return unet(*unet_inputs())


@torch.no_grad()
def denoising(unet: torch.nn.Module, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, ε) of ``unet`` on the 8 training images at t = 100, 300, ..., 900, each t with fresh noise from one
    generator seeded 0 (the same draws for every model); latents are the base VAE's posterior means (the
    config's ``objective.latents: mean``), contexts the base text encoder's (frozen in these runs)."""
    base, rows = load_models(data / "base"), (data / "images" / "metadata.jsonl").read_text().splitlines()
    rows = [json.loads(row) for row in rows]
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(data / "images" / row["file_name"]))) for row in rows])
    z = base.vae.encode(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1).mean * base.vae.config.scale_factor
    context = base.text_encoder(base.tokenizer([row["text"] for row in rows]))
    generator, predicted, noises = torch.Generator().manual_seed(0), [], []
    for t in (100, 300, 500, 700, 900):
        noise, alpha_bar = torch.randn(z.shape, generator=generator), ALPHA_BAR[t].float()
        x_t = alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * noise
        predicted.append(unet(x_t, torch.full((len(rows),), float(t)), context))
        noises.append(noise)
    return torch.stack(predicted), torch.stack(noises)


def loss_of(prediction: torch.Tensor, noise: torch.Tensor) -> float:
    return (prediction - noise).pow(2).mean().item()


@pytest.mark.slow
def test_lora_lowers_the_loss_and_saves_only_the_adapters(lora_run: LoraRun, data: Path) -> None:
    out = lora_run.out
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first / last > 1.5, losses  # measured: mean of the first 5 steps 2.18, of the last 5 1.18: a factor of 1.84
    # the same loss at fixed timesteps and noise, before and after: measured 2.174 (base) → 1.079 (merged model).
    # 25 LoRA steps on a random U-Net mostly shrink its far-too-large output (both losses are near or above the
    # 1.0 of predicting 0); the full fine-tune below checks that the noise itself is learned.
    before, after = (loss_of(*denoising(load_models(path).unet, data)) for path in (data / "base", out / "merged"))
    assert after < 0.6 * before, (before, after)
    assert sorted(p.name for p in (out / "model").iterdir()) == ["lora.json", "lora.safetensors",
                                                                 "pytorch_lora_weights.safetensors"]
    ratio = (out / "model" / "lora.safetensors").stat().st_size / (data / "base" / "unet.safetensors").stat().st_size
    assert ratio < 0.05  # measured: 1.5% (9,984 adapter parameters beside the U-Net's 793k)
    settings, base = read_lora_settings(out / "model")
    assert (settings.rank, settings.alpha, base) == (4, 4.0, str((data / "base").resolve()))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000025"]


@pytest.mark.slow
def test_the_trained_lora_loads_in_diffusers(lora_run: LoraRun, data: Path, tmp_path: Path) -> None:
    """diffusers' load_lora_weights(model/) on the base model exported to diffusers gives the image of our merged
    model (the same latents, 8 DDIM steps): the kohya-layout file the trainer writes is read by diffusers."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipelines import TextToImagePipeline

    load_models(data / "base").save(tmp_path / "base-diffusers", to="diffusers")
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "base-diffusers", local_files_only=True)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    call = dict(num_inference_steps=8, guidance_scale=5.0, output_type="np")
    plain = theirs("a red square on the left", latents=latents.clone(), **call).images
    theirs.load_lora_weights(lora_run.out / "model")
    adapted = theirs("a red square on the left", latents=latents.clone(), **call).images
    ours = TextToImagePipeline.from_pretrained(lora_run.out / "merged")("a red square on the left", latents=latents,
                                                                          sampler="ddim", progress=False, **call).images
    assert np.abs(adapted - plain).max() > 1e-2  # diffusers loaded something
    assert np.abs(ours - adapted).max() <= 1e-3  # measured: 2.4e-6 (the LoRA moves the image by 0.84)


@pytest.mark.slow
def test_adapters_load_back_exactly(lora_run: LoraRun) -> None:
    out, trained = lora_run.out, lora_run.adapter_output
    _, base = read_lora_settings(out / "model")
    models = load_models(base)
    untrained = unet_output(models.unet)
    load_lora(models, out / "model")
    assert (trained - untrained).abs().max() > 1e-3  # the adapters changed the model
    torch.testing.assert_close(unet_output(models.unet), trained, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resume_loads_the_adapters(lora_run: LoraRun) -> None:
    torch.manual_seed(123)  # fresh adapters with a different A (B = 0: the base model's output)
    resumed = ldm_toolkit.train.build_task("finetune", lora_run.task.config, FINETUNE)
    assert (unet_output(resumed.models.unet.eval()) - lora_run.adapter_output).abs().max() > 1e-3
    resumed.load_model(lora_run.out / "checkpoints" / f"step-{STEPS:08d}" / "model")  # what a resumed run loads
    torch.testing.assert_close(unet_output(resumed.models.unet), lora_run.adapter_output, rtol=0, atol=0)


@pytest.mark.slow
def test_merged_model_equals_the_adapter_model(lora_run: LoraRun, data: Path) -> None:
    out, trained = lora_run.out, lora_run.adapter_output
    base_keys = set(load_models(data / "base").unet.state_dict())
    merged = load_models(out / "merged")  # written by the run: our format
    assert set(merged.unet.state_dict()) == base_keys
    torch.testing.assert_close(unet_output(merged.unet), trained, rtol=0, atol=1e-5)

    models = load_lora(load_models(data / "base"), out / "model")  # merge_lora in memory
    unet = merge_lora(models.unet)
    state = unet.state_dict()
    assert set(state) == base_keys and not any("lora" in key for key in state)
    torch.testing.assert_close(unet_output(unet), trained, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_merge_adds_the_scaled_adapter_product_only_at_the_adapted_layers(lora_run: LoraRun, data: Path) -> None:
    """Hu et al. 2021, eq. 3, by hand from the saved tensors (no peft): the merged weight is W + (α/r)·B·A at
    every attention projection, every other tensor (biases included) is the base's bit for bit, and the base
    U-Net with forward hooks adding (α/r)·B(A x) to those layers computes what the merged model and the peft
    adapter model of the run compute."""
    adapters = load_file(lora_run.out / "model" / "lora.safetensors")
    settings, _ = read_lora_settings(lora_run.out / "model")
    scale = settings.alpha / settings.rank
    pairs = {key.removesuffix(".lora_A.weight"): (a, adapters[key.replace(".lora_A.", ".lora_B.")])
             for key, a in adapters.items() if key.endswith(".lora_A.weight")}
    assert len(adapters) == 2 * len(pairs) == 64
    base, merged = load_models(data / "base").unet, load_models(lora_run.out / "merged").unet
    assert set(pairs) == {name for name, _ in base.named_modules() if name.endswith(ADAPTED)}
    base_state, merged_state = base.state_dict(), merged.state_dict()
    changed = {key for key, value in base_state.items() if not torch.equal(value, merged_state[key])}
    assert changed == {f"{name}.weight" for name in pairs}
    for name, (a, b) in pairs.items():
        assert b.abs().max() > 1e-3  # B starts at 0: every adapter was trained
        torch.testing.assert_close(merged_state[f"{name}.weight"], base_state[f"{name}.weight"] + scale * b @ a,
                                   rtol=0, atol=1e-6)

    def add_adapter(a: torch.Tensor, b: torch.Tensor):
        return lambda module, args, output: output + scale * (args[0] @ a.T) @ b.T

    hooks = [base.get_submodule(name).register_forward_hook(add_adapter(a, b)) for name, (a, b) in pairs.items()]
    by_hand = unet_output(base)
    for hook in hooks:
        hook.remove()
    assert (by_hand - unet_output(base)).abs().max() > 1e-3
    torch.testing.assert_close(unet_output(merged), by_hand, rtol=0, atol=1e-5)
    torch.testing.assert_close(lora_run.adapter_output, by_hand, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_merged_model_exports_to_diffusers(lora_run: LoraRun) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(lora_run.out / "merged-diffusers", local_files_only=True)
    x, t, context = unet_inputs()
    with torch.no_grad():
        theirs = pipe.unet(x, t, context).sample
    torch.testing.assert_close(theirs, lora_run.adapter_output, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_full_finetune_learns_the_noise_of_its_images(data: Path) -> None:
    out = data / "full"
    assert cli_main(finetune_args(data, out, 10, "lora=null", "optim.lr=1e-3")) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 10
    assert (out / "model" / "unet.safetensors").is_file() and (out / "model-diffusers" / "model_index.json").is_file()
    # Fixed timesteps and noise, before and after (the trained weights, not the EMA's). A run that only shrank the
    # random U-Net's far-too-large output, or learned a wrong target, can do no better than the best rescaling
    # c·ε̂ of the base's prediction, and its ε̂ would not correlate with ε. Measured: loss 2.174 → 0.970 (best
    # rescaled base 0.999; predicting 0: 0.999), cosine of ε̂ with ε -0.017 → 0.178.
    base_prediction, noise = denoising(load_models(data / "base").unet, data)
    prediction, _ = denoising(load_models(out / "model", use_ema=False).unet, data)
    c = (base_prediction * noise).sum() / base_prediction.pow(2).sum()  # argmin_c ‖c·ε̂ - ε‖²
    before, rescaled, after = (loss_of(p, noise) for p in (base_prediction, c * base_prediction, prediction))
    assert after < min(0.5 * before, rescaled - 0.01), (before, rescaled, after)
    assert torch.nn.functional.cosine_similarity(prediction.flatten(), noise.flatten(), dim=0) > 0.1


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["model.init_from=null"], "finetune needs model.init_from"),
        (["lora.rnak=4"], "unknown key 'lora.rnak'"),
        (["lora.rank=0"], "rank=0 is out of range"),
        (["model.train_text_encoder=true"], "lora adapts the U-Net only"),
    ],
)
def test_finetune_configs_are_checked(data: Path, capsys: pytest.CaptureFixture, sets: list[str], message: str) -> None:
    assert cli_main(finetune_args(data, data / "bad", 1, *sets)) == 2
    assert message in capsys.readouterr().err
    assert not (data / "bad").exists()


@pytest.mark.slow
def test_an_adapter_folder_of_earlier_versions_loads_with_its_alpha(lora_run: LoraRun, data: Path,
                                                                   tmp_path: Path) -> None:
    """Folders written before the kohya file existed hold lora.safetensors (our layout) and lora.json, whose alpha
    the loader reads: alpha 8 at rank 4 here, so a loader that took alpha = rank would be off by a factor 2."""
    import shutil

    from pipelines import TextToImagePipeline

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(lora_run.out / "model" / "lora.safetensors", old)
    meta = json.loads((lora_run.out / "model" / "lora.json").read_text())
    meta["lora"]["alpha"] = 8.0
    (old / "lora.json").write_text(json.dumps(meta))
    pipe = TextToImagePipeline.from_pretrained(data / "base")
    pipe.load_lora_weights(old)
    settings = pipelines.training.lora.LoraSettings(**{**meta["lora"], "target_modules": tuple(ADAPTED)})
    models = load_lora(load_models(data / "base"), lora_run.out / "model")
    for name, layer in pipelines.training.lora.lora_layers(models.unet).items():
        layer.scaling["default"] = settings.alpha / settings.rank  # the same adapters at alpha 8
    expected = unet_output(models.unet)
    pipe.fuse_lora()
    torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=0, atol=1e-5)
