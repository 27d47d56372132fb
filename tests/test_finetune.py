"""`ldm finetune`: a LoRA fine-tune of a small random-weight SD-layout model on 8 images lowers the loss,
saves only the adapters (a small fraction of the model), loads back, and the merged model (ours and
its diffusers export) computes what the adapter model computes; a full fine-tune runs too."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from sd_fixtures import small_models

import ldm_toolkit.train
import pipelines.training.lora
from ldm_toolkit.cli import main as cli_main
from ldm.training.loop import unwrap
from pipelines.training.lora import LoraTask, load_lora, merge_lora, read_lora_settings
from pipelines import load_models

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(ROOT / "configs" / "demo" / "finetune-smoke.yaml")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
STEPS = 25


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``base/``: small_models() in our format (8×8 latents, VAE factor 2: native 16 px);
    ``images/``: 8 coloured 8×8 squares on black, 16×16 PNGs, with metadata.jsonl."""
    root = tmp_path_factory.mktemp("finetune")
    small_models().save(root / "base")
    images, lines = root / "images", []
    images.mkdir()
    for i in range(8):
        name, rgb = list(COLOURS.items())[i % 4]
        image, x = Image.new("RGB", (16, 16)), 2 + 6 * (i // 4)
        image.paste(rgb, (x, 4, x + 8, 12))
        image.save(images / f"{i}.png")
        side = "left" if i < 4 else "right"
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {name} square on the {side}"}))
    (images / "metadata.jsonl").write_text("\n".join(lines) + "\n")
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


def test_lora_lowers_the_loss_and_saves_only_the_adapters(lora_run: LoraRun, data: Path) -> None:
    out = lora_run.out
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first / last > 1.5, losses  # measured: mean of the first 5 steps 2.18, of the last 5 1.18: a factor of 1.84
    assert sorted(p.name for p in (out / "model").iterdir()) == ["lora.json", "lora.safetensors"]
    ratio = (out / "model" / "lora.safetensors").stat().st_size / (data / "base" / "unet.safetensors").stat().st_size
    assert ratio < 0.05  # measured: 1.5% (9,984 adapter parameters beside the U-Net's 793k)
    settings, base = read_lora_settings(out / "model")
    assert (settings.rank, settings.alpha, base) == (4, 4.0, str((data / "base").resolve()))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000025"]


def test_adapters_load_back_exactly(lora_run: LoraRun) -> None:
    out, trained = lora_run.out, lora_run.adapter_output
    _, base = read_lora_settings(out / "model")
    models = load_models(base)
    untrained = unet_output(models.unet)
    load_lora(models, out / "model")
    assert (trained - untrained).abs().max() > 1e-3  # the adapters changed the model
    torch.testing.assert_close(unet_output(models.unet), trained, rtol=0, atol=1e-6)


def test_resume_loads_the_adapters(lora_run: LoraRun) -> None:
    torch.manual_seed(123)  # fresh adapters with a different A (B = 0: the base model's output)
    resumed = ldm_toolkit.train.build_task("finetune", lora_run.task.config, FINETUNE)
    assert (unet_output(resumed.models.unet.eval()) - lora_run.adapter_output).abs().max() > 1e-3
    resumed.load_model(lora_run.out / "checkpoints" / f"step-{STEPS:08d}" / "model")  # what a resumed run loads
    torch.testing.assert_close(unet_output(resumed.models.unet), lora_run.adapter_output, rtol=0, atol=0)


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


def test_merged_model_exports_to_diffusers(lora_run: LoraRun) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(lora_run.out / "merged-diffusers", local_files_only=True)
    x, t, context = unet_inputs()
    with torch.no_grad():
        theirs = pipe.unet(x, t, context).sample
    torch.testing.assert_close(theirs, lora_run.adapter_output, rtol=0, atol=1e-4)


def test_full_finetune_smoke(data: Path) -> None:
    out = data / "full"
    assert cli_main(finetune_args(data, out, 3, "lora=null", "optim.lr=1e-4")) == 0
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(0 < loss < 100 for loss in losses)
    assert (out / "model" / "unet.safetensors").is_file() and (out / "model-diffusers" / "model_index.json").is_file()
    before, after = load_models(data / "base").unet, load_models(out / "model", use_ema=False).unet
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


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
