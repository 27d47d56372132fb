"""The ``ldm`` command line: outputs, grids, and one-line errors with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sd_fixtures import small_models

from ldm_toolkit import sampling
from ldm_toolkit.cli import build_parser, main


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    paths = {"t2i": root / "t2i", "sr": root / "sr", "sem": root / "sem", "cls": root / "cls"}
    small_models().save(paths["t2i"])
    small_models(concat={"kind": "image"}, text=False).save(paths["sr"])
    small_models(concat={"kind": "semantic", "num_classes": 4}, text=False).save(paths["sem"])
    small_models(classifier=True).save(paths["cls"])
    return paths


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_a_png_and_a_grid(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    code, out, _ = run(["generate", "a red circle", "--model", str(models["t2i"]), "--steps", "2",
                        "-o", str(tmp_path / "a.png")], capsys)
    assert code == 0 and "wrote" in out
    assert Image.open(tmp_path / "a.png").size == (16, 16)
    code, _, _ = run(["generate", "a red circle", "--model", str(models["t2i"]), "--steps", "2", "-n", "4",
                      "-o", str(tmp_path / "grid.png")], capsys)
    assert code == 0 and Image.open(tmp_path / "grid.png").size == (32, 32)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    for i in range(4):  # each image is written too, and is the grid's cell
        each = Image.open(tmp_path / f"grid-{i + 1}.png")
        assert np.array_equal(np.asarray(each), grid[16 * (i // 2): 16 * (i // 2 + 1), 16 * (i % 2): 16 * (i % 2 + 1)])
        assert f"Batch size: 4, Batch pos: {i}" in each.text["parameters"]


def test_without_a_seed_each_run_differs_and_reports_its_seed(models: dict[str, Path], tmp_path: Path,
                                                              capsys) -> None:
    seeds, pixels = [], []
    for name in ("a.png", "b.png"):
        code, out, _ = run(["generate", "a red circle", "--model", str(models["t2i"]), "--steps", "2",
                            "-o", str(tmp_path / name)], capsys)
        seed = int(out.split("(seed ")[1].split(")")[0])
        assert code == 0 and f"Seed: {seed}," in Image.open(tmp_path / name).text["parameters"]
        seeds.append(seed)
        pixels.append(np.asarray(Image.open(tmp_path / name)))
    assert seeds[0] != seeds[1] and not np.array_equal(*pixels)
    code, _, _ = run(["generate", "a red circle", "--model", str(models["t2i"]), "--steps", "2", "--seed",
                      str(seeds[0]), "-o", str(tmp_path / "again.png")], capsys)
    assert code == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), pixels[0])


@pytest.mark.parametrize("batch", [1, 3])
def test_from_png_makes_the_same_image_bit_for_bit(models: dict[str, Path], tmp_path: Path, capsys,
                                                   batch: int) -> None:
    first = ["generate", "a red circle, large", "--negative", "a \"blue\" square", "--model", str(models["t2i"]),
             "--steps", "3", "--guidance", "5.5", "--sampler", "euler_a", "--guidance-interval", "0.5,inf",
             "-n", str(batch), "-o", str(tmp_path / "first.png")]
    assert run(first, capsys)[0] == 0
    source = tmp_path / ("first.png" if batch == 1 else "first-2.png")  # one image of a batch: its own pixels
    code, _, err = run(["generate", "--from-png", str(source), "-o", str(tmp_path / "again.png")], capsys)
    assert code == 0, err
    again = Image.open(tmp_path / "again.png")
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(source)))
    assert again.text["parameters"] == Image.open(source).text["parameters"]


def test_from_png_without_parameters_is_one_line(tmp_path: Path, capsys) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    code, _, err = run(["generate", "--from-png", str(tmp_path / "plain.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and "carries no generation parameters" in err
    code, _, err = run(["generate"], capsys)
    assert code == 2 and "prompt is missing" in err


def test_inpaint_keeps_the_unmasked_part_on_a_text_to_image_model(models: dict[str, Path], tmp_path: Path,
                                                                  capsys) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, out, err = run(["inpaint", str(tmp_path / "image.png"), str(tmp_path / "mask.png"), "a red circle",
                          "--model", str(models["t2i"]), "--steps", "3", "--seed", "1", "-o", str(tmp_path / "o.png")],
                         capsys)
    assert code == 0 and "(seed 1)" in out, err
    written = Image.open(tmp_path / "o.png")
    assert written.size == (16, 16) and "Denoising strength: 1, Mask blur: 0" in written.text["parameters"]
    code, _, err = run(["inpaint", str(tmp_path / "image.png"), str(tmp_path / "nope.png"), "x",
                        "--model", str(models["t2i"]), "-o", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "mask_image='" in err and "is not a readable image" in err


def test_classifier_guided_generation(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    code, _, err = run(["generate", "", "--model", str(models["t2i"]), "--classifier", str(models["cls"]), "--class",
                        "triangle", "--classifier-scale", "5", "--steps", "2", "-o", str(tmp_path / "c.png")], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "c.png").mode == "RGB"


def test_upscale_and_semantic(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    Image.new("RGB", (8, 8), (30, 70, 220)).save(tmp_path / "low.png")
    code, _, err = run(["upscale", str(tmp_path / "low.png"), "--model", str(models["sr"]), "--steps", "2",
                        "-o", str(tmp_path / "high.png")], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "high.png").size == (16, 16)
    labels = np.zeros((16, 16), dtype=np.uint8)
    labels[2:8, 2:8] = 1
    Image.fromarray(labels, mode="L").save(tmp_path / "map.png")
    code, _, err = run(["semantic", str(tmp_path / "map.png"), "--model", str(models["sem"]), "--steps", "2",
                        "-o", str(tmp_path / "sem.png")], capsys)
    assert code == 0, err
    labels[0, 0] = 9
    Image.fromarray(labels, mode="L").save(tmp_path / "bad.png")
    code, _, err = run(["semantic", str(tmp_path / "bad.png"), "--model", str(models["sem"])], capsys)
    assert code == 2 and err == "ldm: error: semantic map has label 9; allowed: labels 0..3 of this model\n"


def test_convert_to_diffusers_and_sd(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert run(["convert", str(models["t2i"]), str(tmp_path / "d"), "--to", "diffusers"], capsys)[0] == 0
    assert (tmp_path / "d" / "model_index.json").is_file()
    assert run(["convert", str(tmp_path / "d"), str(tmp_path / "m.safetensors"), "--to", "sd"], capsys)[0] == 0
    code, _, err = run(["convert", str(models["sr"]), str(tmp_path / "x"), "--to", "diffusers"], capsys)
    assert code == 2 and "needs a text-to-image model" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--height", "15"], "height=15 is not allowed; allowed: a positive multiple of 2"),
        (["--steps", "0"], "num_inference_steps=0 is out of range"),
        (["--guidance", "-2"], "guidance_scale=-2.0 is out of range; allowed: a finite number in [0, inf)"),
        (["--sampler", "plms"],
         "sampler='plms' is not supported; allowed: 'ddpm', 'ddim', 'dpmpp_2m', 'euler', 'euler_a'"),
        (["-n", "0"], "num_images_per_prompt=0 is out of range"),
        (["-n", "10000"], "num_images_per_prompt=10000 is out of range; allowed: an integer in [1, 256]"),
        (["--guidance", "inf"], "guidance_scale=inf is out of range"),
        (["--guidance", "nan"], "guidance_scale=nan is out of range"),
        (["--seed", str(2**64)], f"seed={2**64} is out of range; allowed: an integer in [0, {2**64 - 1}]"),
        (["--classifier", "x"], "--classifier='x' is not allowed without --class"),
        (["-o", "/proc/x.png"], "-o/--output='/proc/x.png': the folder '/proc' does not exist or is not writable"),
    ],
)
def test_bad_generate_arguments_give_one_line(models: dict[str, Path], tmp_path: Path, capsys, args, message) -> None:
    argv = ["generate", "a red circle", "--model", str(models["t2i"]), "-o", str(tmp_path / "x.png"), *args]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_unparsable_argument_gives_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a red circle", "--steps", "two"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "ldm: error: argument --steps: invalid int value: 'two' (see --help)\n"


@pytest.mark.slow
def test_missing_and_corrupt_models_in_a_subprocess(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x01" * 100)
    cases = ((tmp_path / "nope", "does not exist"), (tmp_path / "bad.safetensors", "not a readable safetensors"))
    for model, message in cases:
        result = subprocess.run([sys.executable, "-m", "ldm_toolkit.cli", "generate", "a red circle",
                                 "--model", str(model), "-o", str(tmp_path / "x.png")], capture_output=True, text=True)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def _full_disk() -> None:
    """For a child process: writes past 100 bytes fail with EFBIG, as writes to a full disk fail."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_what_was_there(models: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    (tmp_path / "old.png").write_bytes(b"old")
    cases = (["convert", str(models["t2i"]), str(tmp_path / "sd.safetensors"), "--to", "sd"],
             ["convert", str(models["t2i"]), str(models["sr"]), "--to", "folder"],  # replaces a model folder
             ["generate", "a red circle", "--model", str(models["t2i"]), "--steps", "2",
              "-o", str(tmp_path / "old.png")])
    before = sorted(p.name for p in models["sr"].iterdir())
    for args in cases:
        result = subprocess.run([sys.executable, "-m", "ldm_toolkit.cli", *args], capture_output=True, text=True,
                                preexec_fn=_full_disk)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert last.startswith(f"ldm: error: {args[2] if args[0] == 'convert' else args[-1]}: could not be written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"] and (tmp_path / "old.png").read_bytes() == b"old"
    assert sorted(p.name for p in models["sr"].iterdir()) == before  # the folder it would have replaced is whole
    assert not [p for p in models["sr"].parent.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.slow
def test_help_has_examples() -> None:
    result = subprocess.run([sys.executable, "-m", "ldm_toolkit.cli", "generate", "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "examples:" in result.stdout and "--classifier-scale" in result.stdout


def test_upscale_input_of_the_wrong_mode_gives_one_line(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "gray.png")
    code, _, err = run(["upscale", str(tmp_path / "gray.png"), "--model", str(models["sr"])], capsys)
    assert code == 2 and err == "ldm: error: image has mode 'L'; allowed: 'RGB'\n"
    code, _, err = run(["upscale", str(tmp_path / "missing.png"), "--model", str(models["sr"])], capsys)
    assert code == 2 and "is not a readable image" in err and err.count("\n") == 1


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without cuda, mps or xpu (what the CPU test machine is anyway)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)


def test_device_auto_is_the_default_and_picks_cpu_here(models: dict[str, Path], tmp_path: Path, capsys, monkeypatch,
                                                       cpu_only) -> None:
    assert build_parser().parse_args(["generate", "x"]).device == "auto"
    assert build_parser().parse_args(["eval", "clip"]).device == "auto"
    devices = []

    def pipeline(cls: type, args):
        pipe = load_pipeline(cls, args)
        devices.append(pipe.device)
        return pipe

    load_pipeline = sampling.pipeline
    monkeypatch.setattr(sampling, "pipeline", pipeline)
    code, _, err = run(["generate", "a red circle", "--model", str(models["t2i"]), "--steps", "2",
                        "-o", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    assert devices == [torch.device("cpu")]


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "nonsense"])
@pytest.mark.parametrize("command", [["generate", "a red circle"], ["upscale", "low.png"], ["eval", "clip"]])
def test_unavailable_device_gives_one_line_before_loading(tmp_path: Path, capsys, monkeypatch, cpu_only, device: str,
                                                           command: list[str]) -> None:
    monkeypatch.setattr(sampling, "pipeline", lambda *args: pytest.fail("a model was loaded"))
    monkeypatch.setattr("pipelines.evaluation.run_evaluation", lambda *args: pytest.fail("an evaluation ran"))
    code, _, err = run([*command, "--model", str(tmp_path / "missing"), "--device", device], capsys)
    assert code == 2
    assert err == f"ldm: error: --device={device} is not available here; allowed: auto, cpu\n"


def test_a_classifier_class_that_does_not_exist_gives_one_line(models: dict[str, Path], tmp_path: Path,
                                                                capsys) -> None:
    code, _, err = run(["generate", "", "--model", str(models["cls"]), "--class", "hexagon", "--steps", "2",
                        "-o", str(tmp_path / "x.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and "class_label='hexagon' is not allowed; allowed:" in err


def test_pngs_carry_their_generation_parameters(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    code, _, err = run(["generate", "a red circle", "--negative", "a blue square", "--model", str(models["t2i"]),
                        "--steps", "3", "--guidance", "4", "--sampler", "euler_a", "--seed", "7",
                        "-o", str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    text = Image.open(tmp_path / "a.png").text["parameters"]  # the A1111 chunk, as the WebUIs read it back
    prompt, negative, settings = text.split("\n")
    assert (prompt, negative) == ("a red circle", "Negative prompt: a blue square")
    fields = dict(pair.split(": ", 1) for pair in settings.split(", "))
    assert fields["Steps"] == "3" and fields["Sampler"] == "Euler a" and fields["CFG scale"] == "4"
    assert fields["Seed"] == "7" and fields["Size"] == "16x16" and fields["Model"] == str(models["t2i"])


def test_ctrl_c_while_generating_is_one_line_and_status_130(tmp_path: Path, capsys, monkeypatch) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "pipeline", interrupted)
    assert main(["generate", "a red circle", "-o", str(tmp_path / "out.png")]) == 130
    assert capsys.readouterr().err == "ldm: interrupted (Ctrl-C)\n"


@pytest.mark.parametrize("case", ["folder", "missing", "jpeg"])
def test_bad_output_paths_fail_before_a_model_is_loaded(tmp_path: Path, capsys, monkeypatch, case: str) -> None:
    monkeypatch.setattr(sampling, "pipeline", lambda *args: pytest.fail("a model was loaded"))
    output = {"folder": tmp_path, "missing": tmp_path / "no" / "x.png", "jpeg": tmp_path / "x.jpg"}[case]
    assert main(["generate", "a red circle", "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"-o/--output={str(output)!r}" in err


def test_non_finite_latents_are_an_error_not_a_black_image(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(models["t2i"])
    with torch.no_grad():
        next(pipe.models.unet.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"sampling gave non-finite latents \(seed 3, guidance_scale 7.5"):
        pipe("a red circle", num_inference_steps=2, seed=3, progress=False)


def test_guidance_interval_option(models: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    from pipelines import TextToImagePipeline

    seen = {}
    real_call = TextToImagePipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(TextToImagePipeline, "__call__", spy)
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", str(models["t2i"]), "--steps", "2", "-o", str(out),
                 "--guidance-interval", "5,inf"]) == 0
    assert seen["guidance_interval"] == (5.0, None)
    with pytest.raises(SystemExit):
        main(["generate", "a red circle", "--guidance-interval", "5"])
    assert "argument --guidance-interval: '5' is not LOW,HIGH" in capsys.readouterr().err


def test_an_upscale_over_max_pixels_stops_before_sampling(models: dict[str, Path], tmp_path: Path, capsys,
                                                          monkeypatch) -> None:
    from pipelines import base

    Image.new("RGB", (300, 300), (30, 70, 220)).save(tmp_path / "big.png")  # x2 → 600×600 > 512×512
    monkeypatch.setattr(base.Pipeline, "sample", lambda *args: pytest.fail("sampling started"))
    code, _, err = run(["upscale", str(tmp_path / "big.png"), "--model", str(models["sr"]), "-o",
                        str(tmp_path / "high.png")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "1 image(s) of 600x600 are 360000 output pixels; allowed: at most max_pixels=262144" in err
    Image.new("RGB", (40, 40), (30, 70, 220)).save(tmp_path / "small.png")  # x2 → 80×80 = 6400 pixels
    small = ["upscale", str(tmp_path / "small.png"), "--model", str(models["sr"]), "-o", str(tmp_path / "high.png")]
    code, _, err = run(small + ["--max-pixels", "6399"], capsys)
    assert code == 2 and "are 6400 output pixels; allowed: at most max_pixels=6399" in err
    monkeypatch.undo()
    code, _, err = run(small + ["--max-pixels", "6400", "--steps", "2"], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "high.png").size == (80, 80)


def test_lora_and_embedding_options(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    from pipelines import load_models
    from pipelines.training.lora import kohya_state_dict

    unet = load_models(models["t2i"]).unet
    g = torch.Generator().manual_seed(0)
    peft_state = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_v")):
            peft_state[f"{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g)
            peft_state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g)
    save_file(kohya_state_dict(peft_state, unet.config, 2.0), tmp_path / "style.safetensors")
    save_file({"<shiny>": torch.randn(32, generator=g)}, tmp_path / "learned_embeds.safetensors")
    base = ["generate", "a <shiny> red circle", "--model", str(models["t2i"]), "--steps", "3", "--seed", "4"]
    outputs = {}
    for name, extra in (("plain", []), ("lora", ["--lora", f"{tmp_path / 'style.safetensors'}:0.5"]),
                        ("both", ["--lora", str(tmp_path / "style.safetensors"),
                                  "--embedding", str(tmp_path / "learned_embeds.safetensors")])):
        code, _, err = run([*base, *extra, "-o", str(tmp_path / f"{name}.png")], capsys)
        assert code == 0, err
        outputs[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert np.abs(outputs["lora"] - outputs["plain"]).max() > 0 and np.abs(outputs["both"] - outputs["lora"]).max() > 0
    assert "LoRA: " in Image.open(tmp_path / "both.png").text["parameters"]
    code, _, err = run(["generate", "--from-png", str(tmp_path / "both.png"), "-o", str(tmp_path / "again.png")],
                       capsys)
    assert code == 0 and np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), outputs["both"]), err
    code, _, err = run([*base, "--lora", str(tmp_path / "learned_embeds.safetensors"), "-o", str(tmp_path / "x.png")],
                       capsys)
    assert code == 2 and err.count("\n") == 1 and "learned_embeds.safetensors" in err, err


def test_control_option_runs_a_controlnet(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    from sd_fixtures import randomize

    from ldm.io.controlnet_keys import write_controlnet_diffusers
    from ldm.modules.controlnet import ControlNet
    from pipelines import load_models

    net = ControlNet.from_unet(load_models(models["t2i"]).unet, hint_block_channels=(16, 32))  # f = 2 hints
    randomize(net, 5)  # zero convs would add nothing
    write_controlnet_diffusers(net, tmp_path / "cn")
    hint = np.zeros((16, 16, 3), np.uint8)
    hint[4:12, 4:12] = 255
    Image.fromarray(hint).save(tmp_path / "hint.png")
    base = ["generate", "a red circle", "--model", str(models["t2i"]), "--steps", "3", "--seed", "2"]
    assert run([*base, "-o", str(tmp_path / "plain.png")], capsys)[0] == 0
    code, _, err = run([*base, "--control", f"{tmp_path / 'cn'}={tmp_path / 'hint.png'}:0.8",
                        "-o", str(tmp_path / "ctl.png")], capsys)
    assert code == 0, err
    plain, ctl = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("plain", "ctl"))
    assert np.abs(plain - ctl).max() > 0 and "Control: " in Image.open(tmp_path / "ctl.png").text["parameters"]
    code, _, err = run([*base, "--control", f"{tmp_path / 'cn'}={tmp_path / 'missing.png'}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "the control image" in err and "does not exist" in err
