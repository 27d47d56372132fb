"""`ldm train`: exact resume after SIGKILL, atomic checkpoints, two processes, checked configs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ldm.io.files import load_state_dict
from ldm.training import checkpoints
from ldm.training.checkpoints import latest_checkpoint
from ldm_toolkit.train import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "demo" / "smoke.yaml")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def smoke_models_at_init() -> Any:
    """The smoke config's models as a run builds them before its first step (weights drawn after seeding)."""
    from ldm.training.config import load_train_config
    from ldm_toolkit.train import build_models

    config = load_train_config(SMOKE)
    torch.manual_seed(config.seed)
    return build_models(config.model, config.data)


def train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ldm_toolkit.train", SMOKE, "--output-dir", str(out), "--max-steps", "6",
            "--checkpoint-every", "3", *extra]


def final_state(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = out / "checkpoints" / "step-00000006"
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizers"][0]
    return {
        "unet": load_state_dict(ckpt / "model" / "unet.safetensors"),
        "text": load_state_dict(ckpt / "model" / "text_encoder.safetensors"),
        "ema": load_state_dict(ckpt / "ema.safetensors"),
        "adam": {f"{i}.{k}": v for i, s in optimizer["state"].items() for k, v in s.items() if torch.is_tensor(v)},
    }


def assert_bitwise_equal(a: dict, b: dict) -> None:
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}: {key}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    subprocess.run(train_command(out), check=True, env=ENV, capture_output=True, cwd=ROOT)
    return out


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_resumes_bitwise(uninterrupted: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    process = subprocess.Popen(train_command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=ROOT)
    marker = out / "checkpoints" / "step-00000003" / "state.json"
    deadline = time.time() + 240
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists() and not (out / "model").exists()  # killed mid-run, after step 3's checkpoint
    subprocess.run(train_command(out), check=True, env=ENV, capture_output=True, cwd=ROOT)
    assert_bitwise_equal(final_state(uninterrupted), final_state(out))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_it_is_in_and_resumes_bitwise(uninterrupted: Path, tmp_path: Path,
                                                               signum: signal.Signals) -> None:
    out = tmp_path / "terminated"
    command = train_command(out, "--checkpoint-every", "100")  # no regular checkpoint before step 6
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT)
    log, deadline = out / "log.jsonl", time.time() + 240
    while not (log.exists() and log.read_text().strip()) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    stderr = process.communicate(timeout=240)[1]
    assert process.returncode == 128 + signum, stderr  # 143, 130
    saved = latest_checkpoint(out)
    assert saved is not None and 1 <= int(saved.name[5:]) < 6 and not (out / "model").exists()
    assert f"ldm: stopped by {signum.name} after step {int(saved.name[5:])}; its checkpoint" in stderr, stderr
    subprocess.run(command, check=True, env=ENV, capture_output=True, cwd=ROOT)
    assert_bitwise_equal(final_state(uninterrupted), final_state(out))


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_keeps_the_previous_one(uninterrupted: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "torn"
    real_save = checkpoints.save_state_dict

    def dies_at_step_6(state, path, *args):
        if "step-00000006" in str(path):
            raise KeyboardInterrupt("simulated kill during the write of step 6")
        return real_save(state, path, *args)

    monkeypatch.setattr(checkpoints, "save_state_dict", dies_at_step_6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): same reduction order, same bits
    assert main([SMOKE, "--output-dir", str(out), "--max-steps", "6", "--checkpoint-every", "3"]) == 130
    monkeypatch.undo()
    assert latest_checkpoint(out).name == "step-00000003"
    assert not list((out / "checkpoints").glob(".tmp-step-*"))  # an interrupted write takes its temp folder along
    from pipelines import TextToImagePipeline

    TextToImagePipeline.from_pretrained(latest_checkpoint(out) / "model")  # the previous one loads
    assert main([SMOKE, "--output-dir", str(out), "--max-steps", "6", "--checkpoint-every", "3"]) == 0
    torch.set_num_threads(threads)
    assert_bitwise_equal(final_state(uninterrupted), final_state(out))
    assert not list((out / "checkpoints").glob(".tmp-step-*"))


def _file_size_limit(limit: int):
    """For a child process: writes past ``limit`` bytes fail with EFBIG, as writes to a full disk fail."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(uninterrupted: Path,
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "full"
    shutil.copytree(uninterrupted, out)  # a run stopped after step 3's checkpoint
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    shutil.rmtree(out / "model")
    failed = subprocess.run(train_command(out), env=ENV, capture_output=True, text=True, cwd=ROOT,
                            preexec_fn=_file_size_limit(20 << 20))  # the 34 MB optimizer.pt does not fit
    last_line = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert "step-00000006: could not be written" in last_line, last_line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]  # no temp folder left
    subprocess.run(train_command(out), check=True, env=ENV, capture_output=True, cwd=ROOT)
    assert_bitwise_equal(final_state(uninterrupted), final_state(out))


@pytest.mark.slow
def test_a_diverging_run_stops_before_a_non_finite_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "diverged"
    assert main([SMOKE, "--output-dir", str(out), "--max-steps", "6", "--set", "optim.lr=1e9"]) == 2
    assert "training diverged at step 2: the gradient norm is nan" in capsys.readouterr().err
    assert latest_checkpoint(out) is None  # nothing non-finite was saved


@pytest.mark.slow
def test_weights_gone_non_finite_under_a_finite_loss_are_not_saved(tmp_path: Path, capsys,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_step, calls = torch.optim.AdamW.step, []

    def poisons_the_last_update(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 6:  # the update of step 6, after a finite loss and finite gradients
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisons_the_last_update)
    out = tmp_path / "poisoned"
    assert main([SMOKE, "--output-dir", str(out), "--max-steps", "6", "--checkpoint-every", "3"]) == 2
    err = capsys.readouterr().err
    assert "diverged at step 6: the loss is finite but some weights are not" in err
    assert "the newest checkpoint, step-00000003, is the last finite one" in err
    assert latest_checkpoint(out).name == "step-00000003" and not (out / "model").exists()


def test_a_second_run_on_a_held_output_dir_stops_at_once_naming_the_holder(tmp_path: Path) -> None:
    from ldm.training.lock import RunLock

    out = tmp_path / "busy"
    with RunLock(out):  # this process is the running holder
        result = subprocess.run(train_command(out), env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"is in use by pid {os.getpid()} on " in result.stderr and "--output-dir" in result.stderr
    assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()


@pytest.mark.slow
def test_a_second_ldm_train_beside_a_running_one_leaves_its_checkpoints_whole(uninterrupted: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "shared"
    first = subprocess.Popen(train_command(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=ROOT)
    log, deadline = out / "log.jsonl", time.time() + 240
    while not (log.exists() and log.read_text().strip()) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # held mid-run (its lock too) while the second starts, however fast it trains
    try:
        second = subprocess.run(train_command(out), env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    marker = out / "checkpoints" / "step-00000003" / "state.json"
    while not marker.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # the first is stopped after its step-3 checkpoint and resumed
    first.wait()
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"is in use by pid {first.pid} on " in second.stderr
    subprocess.run(train_command(out), check=True, env=ENV, capture_output=True, cwd=ROOT)
    assert_bitwise_equal(final_state(uninterrupted), final_state(out))


@pytest.mark.slow
def test_after_a_divergence_the_last_finite_checkpoint_is_the_newest_and_resumes(uninterrupted: Path,
                                                                                 tmp_path: Path, capsys) -> None:
    out = tmp_path / "diverges-later"
    shutil.copytree(uninterrupted, out)  # a run stopped after step 3's checkpoint
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    shutil.rmtree(out / "model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess ran (OMP_NUM_THREADS=1): same reduction order, same bits
    try:
        args = [SMOKE, "--output-dir", str(out), "--max-steps", "6", "--checkpoint-every", "3"]
        assert main([*args, "--set", "optim.lr=1e9", "--allow-config-change", "optim.lr"]) == 2
        assert "training diverged at step 5" in capsys.readouterr().err  # step 4 at lr 1e9 made the weights nan
        assert latest_checkpoint(out).name == "step-00000003"
        assert main([*args, "--allow-config-change", "optim.lr"]) == 0  # back to the config's rate
    finally:
        torch.set_num_threads(threads)
    assert_bitwise_equal(final_state(uninterrupted), final_state(out))


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path: Path) -> None:
    from ldm.training.lock import RunLock

    out = tmp_path / "left"
    out.mkdir()
    (out / ".lock").write_text("pid 999999 on elsewhere\n")  # its holder is gone: no flock is held
    with RunLock(out):
        assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} ")


def test_a_resume_with_a_changed_config_is_refused_unless_named(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main([SMOKE, "--output-dir", str(out), "--max-steps", "3"]) == 0
    saved, _ = (out / "config.yaml").read_text(), capsys.readouterr()
    changed = [SMOKE, "--output-dir", str(out), "--max-steps", "4", "--seed", "5", "--set", "optim.batch_size=2"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.batch_size: 4 → 2; seed: 0 → 5" in err
    assert "--allow-config-change optim.batch_size" in err and (out / "config.yaml").read_text() == saved
    assert latest_checkpoint(out).name == "step-00000003"
    allowed = ["--allow-config-change", "optim.batch_size", "--allow-config-change", "seed"]
    assert main(changed + allowed) == 0 and latest_checkpoint(out).name == "step-00000004"
    assert main([SMOKE, "--output-dir", str(out), "--max-steps", "5", "--seed", "5", "--set", "optim.batch_size=2",
                 "--set", "log_every=2"]) == 0  # the saved config is now the changed one; bookkeeping is free


def test_two_processes_keep_equal_weights_and_rank0_writes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "ldm_toolkit.train", SMOKE, "--output-dir", str(out), "--max-steps", "3",
               "--checkpoint-every", "2", "--set", "param_checksums=true"]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [[json.loads(line) for line in (out / f"checksums-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [1, 2, 3]
    assert ranks[0] == ranks[1]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim: {lr: 1e-4, max_stepz: 3}\n", "unknown key 'optim.max_stepz'"),
        ("optim: {batch_size: four}\n", "optim.batch_size='four' must be of type int"),
        ("data: {kind: folder, path: /nonexistent/folder}\n", "/nonexistent/folder"),
        ("model: {unet: {model_chanels: 32}}\n", "unknown key 'model.unet.model_chanels'"),
        ("data: {kind: video}\n", "kind='video' is not supported; allowed: 'shapes', 'folder'"),
        ("data: {objects: three}\n", "objects='three' is not supported; allowed: 'any', 'one', 'two'"),
        ("optim: {decay_steps: 5, max_steps: 3}\n", "decay_steps=5 is out of range; allowed: 0..max_steps (3)"),
        ("model: {autoencoder_from: ae, vae: {base_channels: 8}}\n", "model.vae.base_channels cannot change"),
        ("model: {autoencoder_from: ae, vae: {scale_factor: -1}}\n", "model.vae.scale_factor=-1 is not allowed"),
        ("a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n", "line 2: aliases (*a) are not allowed"),  # billion laughs
        ("seed: !!python/object/apply:os.system [echo]\n", "not valid YAML"),
        ("keep_checkpoints: -1\n", "keep_checkpoints=-1 is out of range; allowed: an integer >= 1"),
        ("checkpoint_every: 0\n", "checkpoint_every=0 is out of range; allowed: an integer >= 1"),
        ("eval_every: -5\n", "eval_every=-5 is out of range"),
        ("optim: {lr: .inf}\n", "optim.lr=inf is out of range; allowed: a finite number in [0, inf)"),
        ("optim: {lr: -1.0}\n", "optim.lr=-1.0 is out of range"),
        ("optim: {max_grad_norm: .nan}\n", "optim.max_grad_norm=nan is out of range"),
        ("optim: {betas: [0.9, 1.0]}\n", "optim.betas=1.0 is out of range; allowed: a finite number in [0, 1)"),
        ("ema: {decay: 2}\n", "ema.decay=2.0 is out of range"),
        ("data: {image_size: 100000}\n", "data.image_size=100000 is out of range; allowed: an integer in [8, 2048]"),
    ],
)
def test_configs_are_checked_before_models_are_built(tmp_path: Path, capsys, monkeypatch, text: str,
                                                     message: str) -> None:
    import ldm_toolkit.train

    monkeypatch.setattr(ldm_toolkit.train, "build_models", lambda *a: pytest.fail("a model was built"))
    assert main([write_config(tmp_path, text), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_overrides_and_set(tmp_path: Path) -> None:
    from ldm.training.config import load_train_config

    config = load_train_config(SMOKE, {"output_dir": "x", "max_steps": 9, "checkpoint_every": 4, "seed": 5},
                               ["optim.lr=2e-4", "model.unet.num_res_blocks=2"])
    assert (config.output_dir, config.optim.max_steps, config.checkpoint_every, config.seed) == ("x", 9, 4, 5)
    assert config.optim.lr == 2e-4 and config.model.unet["num_res_blocks"] == 2
    with pytest.raises(ValueError, match="--set 'optim.lr' is not allowed; allowed: KEY=VALUE"):
        load_train_config(SMOKE, None, ["optim.lr"])


def mean_loss(out: Path, key: str, first: bool, count: int) -> float:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    values = [r[key] for r in records]
    chosen = values[:count] if first else values[-count:]
    return sum(chosen) / len(chosen)


@pytest.fixture(scope="module")
def learned_diffusion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("learn")
    subprocess.run(train_command(out) + ["--max-steps", "40", "--checkpoint-every", "100",
                                         "--set", "optim.batch_size=8"],
                   check=True, env=ENV, capture_output=True, cwd=ROOT)
    return out


@pytest.mark.slow
def test_diffusion_trainer_lowers_its_loss(learned_diffusion: Path) -> None:
    # measured: mean ε-loss of steps 1-5 ≈ 0.995, of steps 36-40 ≈ 0.70 (×0.71)
    assert mean_loss(learned_diffusion, "loss", False, 5) < 0.85 * mean_loss(learned_diffusion, "loss", True, 5)


@pytest.mark.slow
def test_checkpoints_come_with_a_sample_grid_and_tensorboard_logs(learned_diffusion: Path) -> None:
    from PIL import Image

    grid = Image.open(learned_diffusion / "samples" / "step-00000040.png")
    assert grid.size == (64, 64)  # 4 prompts of 32x32 in a 2x2 grid
    assert list((learned_diffusion / "ldm").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_autoencoder_trainer_lowers_its_reconstruction_loss(tmp_path: Path) -> None:
    config = str(ROOT / "configs" / "demo" / "autoencoder-smoke.yaml")
    subprocess.run([sys.executable, "-m", "ldm_toolkit.train", config, "--task", "autoencoder",
                    "--output-dir", str(tmp_path), "--max-steps", "40", "--checkpoint-every", "100"],
                   check=True, env=ENV, capture_output=True, cwd=ROOT)
    # measured: L1 of steps 1-5 ≈ 0.756, of steps 36-40 ≈ 0.614 (×0.81)
    assert mean_loss(tmp_path, "rec_loss", False, 5) < 0.9 * mean_loss(tmp_path, "rec_loss", True, 5)
    from ldm_toolkit.train import load_autoencoder

    assert load_autoencoder(str(tmp_path / "model")).config.downsample_factor == 4


@pytest.mark.slow
def test_classifier_trainer_lowers_its_loss(learned_diffusion: Path, tmp_path: Path) -> None:
    config = str(ROOT / "configs" / "demo" / "classifier-smoke.yaml")
    subprocess.run([sys.executable, "-m", "ldm_toolkit.train", config, "--task", "classifier",
                    "--output-dir", str(tmp_path), "--max-steps", "300", "--checkpoint-every", "1000",
                    "--set", f"model.init_from={learned_diffusion / 'model'}", "--set", "optim.batch_size=32",
                    "--set", "optim.lr=2e-3", "--set", "ema.enabled=false"],
                   check=True, env=ENV, capture_output=True, cwd=ROOT)
    # measured: cross-entropy of steps 1-10 ≈ 1.110 (chance: ln 3 = 1.099), of steps 291-300 ≈ 0.988 (×0.89)
    assert mean_loss(tmp_path, "loss", False, 10) < 0.95 * mean_loss(tmp_path, "loss", True, 10)
    from pipelines import ClassifierGuidedPipeline

    pipe = ClassifierGuidedPipeline.from_pretrained(tmp_path / "model")
    assert pipe.models.class_names == ["circle", "square", "triangle"]


@pytest.mark.slow
def test_latent_cache_gives_the_same_training_as_encoding_each_time(tmp_path: Path) -> None:
    runs = {}
    for cache in ("false", "true"):
        out = tmp_path / cache
        subprocess.run(train_command(out) + ["--max-steps", "4", "--set", f"cache_latents={cache}",
                                             "--set", "tracker=null"],
                       check=True, env=ENV, capture_output=True, cwd=ROOT)
        runs[cache] = load_state_dict(out / "model" / "unet.safetensors")
    for key, value in runs["false"].items():
        torch.testing.assert_close(runs["true"][key], value, rtol=0, atol=1e-6)


def test_missing_lpips_weights_are_named(tmp_path: Path, capsys) -> None:
    config = str(ROOT / "configs" / "demo" / "autoencoder-smoke.yaml")
    code = main([config, "--task", "autoencoder", "--output-dir", str(tmp_path),
                 "--set", "lpips_weights=/no/lpips.safetensors"])
    assert code == 2 and "/no/lpips.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["empty", "unreadable"])
def test_bad_image_folders_stop_before_models_are_built(tmp_path: Path, capsys, monkeypatch, case: str) -> None:
    import ldm_toolkit.train

    folder = tmp_path / "data"
    folder.mkdir()
    if case == "empty":
        (folder / "metadata.jsonl").write_text("")
    else:
        (folder / "a.png").write_bytes(b"not a png")
        (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red circle"}\n')
    monkeypatch.setattr(ldm_toolkit.train, "build_models", lambda *a: pytest.fail("a model was built"))
    code = main([SMOKE, "--output-dir", str(tmp_path / "o"), "--set", "data.kind=folder",
                 "--set", f"data.path={folder}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(folder) in err


@pytest.mark.slow
def test_trainable_autoencoder_encoder(tmp_path: Path) -> None:
    subprocess.run(train_command(tmp_path) + ["--max-steps", "2", "--set", "model.train_vae=true",
                                              "--set", "tracker=null"],
                   check=True, env=ENV, capture_output=True, cwd=ROOT)
    initial = smoke_models_at_init().vae.state_dict()
    trained = load_state_dict(tmp_path / "model" / "vae.safetensors")
    changed = {k.split(".")[0] for k in initial if not torch.equal(initial[k], trained[k])}
    assert changed == {"encoder", "quant_conv"}  # the decoder gets no gradient from the diffusion loss


def test_learning_rate_warms_up_holds_and_decays() -> None:
    from ldm.training.config import TrainConfig
    from ldm.training.loop import learning_rate

    config = TrainConfig()
    config.optim.lr, config.optim.warmup_steps, config.optim.decay_steps, config.optim.max_steps = 1.0, 4, 10, 30
    rates = [learning_rate(config, step) for step in range(30)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0] and rates[4:20] == [1.0] * 16
    assert rates[20:] == pytest.approx([(30 - s) / 10 for s in range(20, 30)])  # down to 1/10 at the last step


def test_scale_factor_auto_is_one_over_the_latent_std(tmp_path: Path) -> None:
    from autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.data.shapes import ShapesDataset
    from ldm.training.config import DataConfig
    from ldm.training.loop import collate
    from ldm_toolkit.train import resolve_scale_factor

    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)).eval()
    data = DataConfig(image_size=32, length=40, seed=3)
    images = collate([ShapesDataset(seed=3, length=40, image_size=32)[i] for i in range(40)])["image"]
    with torch.no_grad():
        expected = 1 / float(vae.encode(images).mean.std())
    assert resolve_scale_factor("auto", vae, data, count=40) == pytest.approx(expected, rel=1e-5)
    assert resolve_scale_factor(0.5, vae, data) == 0.5


@pytest.mark.slow
def test_init_from_may_add_unet_inputs_and_change_the_schedule(learned_diffusion: Path, tmp_path: Path) -> None:
    from pipelines import load_models

    out = tmp_path / "wider"
    subprocess.run(train_command(out) + ["--max-steps", "1", "--set", f"model.init_from={learned_diffusion / 'model'}",
                                         "--set", "model.unet.in_channels=7", "--set", "model.concat={kind: image}",
                                         "--set", "optim.lr=0",
                                         "--set", "model.schedule.beta_schedule=linear",
                                         "--set", "model.schedule.beta_end=0.02"],
                   check=True, env=ENV, capture_output=True, cwd=ROOT)
    # init_from starts from the model's EMA weights, as sampling does; lr 0 keeps them
    before, after = load_models(learned_diffusion / "model"), load_models(out / "model", use_ema=False)
    assert (before.unet.config.in_channels, after.unet.config.in_channels) == (4, 7)  # + the low-res image
    assert after.concat == {"kind": "image"}
    assert (after.schedule.beta_schedule, after.schedule.beta_end) == ("linear", 0.02)  # fine-tuned to a new schedule
    assert after.schedule.prediction_type == before.schedule.prediction_type  # the fields not set are kept
    x, extra = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8, 8)
    context = torch.randn(2, 5, before.unet.config.context_dim)
    with torch.no_grad():  # only the zero-initialised inputs are new, so the function is unchanged
        widened = after.unet(torch.cat([x, extra], 1), 300, context)
        assert torch.allclose(before.unet(x, 300, context), widened, atol=1e-5)
    bad = subprocess.run(train_command(tmp_path / "bad") + ["--set", f"model.init_from={learned_diffusion / 'model'}",
                                                           "--set", "model.unet.num_res_blocks=3"],
                         env=ENV, capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "['num_res_blocks'] differ from the trained model's" in bad.stderr


@pytest.mark.slow
def test_text_encoder_lr_scale_sets_its_share_of_the_first_adamw_step(tmp_path: Path) -> None:
    # Step 1, by hand: the attention blocks' output projections start at zero, so no gradient reaches the text
    # encoder and AdamW only decays it, p(1 - lr·wd); each U-Net weight with a gradient moves by the rate itself
    # (Adam's first m̂/√v̂ is ±1). The rate is lr/2 at warm-up step 1 of 2, and the text encoder takes a quarter.
    subprocess.run(train_command(tmp_path) + ["--max-steps", "1", "--set", "optim.text_encoder_lr_scale=0.25",
                                              "--set", "tracker=null"],
                   check=True, env=ENV, capture_output=True, cwd=ROOT)
    from ldm.training.config import load_train_config

    config, models = load_train_config(SMOKE), smoke_models_at_init()
    rate, decay = config.optim.lr / config.optim.warmup_steps, config.optim.weight_decay
    trained = load_state_dict(tmp_path / "model" / "text_encoder.safetensors")
    for key, initial in models.text_encoder.state_dict().items():
        torch.testing.assert_close(trained[key], initial * (1 - 0.25 * rate * decay), rtol=0, atol=1e-7, msg=key)
    trained = load_state_dict(tmp_path / "model" / "unet.safetensors")
    change = max((trained[k] - v).abs().max().item() for k, v in models.unet.state_dict().items())
    assert change == pytest.approx(rate, rel=0.02)


def test_a_frozen_text_encoder_computes_each_caption_once() -> None:
    from ldm.training.config import load_train_config
    from pipelines.training.diffusion import DiffusionTask

    config = load_train_config(SMOKE, sets=["model.train_text_encoder=false"])
    models = smoke_models_at_init()
    task = DiffusionTask(config, models)
    captions = ["a red circle", "", "a red circle", "a blue square above a red circle"]
    cached = task.contexts.get(models.text_encoder, models.tokenizer, captions, torch.device("cpu"))
    with torch.no_grad():
        direct = models.text_encoder(models.tokenizer(captions))  # the whole batch through the encoder
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=0)
    assert len(task.contexts.contexts) == 3 and not models.text_encoder.training
