"""Autoencoder training losses: GAN losses and the adaptive weight against closed forms, the
CompVis normalisations of NLL and KL, the disc_start switch, a short training run of a tiny VAE,
the PatchGAN shapes, LPIPS loading, and config validation."""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from autoencoder.discriminator import PatchDiscriminator
from autoencoder.losses import (
    LPIPS,
    AutoencoderLoss,
    AutoencoderLossConfig,
    adaptive_weight,
    autoencoder_last_layer,
    hinge_d_loss,
    load_lpips,
    vanilla_d_loss,
)
from ldm.config import config_from_dict

TINY_VAE = AutoencoderConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
# 16×16 images need a 2-layer PatchGAN (3 layers needs ≥ 24 px).
TINY_DISC = {"disc_base_channels": 16, "disc_num_layers": 2}
# Short run below (one thread): measured L1 0.595 → 0.107 (5.5×, deterministic on CPU; 5.7× with two
# threads) and a final hinge D loss of 0.26 (1.0 is chance: logits 0); asserted with margin.
MIN_L1_DROP = 3.0


class SquaredError(nn.Module):
    """Stand-in perceptual module with the LPIPS signature f(x, y) -> (B,1,1,1)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((x - y) ** 2).mean(dim=(1, 2, 3), keepdim=True)


def squares(n: int = 8) -> torch.Tensor:
    """``n`` deterministic 16×16 images in [-1, 1]: a 6×6 solid square on a solid background."""
    colours = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [-1, 1, 1], [1, -1, 1], [1, 1, 1]])
    images = []
    for i in range(n):
        img = 0.5 * colours[(i + 3) % 7].float().view(3, 1, 1).expand(3, 16, 16).clone()
        r, c = 2 + (i % 3) * 3, 2 + (i // 3) * 3
        img[:, r : r + 6, c : c + 6] = colours[i % 7].float().view(3, 1, 1)
        images.append(img)
    return torch.stack(images)


def test_gan_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 0.5])
    # hinge: relu(1 − r) = [0, 0.5, 2], relu(1 + f) = [0, 1, 1.5] → ½ (5/6 + 5/6)
    assert hinge_d_loss(real, fake).item() == pytest.approx(5 / 6, rel=1e-6)
    sp = lambda v: math.log1p(math.exp(v))
    expected = 0.5 * (sum(sp(-r) for r in real.tolist()) / 3 + sum(sp(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.tensor([[1.0, 2.0]], requires_grad=True)
    x = torch.tensor([3.0, 4.0])
    y = (w @ x).squeeze()  # 11
    nll, g = y**2, -3.0 * y  # ∇_w nll = 2·11·x = [66, 88] (norm 110); ∇_w g = −3x (norm 15)
    lam = adaptive_weight(nll, g, w)
    assert lam.item() == pytest.approx(110 / (15 + 1e-4), rel=1e-6)
    assert not lam.requires_grad
    # a vanishing GAN gradient gives 110 / 1e-4 = 1.1e6, clamped to max_weight
    assert adaptive_weight(nll, 0.0 * y, w).item() == pytest.approx(1e4)
    assert adaptive_weight(nll, 0.0 * y, w, max_weight=50.0).item() == pytest.approx(50.0)


def test_nll_and_kl_follow_compvis_normalisation():
    """nll = Σ_pixels (rec / e^s + s) / B, rec = |x − x̂| + w_p·LPIPS; KL summed over latent dims, mean over B."""
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    posterior = DiagonalGaussian(torch.randn(3, 8, 2, 2, generator=g))
    cfg = AutoencoderLossConfig(kl_weight=0.01, logvar_init=0.3, pixel_weight=0.5, perceptual_weight=2.0, **TINY_DISC)
    loss, logs = AutoencoderLoss(cfg, perceptual=SquaredError()).generator_loss(x, x_hat, posterior, 0, x_hat)

    rec = 0.5 * (x - x_hat).abs() + 2.0 * ((x - x_hat) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # broadcast as CompVis
    nll = (rec / math.exp(0.3) + 0.3).sum() / 3
    kl = posterior.kl().mean()
    assert logs["nll_loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert logs["kl_loss"] == pytest.approx(kl.item(), rel=1e-5)
    assert logs["rec_loss"] == pytest.approx(rec.mean().item(), rel=1e-5)
    torch.testing.assert_close(loss, nll + 0.01 * kl)


def test_gan_term_switches_on_at_disc_start():
    torch.manual_seed(0)
    vae, x = AutoencoderKL(TINY_VAE), squares(4)
    crit = AutoencoderLoss(AutoencoderLossConfig(disc_start=10, disc_weight=0.5, **TINY_DISC))
    last = autoencoder_last_layer(vae)
    assert last is vae.decoder.conv_out.weight
    gen = torch.Generator().manual_seed(0)
    recon, posterior = vae(x, generator=gen)

    loss, logs = crit.generator_loss(x, recon, posterior, 9, last)
    assert logs["g_loss"] == logs["d_weight"] == logs["disc_factor"] == 0.0
    assert loss.item() == pytest.approx(logs["nll_loss"] + 1e-6 * logs["kl_loss"], rel=1e-6)
    d_loss, _ = crit.discriminator_loss(x, recon, 9)
    assert d_loss.item() == 0.0 and d_loss.requires_grad  # backward() still works before disc_start

    loss, logs = crit.generator_loss(x, recon, posterior, 10, last)
    assert logs["disc_factor"] == 1.0 and logs["g_loss"] != 0.0 and logs["d_weight"] > 0.0
    # independent recomposition: nll + kl_weight·KL + disc_weight·λ·(−E[D(x̂)])
    nll = ((x - recon).abs() / crit.logvar.exp() + crit.logvar).sum() / 4
    g_loss = -crit.discriminator(recon).mean()  # train-mode BatchNorm: same batch, same logits
    lam = 0.5 * adaptive_weight(nll, g_loss, last)
    assert logs["d_weight"] == pytest.approx(lam.item(), rel=1e-5)
    torch.testing.assert_close(loss, nll + 1e-6 * posterior.kl().mean() + lam * g_loss)
    d_loss, _ = crit.discriminator_loss(x, recon, 10)
    assert d_loss.item() > 0.0


@pytest.fixture
def one_thread():
    """Tiny convolutions gain nothing from threads; on a busy 2-core box two threads spin-wait
    and the run below took 30-50 s instead of 3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_short_training_run_reduces_l1(one_thread):
    """Tiny VAE + PatchGAN, Adam, 100 steps on 8 squares images; GAN on from step 50."""
    torch.manual_seed(0)
    x, steps = squares(8), 100
    vae = AutoencoderKL(TINY_VAE)
    crit = AutoencoderLoss(AutoencoderLossConfig(disc_start=steps // 2, **TINY_DISC))
    opt = torch.optim.Adam([*vae.parameters(), crit.logvar], lr=1e-3)
    opt_d = torch.optim.Adam(crit.discriminator.parameters(), lr=1e-3, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(0)

    def l1() -> float:
        with torch.no_grad():
            return (vae(x, sample_posterior=False)[0] - x).abs().mean().item()

    l1_start, d_losses = l1(), []
    for step in range(steps):
        recon, posterior = vae(x, generator=gen)
        loss, logs = crit.generator_loss(x, recon, posterior, step, autoencoder_last_layer(vae))
        opt.zero_grad()
        loss.backward()
        opt.step()
        d_loss, d_logs = crit.discriminator_loss(x, recon, step)
        opt_d.zero_grad()  # also clears the D gradients the generator step left behind
        d_loss.backward()
        opt_d.step()
        d_losses.append(d_logs["disc_loss"])
    l1_end = l1()
    assert l1_start / l1_end > MIN_L1_DROP, (l1_start, l1_end)
    assert all(math.isfinite(v) for v in d_losses) and logs["d_weight"] > 0
    assert all(v == 0.0 for v in d_losses[: steps // 2]) and 0.0 < d_losses[-1] < 1.0  # D beats chance


def test_patch_discriminator_shapes_and_init():
    d = PatchDiscriminator(base_channels=8)
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # taming's 70×70 PatchGAN on 256 px
    assert PatchDiscriminator(num_layers=2, base_channels=8)(torch.zeros(2, 3, 16, 16)).shape == (2, 1, 2, 2)
    keys = set(d.state_dict())
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean", "main.11.weight"} <= keys
    assert "main.2.bias" not in keys  # no bias before BatchNorm, as in taming
    big = PatchDiscriminator()
    assert big.main[8].weight.std().item() == pytest.approx(0.02, rel=0.05)  # N(0, 0.02)
    group = PatchDiscriminator(base_channels=8, norm="group")
    assert isinstance(group.main[3], nn.GroupNorm)


def test_perceptual_module_stays_in_eval_mode():
    crit = AutoencoderLoss(AutoencoderLossConfig(**TINY_DISC), perceptual=SquaredError()).train()
    assert crit.discriminator.training and not crit.perceptual.training
    assert not any(p.requires_grad for p in crit.perceptual.parameters())


@pytest.mark.slow
def test_load_lpips(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.safetensors.*does not exist.*VGG16.*lin0-4"):
        load_lpips(tmp_path / "missing.safetensors")
    state = LPIPS().state_dict()
    save_file(state, str(tmp_path / "lpips.safetensors"))
    torch.save({k: v for k, v in state.items() if not k.startswith("lin")}, tmp_path / "vgg_only.pt")
    with pytest.raises(ValueError, match=r"vgg_only\.pt.*missing \['lin0\.model\.1\.weight'"):
        load_lpips(tmp_path / "vgg_only.pt")

    lpips = load_lpips(tmp_path / "lpips.safetensors")
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert lpips(x, y).shape == (2, 1, 1, 1)
    assert lpips(x, x).abs().max().item() == 0.0
    torch.testing.assert_close(lpips.lin2.model[1].weight, state["lin2.model.1.weight"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kl_weight", -1.0),
        ("disc_weight", "0.5"),
        ("disc_start", -1),
        ("disc_start", 1.5),
        ("logvar_init", float("nan")),
        ("logvar_init", float("inf")),
        ("disc_loss", "wgan"),
        ("disc_norm", "instance"),
        ("disc_num_layers", 0),
    ],
)
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        AutoencoderLossConfig(**{field: value})


def test_bad_config_messages_and_unknown_keys():
    with pytest.raises(ValueError, match=r"disc_loss='wgan' is not supported; allowed: 'hinge', 'vanilla'"):
        AutoencoderLossConfig(disc_loss="wgan")
    unknown = r"unknown key 'disc_strat'; allowed keys: .*kl_weight"
    with pytest.raises(ValueError, match=unknown):
        config_from_dict(AutoencoderLossConfig, {"disc_strat": 10})
    assert config_from_dict(AutoencoderLossConfig, {"disc_start": 10}).disc_start == 10
    crit = AutoencoderLoss(AutoencoderLossConfig(**TINY_DISC))
    with pytest.raises(ValueError, match="global_step=-1"):
        crit.disc_factor(-1)
    with pytest.raises(ValueError, match=r"recon has shape \(1, 3, 8, 8\); expected \(1, 3, 16, 16\)"):
        crit.discriminator_loss(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 8), 0)
