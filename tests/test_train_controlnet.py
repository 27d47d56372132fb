"""`ldm train-controlnet`: a ControlNet trained on a small random-weight SD-layout model (frozen) with the shapes
samples' semantic maps as RGB hints lowers the denoising loss (fixed timesteps and noise, before and after, the
hint rendered here), leaves the U-Net, the autoencoder and the text encoder bitwise unchanged, saves a folder
diffusers' ControlNetModel loads to the same residuals as the trained module, and resumes bit for bit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from run_fixtures import run_capturing_task
from safetensors.torch import load_file
from sd_fixtures import small_models

import ldm_toolkit.train
from ldm.data.shapes import ShapesDataset
from ldm.io.controlnet_keys import read_controlnet
from ldm.training.loop import unwrap
from ldm_toolkit.cli import main as cli_main
from pipelines import load_models
from pipelines.training.controlnet import ControlNetTask, read_settings

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "demo" / "controlnet-smoke.yaml")
STEPS = 30
WEIGHTS = "diffusion_pytorch_model.safetensors"
# ᾱ_t of small_models()' schedule (SD's scaled_linear betas), computed here, not by ldm
ALPHA_BAR = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
COLOURS = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # bg, ○, □, △


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small_models() in our format: 8×8 latents, VAE factor 2 (32 px shapes images: 16×16 latents)."""
    root = tmp_path_factory.mktemp("controlnet")
    small_models().save(root / "base")
    return root / "base"


def args(base: Path, out: Path, steps: int, *sets: str, checkpoint_every: int = 10) -> list[str]:
    options = [f"model.init_from={base}", "data.image_size=32", "data.length=16", "optim.batch_size=8",
               "optim.lr=1e-3", "tracker=null", *sets]
    return ["train-controlnet", SMOKE, "--output-dir", str(out), "--max-steps", str(steps), "--checkpoint-every",
            str(checkpoint_every), "--seed", "0", *[arg for option in options for arg in ("--set", option)]]




@dataclass
class Run:
    out: Path
    task: ControlNetTask


@pytest.fixture(scope="module")
def trained(base: Path) -> Run:
    out = base.parent / "run"
    return Run(out, run_capturing_task(args(base, out, STEPS), ControlNetTask))


