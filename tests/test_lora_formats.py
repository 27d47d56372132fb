"""LoRA files in the kohya/A1111 and diffusers/peft layouts, loaded onto SD v1 and v2 layouts, against diffusers'
``load_lora_weights`` on the same random weights and the same latents."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file
from sd_fixtures import small_v2_models

from pipelines import TextToImagePipeline

PROMPT, NEGATIVE = "a large red circle in the top left on a white background", "a blue square"
RANK = 4
UNET_LINEAR = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
               "time_emb_proj")
UNET_CONV = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def lora_modules(pipe: StableDiffusionPipeline, conv: bool = True) -> dict[str, dict[str, torch.nn.Module]]:
    """diffusers module names (text encoder with ``text_model.``, as files have them) a LoRA of ours adapts."""
    unet = {name: m for name, m in pipe.unet.named_modules()
            if name.endswith(UNET_LINEAR + (UNET_CONV if conv else ())) and isinstance(m, (torch.nn.Linear,
                                                                                            torch.nn.Conv2d))}
    text = {"text_model." + name.removeprefix("text_model."): m for name, m in pipe.text_encoder.named_modules()
            if name.endswith(TEXT) and isinstance(m, torch.nn.Linear)}
    return {"unet": unet, "text_encoder": text}


def random_pair(module: torch.nn.Module, generator: torch.Generator, rank: int = RANK) -> tuple[torch.Tensor, ...]:
    """A (r, in[, kh, kw]) and B (out, r[, 1, 1]) of a random LoRA on ``module`` (a 3×3 conv: LoCon's 3×3 A, 1×1 B)."""
    if isinstance(module, torch.nn.Conv2d):
        down_shape, up_shape = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    else:
        down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
    return (torch.randn(down_shape, generator=generator) * 0.1, torch.randn(up_shape, generator=generator) * 0.1)


def write_kohya(pipe: StableDiffusionPipeline, path: Path, seed: int) -> Path:
    """A kohya/A1111 file built by hand from diffusers module names: lora_unet_/lora_te_ + the path with ``_``, one
    U-Net module with its own alpha (3), the rest α = 2 at rank 4 (scale 0.5)."""
    generator, state = torch.Generator().manual_seed(seed), {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for i, (name, module) in enumerate(sorted(lora_modules(pipe)[component].items())):
            key = prefix + name.replace(".", "_")
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = random_pair(module, generator)
            # diffusers 0.42 with transformers >= 5.6 drops a text-encoder alpha_pattern (its names keep
            # `text_model.`), so the module with its own alpha is in the U-Net
            state[f"{key}.alpha"] = torch.tensor(3.0 if (component, i) == ("unet", 1) else 2.0)
    save_file(state, str(path))
    return path


def write_peft(pipe: StableDiffusionPipeline, folder: Path, seed: int, conv: bool = True) -> Path:
    """A diffusers/peft file written by diffusers' own ``save_lora_weights``, with its LoraConfig metadata
    (α = 8 at rank 4: scale 2; one module α = 2 through alpha_pattern)."""
    generator, layers = torch.Generator().manual_seed(seed), {"unet": {}, "text_encoder": {}}
    modules = lora_modules(pipe, conv)
    for component, named in modules.items():
        for name, module in sorted(named.items()):
            if component == "text_encoder" and not hasattr(pipe.text_encoder, "text_model"):
                name = name.removeprefix("text_model.")  # transformers >= 5.6 flattened CLIPTextModel
            down, up = random_pair(module, generator)
            layers[component][f"{name}.lora_A.weight"], layers[component][f"{name}.lora_B.weight"] = down, up
    special = sorted(modules["unet"])[3]

    def metadata(component: str) -> dict:
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in layers[component]})
        pattern = {special: 2.0} if component == "unet" else {}
        return {"r": RANK, "lora_alpha": 8.0, "target_modules": targets, "alpha_pattern": pattern}

    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers["unet"],
                                              text_encoder_lora_layers=layers["text_encoder"],
                                              unet_lora_adapter_metadata=metadata("unet"),
                                              text_encoder_lora_adapter_metadata=metadata("text_encoder"))
    return folder / "pytorch_lora_weights.safetensors"


def diffusers_images(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, latents=latents.clone(),
                height=16, width=16, output_type="np").images


def our_images(pipe: TextToImagePipeline, latents: torch.Tensor) -> np.ndarray:
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, sampler="ddim",
                latents=latents, output_type="np", progress=False).images


