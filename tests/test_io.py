"""Whole-model interop: diffusers folders in, diffusers folders and SD single files out, safely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from sd_fixtures import diffusers_v1_pipeline, randomize, small_models, small_v2_models

from ldm.diffusion.schedule import ScheduleConfig
from ldm.io import CheckpointError, load_state_dict, read_checkpoint
from pipelines import Models, load_models

# What the weights cannot tell at these reduced widths (SD convention would be 8 heads, 32 groups).
SMALL_OVERRIDES = {"unet": {"num_heads": 2, "norm_groups": 8}, "vae": {"norm_groups": 8}, "text_encoder": {"heads": 4}}


def inputs(context_dim: int):
    generator = torch.Generator().manual_seed(5)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10.0, 640.0]),
            torch.randn(2, 77, context_dim, generator=generator), torch.randn(1, 3, 16, 16, generator=generator))


@torch.no_grad()
def assert_same_as_diffusers(ours: Models, pipe: StableDiffusionPipeline, prompts: list[str],
                             tol: float = 1e-4) -> None:
    ids = ours.tokenizer(prompts)
    reference = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.testing.assert_close(ids, reference)
    torch.testing.assert_close(ours.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state, rtol=0, atol=tol)
    x, t, context, image = inputs(ours.unet.config.context_dim)
    torch.testing.assert_close(ours.unet(x, t, context), pipe.unet(x, t, context).sample, rtol=0, atol=tol)
    posterior, reference = ours.vae.encode(image), pipe.vae.encode(image).latent_dist
    torch.testing.assert_close(posterior.mean, reference.mean, rtol=0, atol=tol)
    torch.testing.assert_close(ours.vae.decode(x), pipe.vae.decode(x).sample, rtol=0, atol=tol)
    assert ours.vae.config.scale_factor == pipe.vae.config.scaling_factor


def test_diffusers_folder_loads_and_exports(tmp_path: Path) -> None:
    pipe = diffusers_v1_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "sd")
    ours = load_models(tmp_path / "sd")
    assert ours.schedule == ScheduleConfig(beta_start=0.00085, beta_end=0.012, timestep_spacing="leading")
    assert_same_as_diffusers(ours, pipe, ["a red circle in the top left", ""])

    ours.save(tmp_path / "exported", to="diffusers")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "exported", local_files_only=True)
    assert_same_as_diffusers(ours, again, ["a blue square, small!", "x" * 30])
    assert again.scheduler.config.steps_offset == 1 and again.scheduler.config.beta_schedule == "scaled_linear"


def test_our_folder_and_single_file_round_trip(tmp_path: Path) -> None:
    pipe = diffusers_v1_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "sd")
    ours = load_models(tmp_path / "sd")
    ours.save(tmp_path / "folder")
    ours.save(tmp_path / "model.safetensors", to="sd")
    assert sorted(os.listdir(tmp_path / "folder")) == ["model.yaml", "text_encoder.safetensors", "unet.safetensors",
                                                       "vae.safetensors"]
    keys = load_state_dict(tmp_path / "model.safetensors")
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.1") for k in keys)
    for reloaded in (load_models(tmp_path / "folder"),
                     load_models(tmp_path / "model.safetensors", overrides=SMALL_OVERRIDES)):
        assert reloaded.unet.config == ours.unet.config and reloaded.text_encoder.config == ours.text_encoder.config
        assert_same_as_diffusers(reloaded, pipe, ["a yellow triangle above a green square"])


def test_sd_v2_layout_exports_to_diffusers_and_single_file(tmp_path: Path) -> None:
    ours = small_v2_models()
    ours.save(tmp_path / "v2", to="diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "v2", local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder.config.num_hidden_layers == 2  # the penultimate layer is the last one kept
    assert_same_as_diffusers(ours, pipe, ["a purple circle on a gray background"])

    ours.save(tmp_path / "v2.safetensors", to="sd")
    keys = load_state_dict(tmp_path / "v2.safetensors")
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in keys
    overrides = {"unet": {"head_dim": 16, "num_heads": None, "norm_groups": 8}, "vae": {"norm_groups": 8},
                 "text_encoder": {"heads": 4}}
    reloaded = load_models(tmp_path / "v2.safetensors", prediction_type="v", overrides=overrides)
    assert reloaded.unet.config == ours.unet.config and reloaded.text_encoder.config == ours.text_encoder.config
    assert reloaded.tokenizer.pad_token_id == 0 and reloaded.schedule.prediction_type == "v"
    assert_same_as_diffusers(reloaded, pipe, ["a purple circle on a gray background"])


def test_an_sd_v2_file_without_the_unused_clip_keys_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ours = small_v2_models()
    ours.save(tmp_path / "v2.safetensors", to="sd")
    state = load_state_dict(tmp_path / "v2.safetensors")
    unused = [k for k in state if k.endswith(("model.text_projection", "model.logit_scale"))]
    assert len(unused) == 2  # as open_clip and SD v2 files store them
    save_file({k: v for k, v in state.items() if k not in unused}, str(tmp_path / "lean.safetensors"))
    overrides = {"unet": {"head_dim": 16, "num_heads": None, "norm_groups": 8}, "vae": {"norm_groups": 8},
                 "text_encoder": {"heads": 4}}
    lean = load_models(tmp_path / "lean.safetensors", prediction_type="v", overrides=overrides)
    tokens = ours.tokenizer(["a red circle"])
    torch.testing.assert_close(lean.text_encoder(tokens), ours.text_encoder(tokens), rtol=0, atol=0)
    state.pop(next(k for k in state if k.endswith("ln_final.weight")))  # a key the model uses is still required
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. \['ln_final\.weight'\]\)"):
        load_models(tmp_path / "broken.safetensors", prediction_type="v", overrides=overrides)


def test_ema_weights_of_a_full_checkpoint_are_used(tmp_path: Path) -> None:
    ours = small_v2_models()
    ours.save(tmp_path / "plain.safetensors", to="sd")
    state = load_state_dict(tmp_path / "plain.safetensors")
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1.0 for k, v in state.items()
           if k.startswith("model.diffusion_model.")}
    torch.save({"state_dict": {**state, **ema, "model_ema.decay": torch.tensor(0.9999)}}, tmp_path / "full.ckpt")
    with_ema = read_checkpoint(tmp_path / "full.ckpt", prediction_type="v")
    without = read_checkpoint(tmp_path / "full.ckpt", prediction_type="v", use_ema=False)
    key = "input_blocks.0.0.weight"
    torch.testing.assert_close(with_ema.weights["unet"][key], ours.unet.state_dict()[key] + 1.0)
    torch.testing.assert_close(without.weights["unet"][key], ours.unet.state_dict()[key])


class _MakesMarker:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": {"model.diffusion_model.x": _MakesMarker(marker)}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to unpickle.*posix\.system"):
        load_models(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_a_protocol_5_pickle_is_refused_with_the_error_alone(tmp_path: Path) -> None:
    import pickle
    import warnings

    marker = tmp_path / "MARKER"
    with open(tmp_path / "evil5.ckpt", "wb") as f:
        pickle.dump({"state_dict": _MakesMarker(marker)}, f, protocol=5)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError, match=r"evil5\.ckpt: refused"):
        warnings.simplefilter("always")
        load_models(tmp_path / "evil5.ckpt")
    assert not caught and not marker.exists()  # torch's "Detected pickle protocol 5" warning is not printed


def test_pickles_need_a_torch_whose_weights_only_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    dependencies = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.6" in dependencies  # CVE-2025-32434: weights_only=True is bypassable before 2.6
    torch.save({"x": torch.zeros(2)}, tmp_path / "plain.ckpt")
    assert torch.equal(load_state_dict(tmp_path / "plain.ckpt")["x"], torch.zeros(2))
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(CheckpointError, match=r"plain\.ckpt: pickle checkpoints are loaded only with torch >= 2\.6"):
        load_state_dict(tmp_path / "plain.ckpt")


def test_corrupt_and_unknown_files_name_the_file(tmp_path: Path) -> None:
    ours = small_v2_models()
    ours.save(tmp_path / "good.safetensors", to="sd")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_models(tmp_path / "cut.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors"):
        load_models(tmp_path / "garbage.safetensors")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError,
                       match=r"other\.ckpt: not a Stable Diffusion checkpoint.*found top-level names: encoder"):
        load_models(tmp_path / "other.ckpt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match=r"empty_dir: a folder with neither model\.yaml"):
        load_models(tmp_path / "empty_dir")
    with pytest.raises(CheckpointError, match=r"missing\.safetensors' does not exist"):
        load_models(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"notes\.txt: unknown weight file type '\.txt'"):
        (tmp_path / "notes.txt").write_text("hi")
        load_models(tmp_path / "notes.txt")


def test_weights_that_do_not_fit_the_config_are_reported(tmp_path: Path) -> None:
    ours = small_v2_models()
    ours.save(tmp_path / "folder")
    import yaml

    config = yaml.safe_load((tmp_path / "folder" / "model.yaml").read_text())
    config["unet"]["model_channels"] = 64
    (tmp_path / "folder" / "model.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match=r"model\.yaml \(unet\): time_embed\.0\.weight has shape \(128, 32\); "
                                              r"the config expects \(256, 64\)"):
        load_models(tmp_path / "folder")
    config["unet"]["model_chanels"] = 64
    (tmp_path / "folder" / "model.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"unknown key 'unet.model_chanels'"):
        load_models(tmp_path / "folder")


def test_a_legacy_gradient_checkpointing_key_is_read_and_not_written(tmp_path: Path) -> None:
    """model.yaml files (the shipped demo weights among them) once saved unet.gradient_checkpointing, now a
    training-time switch: such files still load, and what is saved again no longer has it."""
    import json

    import yaml
    from sd_fixtures import small_models

    from ldm.io.files import read_metadata, save_state_dict
    from ldm.io.single_file import CONFIG_KEY

    small_models().save(tmp_path / "m")
    spec = yaml.safe_load((tmp_path / "m" / "model.yaml").read_text())
    assert "gradient_checkpointing" not in spec["unet"]
    spec["unet"]["gradient_checkpointing"] = False
    (tmp_path / "m" / "model.yaml").write_text(yaml.safe_dump(spec))
    models = load_models(tmp_path / "m")
    assert models.unet.gradient_checkpointing is False
    models.save(tmp_path / "again")
    assert "gradient_checkpointing" not in yaml.safe_load((tmp_path / "again" / "model.yaml").read_text())["unet"]
    models.save(tmp_path / "m.safetensors", to="sd")  # a single file we wrote keeps the config in its metadata
    config = json.loads(read_metadata(tmp_path / "m.safetensors")[CONFIG_KEY])
    config["unet"]["gradient_checkpointing"] = True
    save_state_dict(load_state_dict(tmp_path / "m.safetensors"), tmp_path / "old.safetensors",
                    metadata={"format": "pt", CONFIG_KEY: json.dumps(config)})
    assert load_models(tmp_path / "old.safetensors").unet.config == models.unet.config


def test_model_yaml_is_one_typed_config_checked_at_load(tmp_path: Path) -> None:
    from ldm.config import load_yaml, save_yaml
    from ldm_toolkit.cli import main
    from pipelines import load_models
    from pipelines.models import ModelConfig

    small_models().save(tmp_path / "m")
    config = ModelConfig.from_dict(load_yaml(tmp_path / "m" / "model.yaml"))
    assert config.unet.context_dim == config.text_encoder.width and config.schedule.num_train_timesteps == 1000
    assert load_models(tmp_path / "m").config() == config  # what loads is what the file says
    bad = load_yaml(tmp_path / "m" / "model.yaml")
    bad["unet"]["num_res_block"] = 2  # a typo
    save_yaml(bad, tmp_path / "m" / "model.yaml")
    message = r"model.yaml: unknown key 'unet.num_res_block'; allowed keys: .*num_res_blocks"
    with pytest.raises(ValueError, match=message):
        load_models(tmp_path / "m")
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "out"), "--to", "diffusers"]) == 2
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_writes_go_through_fresh_temp_names_and_reach_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ldm.io import write_folder
    from ldm.io.checkpoint import Checkpoint

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "model"
    write_folder(Checkpoint({"sample_size": 4}, {"unet": {"w": torch.zeros(2)}}), folder)
    (folder / ".model.yaml.tmp").symlink_to(victim)  # planted at the temp name an earlier version used
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    write_folder(Checkpoint({"sample_size": 8}, {"unet": {"w": torch.ones(2)}}), folder)
    assert victim.read_text() == "keep me" and (folder / "model.yaml").read_text().startswith("sample_size: 8")
    assert synced[-1] == str(tmp_path)  # the parent, after the folder's rename into place
    assert sum(".unet.safetensors." in name for name in synced) == 1  # the file, before its rename
    assert sum(".model.yaml." in name and name.endswith(".tmp") for name in synced) == 1


def test_a_folder_export_replaces_the_folder_whole_and_spares_other_folders(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from ldm.io import files

    ours = small_v2_models()
    ours.save(tmp_path / "model", to="folder")
    (tmp_path / "model" / "stale.safetensors").write_bytes(b"from an older write")
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    real_save, calls = files.save_file, []

    def dies_on_the_second_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-export")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(files, "save_file", dies_on_the_second_file)
    randomize(ours.unet, 9)
    with pytest.raises(KeyboardInterrupt):
        ours.save(tmp_path / "model", to="folder")
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before  # untouched, not mixed
    monkeypatch.undo()
    ours.save(tmp_path / "model", to="folder")
    assert not (tmp_path / "model" / "stale.safetensors").exists()  # the folder is the new write, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"keep: exists and is not a model folder"):
        ours.save(keep, to="diffusers")
    assert (keep / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("text", "message"), [("[]", r"the top level is a JSON list; allowed: an object"),
                                               ("[" * 100_000 + "]" * 100_000, r"nested too deeply"),
                                               ("{unquoted: 1}", r"not valid JSON")])
def test_a_bad_config_json_is_named(tmp_path: Path, text: str, message: str) -> None:
    small_v2_models().save(tmp_path / "d", to="diffusers")
    (tmp_path / "d" / "unet" / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"unet/config\.json: " + message):
        load_models(tmp_path / "d")


def test_a_model_yaml_asking_for_an_absurd_network_fails_before_allocating(tmp_path: Path) -> None:
    import resource

    import yaml

    small_v2_models().save(tmp_path / "m", to="folder")
    config = yaml.safe_load((tmp_path / "m" / "model.yaml").read_text())
    config["unet"].update(model_channels=4096, channel_mult=[64, 64], head_dim=64)  # each within its bound
    (tmp_path / "m" / "model.yaml").write_text(yaml.safe_dump(config))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"m/model\.yaml \(unet\): the config makes a network of [0-9.e+]+ param"):
        load_models(tmp_path / "m")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2**20  # KB: under 1 GB more at peak


def test_a_yaml_alias_bomb_in_model_yaml_is_refused_at_once(tmp_path: Path) -> None:
    small_models().save(tmp_path / "m")
    bomb = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'x'] * 9)}]\n" for i in range(9))  # 9**9 items
    with open(tmp_path / "m" / "model.yaml", "a") as f:
        f.write(bomb)
    with pytest.raises(ValueError, match=r"m/model\.yaml: not valid YAML \(line \d+: aliases \(\*l0\) are not"):
        load_models(tmp_path / "m")