def samples() -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 training images (B, 3, 32, 32) in [-1, 1] and their hints (B, 3, 32, 32): semantic class → colour."""
    data = ShapesDataset(seed=0, length=16, two_object_prob=0.5, drop_prob=0.0, image_size=32, kind="one")
    items = [data[i] for i in range(len(data))]
    images = torch.stack([item["image"] for item in items])
    hints = COLOURS[torch.stack([item["semantic"] for item in items])].permute(0, 3, 1, 2)
    return images, hints


@torch.no_grad()
def denoising_loss(base: Path, net: torch.nn.Module | None) -> float:
    """‖ε̂ − ε‖² of the base U-Net (with ``net``'s residuals) on the training images at t = 100, 300, ..., 900,
    each t with fresh noise from one generator seeded 0, empty prompts: independent of the trainer's code."""
    models = load_models(base)
    images, hints = samples()
    z = models.vae.encode(images).mean * models.vae.config.scale_factor
    context = models.text_encoder(models.tokenizer([""] * len(z)))
    generator, total = torch.Generator().manual_seed(0), 0.0
    for t in (100, 300, 500, 700, 900):
        noise, alpha_bar = torch.randn(z.shape, generator=generator), ALPHA_BAR[t].float()
        x_t = alpha_bar.sqrt() * z + (1 - alpha_bar).sqrt() * noise
        tt = torch.full((len(z),), float(t))
        down, mid = net(x_t, hints, tt, context) if net is not None else (None, None)
        eps = models.unet(x_t, tt, context, down_residuals=down, mid_residual=mid)
        total += (eps - noise).pow(2).mean().item()
    return total / 5


def test_the_samples_here_are_the_trainers(trained: Run) -> None:
    from ldm_toolkit.train import build_dataset

    dataset = build_dataset(trained.task.config.data, "controlnet")
    images, hints = samples()
    assert torch.equal(torch.stack([dataset[i]["image"] for i in range(16)]), images)
    assert hints.amax(dim=(0, 2, 3)).tolist() == [1.0, 1.0, 1.0]  # circles, squares and triangles all present


def test_the_controlnet_lowers_the_denoising_loss(trained: Run, base: Path) -> None:
    losses = [json.loads(line)["loss"] for line in (trained.out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    net = read_controlnet(trained.out / "model")
    before, after = denoising_loss(base, None), denoising_loss(base, net)
    untrained = unwrap(trained.task.controlnet).__class__.from_unet(load_models(base).unet,
                                                                     hint_block_channels=(16, 32))
    assert denoising_loss(base, untrained) == before  # zero convs: an untrained ControlNet changes nothing
    assert after < 0.9 * before, (before, after)  # measured: 2.285 → 1.023


def test_the_base_model_is_bitwise_unchanged(trained: Run, base: Path) -> None:
    loaded, models = load_models(base), trained.task.models
    for name in ("unet", "vae", "text_encoder"):
        got, expected = unwrap(getattr(models, name)).cpu().state_dict(), getattr(loaded, name).state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    assert not any(p.requires_grad for name in ("unet", "vae", "text_encoder")
                   for p in getattr(models, name).parameters())
    model = trained.out / "model"
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "controlnet.json", WEIGHTS]
    settings, base_model = read_settings(model)
    assert (settings.hint, base_model) == ("semantic", str(base.resolve()))
    assert "cond_dropout: 0.5" in (trained.out / "config.yaml").read_text()


def test_the_folder_loads_in_diffusers_with_the_same_residuals(trained: Run) -> None:
    from diffusers import ControlNetModel

    theirs = ControlNetModel.from_pretrained(trained.out / "model", local_files_only=True).eval()
    ours = unwrap(trained.task.controlnet).cpu().eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    hint = torch.rand(2, 3, 16, 16, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        down, mid = ours(x, hint, t, context)
        ref_down, ref_mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    assert len(down) == len(ref_down)
    for a, b in zip(down + [mid], list(ref_down) + [ref_mid]):
        assert (a - b).abs().max() <= 1e-5
    assert mid.abs().max() > 1e-4  # trained: the residuals are not the initial zeros


def test_resume_after_a_checkpoint_reproduces_the_run_bitwise(base: Path, tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli_main(args(base, whole, 6, checkpoint_every=3)) == 0
    assert cli_main(args(base, split, 3, checkpoint_every=3)) == 0
    first = load_file(split / "model" / WEIGHTS)
    assert cli_main(args(base, split, 6, checkpoint_every=3)) == 0
    a, b = load_file(whole / "model" / WEIGHTS), load_file(split / "model" / WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(first[k], a[k]) for k in a)
    adam = [torch.load(out / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=True)["optimizers"][0]
            for out in (whole, split)]
    for index, state in adam[0]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], adam[1]["state"][index][key])


@pytest.mark.parametrize(("sets", "message"), [
    (["model.init_from=null"], "train-controlnet needs model.init_from"),
    (["controlnet.hint=edges"], "hint='edges' is not allowed"),
    (["controlnet.hnt=x"], "unknown key 'controlnet.hnt'"),
    (["data.kind=folder", "data.path=x"], "needs data.kind: shapes"),
    (["model.train_text_encoder=true"], "trains the ControlNet only"),
])
def test_bad_configs_stop_before_models_are_built(base: Path, tmp_path: Path, capsys, monkeypatch, sets, message):
    def refuse(*a, **kw):
        raise AssertionError("models were built")

    monkeypatch.setattr(ldm_toolkit.train, "build_task", refuse)
    assert cli_main(args(base, tmp_path / "o", 1, *sets)) == 2
    err = capsys.readouterr().err
    assert message in err, err