class Bases:
    """Our pipeline and diffusers' on the same weights, SD v1 (CLIP, conv proj_in) or v2 (open_clip, v-prediction)."""

    def __init__(self, root: Path, version: str, folder: Path | None = None) -> None:
        if version == "v1":
            self.folder = folder
            self.ours = TextToImagePipeline.from_pretrained(folder)
        else:
            models = small_v2_models()
            self.folder = root / "v2"
            models.save(self.folder, to="diffusers")
            self.ours = TextToImagePipeline(models)
        self.latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
        self.plain = our_images(self.ours, self.latents)

    def diffusers(self) -> StableDiffusionPipeline:
        pipe = StableDiffusionPipeline.from_pretrained(self.folder, local_files_only=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return pipe


@pytest.fixture(scope="module", params=["v1", "v2"])
def bases(request: pytest.FixtureRequest, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Bases:
    return Bases(tmp_path_factory.mktemp("lora"), request.param, folder if request.param == "v1" else None)


def write(fmt: str, bases: Bases, tmp_path: Path, seed: int = 0) -> Path:
    pipe = bases.diffusers()
    if fmt == "kohya":
        return write_kohya(pipe, tmp_path / f"kohya{seed}.safetensors", seed)
    return write_peft(pipe, tmp_path / f"peft{seed}", seed)


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_images_equal_diffusers_at_scale_one_and_a_half(bases: Bases, fmt: str, tmp_path: Path) -> None:
    path = write(fmt, bases, tmp_path)
    reference = bases.diffusers()
    reference.load_lora_weights(path, adapter_name="style")
    ours = bases.ours
    try:
        assert ours.load_lora_weights(path, adapter_name="style") == "style"
        assert ours.get_active_adapters() == ["style"]
        for scale in (1.0, 0.5):
            reference.set_adapters(["style"], adapter_weights=[scale])
            ours.set_adapters(["style"], adapter_weights=[scale])
            expected, images = diffusers_images(reference, bases.latents), our_images(ours, bases.latents)
            difference = np.abs(images - expected).max()
            print(f"{fmt} {scale}: max abs {difference:.2e}, LoRA effect {np.abs(images - bases.plain).max():.3f}")
            assert difference <= 1e-3
            assert np.abs(images - bases.plain).max() > 0.02  # the LoRA changes the image
    finally:
        ours.unload_lora_weights()
    assert np.array_equal(our_images(ours, bases.latents), bases.plain)


def test_two_adapters_with_their_own_weights_equal_diffusers(bases: Bases, tmp_path: Path) -> None:
    kohya, peft = write("kohya", bases, tmp_path, seed=1), write("peft", bases, tmp_path, seed=2)
    reference = bases.diffusers()
    reference.load_lora_weights(kohya, adapter_name="a")
    reference.load_lora_weights(peft, adapter_name="b")
    ours = bases.ours
    try:
        ours.load_lora_weights(kohya, adapter_name="a")
        ours.load_lora_weights(peft.parent, adapter_name="b")  # a folder: its pytorch_lora_weights.safetensors
        assert ours.get_active_adapters() == reference.get_active_adapters() == ["b"]  # the last loaded only
        b_only = our_images(ours, bases.latents)
        reference.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
        ours.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
        assert ours.get_list_adapters() == {"unet": ["a", "b"], "text_encoder": ["a", "b"]}
        difference = np.abs(our_images(ours, bases.latents) - diffusers_images(reference, bases.latents)).max()
        print(f"two adapters: max abs {difference:.2e}")
        assert difference <= 1e-3
        assert np.abs(our_images(ours, bases.latents) - b_only).max() > 0.02
    finally:
        ours.unload_lora_weights()


def test_fused_equals_unfused_and_unfuse_restores_the_weights(bases: Bases, tmp_path: Path) -> None:
    ours = bases.ours
    before = {name: t.clone() for module in (ours.unet, ours.text_encoder)
              for name, t in module.state_dict(keep_vars=False).items()}
    kohya, peft = write("kohya", bases, tmp_path, seed=3), write("peft", bases, tmp_path, seed=4)
    try:
        ours.load_lora_weights(kohya, adapter_name="a")
        ours.load_lora_weights(peft, adapter_name="b")
        ours.set_adapters(["a", "b"], adapter_weights=[0.8, 0.5])
        unfused = our_images(ours, bases.latents)
        current = {**ours.unet.state_dict(), **ours.text_encoder.state_dict()}
        assert all(torch.equal(current[k], v) for k, v in before.items())  # unfused: the weights are untouched
        ours.fuse_lora()
        fused_state = {**ours.unet.state_dict(), **ours.text_encoder.state_dict()}
        changed = [k for k, v in before.items() if not torch.equal(fused_state[k], v)]
        assert any(k.startswith("input_blocks.") for k in changed)
        assert any(".resblocks." in k or ".layers." in k for k in changed)
        fused = our_images(ours, bases.latents)
        print(f"fused vs unfused: max abs {np.abs(fused - unfused).max():.2e}")
        assert np.abs(fused - unfused).max() <= 1e-4
        ours.unfuse_lora()
        after = {**ours.unet.state_dict(), **ours.text_encoder.state_dict()}
        worst = max((after[k] - v).abs().max().item() for k, v in before.items())
        print(f"unfuse: max abs weight change {worst:.1e}")
        assert worst <= 1e-6
        assert np.abs(our_images(ours, bases.latents) - unfused).max() <= 1e-6  # unfused again: the adapters apply
        ours.fuse_lora(lora_scale=0.5)
        half = our_images(ours, bases.latents)
        ours.unfuse_lora()
        ours.set_adapters(["a", "b"], adapter_weights=[0.4, 0.25])
        assert np.abs(half - our_images(ours, bases.latents)).max() <= 1e-4
        ours.fuse_lora()
    finally:
        ours.unload_lora_weights()  # fused weights stay, as in diffusers
    stayed = {**ours.unet.state_dict(), **ours.text_encoder.state_dict()}
    assert any(not torch.equal(stayed[k], v) for k, v in before.items())
    with torch.no_grad():
        for module in (ours.unet, ours.text_encoder):
            for name, t in module.state_dict(keep_vars=True).items():
                t.copy_(before[name])
    assert np.array_equal(our_images(ours, bases.latents), bases.plain)


def test_disable_and_delete(bases: Bases, tmp_path: Path) -> None:
    ours = bases.ours
    try:
        ours.load_lora_weights(write("kohya", bases, tmp_path, seed=5))
        assert ours.get_active_adapters() == ["default_0"]
        with_lora = our_images(ours, bases.latents)
        ours.disable_lora()
        assert ours.get_active_adapters() == [] and np.array_equal(our_images(ours, bases.latents), bases.plain)
        ours.enable_lora()
        assert np.array_equal(our_images(ours, bases.latents), with_lora)
        ours.set_adapters("default_0", adapter_weights={"unet": 0.0, "text_encoder": 0.0})
        assert np.abs(our_images(ours, bases.latents) - bases.plain).max() <= 1e-6
        ours.delete_adapters("default_0")
        assert ours.get_active_adapters() == [] and np.array_equal(our_images(ours, bases.latents), bases.plain)
        with pytest.raises(ValueError, match=r"adapter 'default_0' is not loaded; allowed: \[\]"):
            ours.set_adapters(["default_0"])
    finally:
        ours.unload_lora_weights()


# ----- files that do not fit: a one-line ValueError naming the file and the first key that does not fit


def test_a_v1_file_on_v2_weights_is_refused(folder: Path, tmp_path: Path) -> None:
    v1 = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    for fmt, path in (("kohya", write_kohya(v1, tmp_path / "v1.safetensors", 0)),
                      ("peft", write_peft(v1, tmp_path / "v1-peft", 0))):
        v2 = TextToImagePipeline(small_v2_models())
        with pytest.raises(ValueError) as err:
            v2.load_lora_weights(path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message and "another base model" in message, message
        assert v2.get_list_adapters() == {"unet": [], "text_encoder": []}


def test_a_v2_file_on_v1_weights_is_refused(folder: Path, tmp_path: Path) -> None:
    v2_models = small_v2_models()
    v2_models.save(tmp_path / "v2", to="diffusers")
    v2 = StableDiffusionPipeline.from_pretrained(tmp_path / "v2", local_files_only=True)
    path = write_kohya(v2, tmp_path / "v2.safetensors", 0)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": lora_\w+\.(lora_down\.weight|alpha): "):
        TextToImagePipeline.from_pretrained(folder).load_lora_weights(path)


@pytest.fixture(scope="module")
def v1(folder: Path) -> TextToImagePipeline:
    return TextToImagePipeline.from_pretrained(folder)


@pytest.mark.parametrize(("state", "message"), [
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 2)},
     r"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q\.lora_down\.weight: down \(4, 32\) "
     r"and up \(32, 2\) do not fit input_blocks\.1\.1\.transformer_blocks\.0\.attn1\.to_q\.weight \(32, 32\); "
     r"expected down \(4, 32\), up \(32, 4\)"),
    ({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
      "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)},
     r"lora_unet_down_blocks_7_attentions_0_proj_in\.lora_down\.weight: no such layer in the unet"),
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32)},
     r"lora_te_text_model_encoder_layers_0_self_attn_q_proj\.lora_down\.weight: no matching up \(lora_B\) weight"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(4, 32)},
     r"lora_unet_down_blocks_0_resnets_0_conv1\.hada_w1_a: not a plain LoRA weight \(LyCORIS LoHa"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)},
     r"model\.diffusion_model\.input_blocks\.0\.0\.weight: not a LoRA key of a known layout"),
    ({"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": torch.zeros(4, 32),  # a linear LoRA on a 3x3 conv
      "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": torch.zeros(32, 4)},
     r"unet\.down_blocks\.0\.resnets\.0\.conv1\.lora_A\.weight: down \(4, 32\) and up \(32, 4\) do not fit "
     r"input_blocks\.1\.0\.in_layers\.2\.weight \(32, 32, 3, 3\)"),
])
def test_a_file_that_does_not_fit_names_the_file_and_the_key(v1: TextToImagePipeline, tmp_path: Path, state: dict,
                                                             message: str) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        v1.load_lora_weights(path, adapter_name="bad")
    assert v1.get_list_adapters() == {"unet": [], "text_encoder": []}


def test_names_and_weights_are_checked(v1: TextToImagePipeline, folder: Path, tmp_path: Path) -> None:
    path = write_kohya(StableDiffusionPipeline.from_pretrained(folder, local_files_only=True),
                       tmp_path / "x.safetensors", 6)
    try:
        v1.load_lora_weights(path, adapter_name="x")
        with pytest.raises(ValueError, match=r"adapter_name='x' is already loaded"):
            v1.load_lora_weights(path, adapter_name="x")
        with pytest.raises(ValueError, match=r"adapter_weights has 2 entries for 1 adapters"):
            v1.set_adapters(["x"], adapter_weights=[1.0, 2.0])
        with pytest.raises(ValueError, match=r"adapter_weights key 'down' is not allowed"):
            v1.set_adapters(["x"], adapter_weights={"down": 1.0})
        v1.fuse_lora()
        with pytest.raises(ValueError, match=r"adapter 'x' is fused into the weights; call unfuse_lora\(\) first"):
            v1.delete_adapters("x")
        v1.unfuse_lora()
    finally:
        v1.unload_lora_weights()


def test_the_older_diffusers_spelling_equals_diffusers(folder: Path, v1: TextToImagePipeline, tmp_path: Path) -> None:
    """``….attn1.processor.to_q_lora.down.weight`` and ``….proj_in.lora.down.weight`` (before peft), α = r."""
    from safetensors.torch import load_file

    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    peft_file = load_file(str(write_peft(reference, tmp_path / "new", 7)))
    old = {}
    for key, value in peft_file.items():
        if not key.startswith("unet."):
            continue
        key = re.sub(r"\.(to_[qkv]|to_out)(\.0)?\.lora_([AB])\.weight$",
                     lambda m: f".processor.{m[1]}_lora.{'down' if m[3] == 'A' else 'up'}.weight", key)
        old[key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")] = value
    assert any(".processor.to_out_lora.up.weight" in k for k in old) and any(".proj_in.lora.down." in k for k in old)
    save_file(old, str(tmp_path / "old.safetensors"))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    reference.load_lora_weights(tmp_path / "old.safetensors")
    try:
        v1.load_lora_weights(tmp_path / "old.safetensors")
        images = our_images(v1, latents)
        difference = np.abs(images - diffusers_images(reference, latents)).max()
        print(f"older diffusers spelling: max abs {difference:.2e}")
        assert difference <= 1e-3
        v1.disable_lora()
        assert np.abs(images - our_images(v1, latents)).max() > 0.02
    finally:
        v1.unload_lora_weights()


def test_kohya_names_in_the_original_layout_give_the_same_adapter(folder: Path, v1: TextToImagePipeline,
                                                                  tmp_path: Path) -> None:
    """Some LyCORIS files name U-Net layers by the original SD layout (``lora_unet_input_blocks_1_1_proj_in``)."""
    from safetensors.torch import load_file

    from ldm.io.lora_keys import read_lora
    from ldm.io.unet_keys import unet_diffusers_to_original

    diffusers_pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    path = write_kohya(diffusers_pipe, tmp_path / "k.safetensors", 8)
    names = {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in unet_diffusers_to_original(
        {k: k for k in diffusers_pipe.unet.state_dict()}, v1.unet.config).items() if k.endswith(".weight")}
    by_kohya = {"lora_unet_" + theirs.replace(".", "_"): "lora_unet_" + ours.replace(".", "_")
                for ours, theirs in names.items()}
    state = load_file(str(path))
    renamed = {by_kohya.get(k.split(".")[0], k.split(".")[0]) + "." + k.split(".", 1)[1]: v for k, v in state.items()}
    assert any(k.startswith("lora_unet_input_blocks_1_1_proj_in.") for k in renamed)
    save_file(renamed, str(tmp_path / "original.safetensors"))
    a = read_lora(path, v1.unet, v1.text_encoder)
    b = read_lora(tmp_path / "original.safetensors", v1.unet, v1.text_encoder)
    assert a.layers.keys() == b.layers.keys() and a.layers["unet"].keys() == b.layers["unet"].keys()
    for name, layers in a.layers["unet"].items():
        shape = v1.unet.get_parameter(name).shape
        assert torch.equal(a.delta("unet", name, shape), b.delta("unet", name, shape))
    assert len(a.layers["unet"]) == len(lora_modules(diffusers_pipe)["unet"])
