"""Training losses of the KL autoencoder: L1 (+ LPIPS) NLL, KL, and an adaptive PatchGAN term.

A clean rewrite of CompVis ``LPIPSWithDiscriminator`` (Rombach et al. 2022, app. G), itself the
VQGAN objective of Esser et al. 2021 (eq. 5-7) with the codebook term replaced by a KL penalty.
Normalisations follow CompVis exactly: the NLL is summed over pixels and channels and averaged
over the batch (``torch.sum(nll) / B``); the KL is summed over latent dimensions and averaged
over the batch. Two differences, both inert at the defaults: ``pixel_weight`` scales the L1 term
(CompVis stores ``pixelloss_weight`` but never uses it), and the perceptual term is only added
when an LPIPS module is passed in (CompVis always builds one, downloading VGG weights).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoencoder.discriminator import NORMS, PatchDiscriminator
from autoencoder.model import AutoencoderKL, DiagonalGaussian
from ldm.validation import check_choice, check_float, check_int, check_same_shape

logger = logging.getLogger(__name__)

DISC_LOSSES = ("hinge", "vanilla")
GRAD_NORM_EPS = 1e-4  # Esser et al. 2021, eq. 7 (δ)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))]) — hinge GAN loss (Lim & Ye 2017), taming's scaling."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """½ (E[softplus(−D(x))] + E[softplus(D(x̂))]) — non-saturating GAN (Goodfellow et al. 2014) on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer_weight: Tensor, max_weight: float = 1e4) -> Tensor:
    """λ = ‖∇_L nll‖ / (‖∇_L g‖ + δ), clamped to [0, max_weight] and detached (Esser et al. 2021, eq. 7).

    ``L`` is the decoder's last layer; the ratio balances the GAN gradient against the
    reconstruction gradient where both enter the decoder. Keeps the graph for the later backward.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + GRAD_NORM_EPS)).clamp(0.0, max_weight).detach()


def autoencoder_last_layer(vae: AutoencoderKL) -> Tensor:
    """The weight the adaptive GAN weight is measured at: the decoder's output conv."""
    return vae.decoder.conv_out.weight


@dataclass
class AutoencoderLossConfig:
    """Weights and schedule of :class:`AutoencoderLoss` (defaults: SD's ``kl-f8`` training config)."""

    kl_weight: float = 1e-6
    pixel_weight: float = 1.0
    pixel_loss: str = "l1"  # "l1" (CompVis) or "l2": squared error, whose gradient fades where pixels are already
    # right (flat backgrounds), so small objects dominate sooner
    disc_start: int = 50001  # first global step with the GAN term (generator and discriminator)
    disc_weight: float = 0.5  # multiplies the adaptive λ
    disc_factor: float = 1.0
    perceptual_weight: float = 1.0  # used only when a perceptual (LPIPS) module is given
    logvar_init: float = 0.0  # learned scalar log-variance s: nll = |x − x̂| / exp(s) + s
    disc_loss: str = "hinge"
    disc_in_channels: int = 3
    disc_base_channels: int = 64
    disc_num_layers: int = 3
    disc_norm: str = "batch"

    def __post_init__(self) -> None:
        for name in ("kl_weight", "pixel_weight", "disc_weight", "disc_factor", "perceptual_weight"):
            setattr(self, name, check_float(name, getattr(self, name), 0.0))
        self.logvar_init = check_float("logvar_init", self.logvar_init)
        if not math.isfinite(self.logvar_init):
            raise ValueError(f"logvar_init={self.logvar_init!r} is out of range; allowed: a finite number")
        check_int("disc_start", self.disc_start, 0)
        for name in ("disc_in_channels", "disc_base_channels", "disc_num_layers"):
            check_int(name, getattr(self, name), 1)
        check_choice("pixel_loss", self.pixel_loss, ("l1", "l2"))
        check_choice("disc_loss", self.disc_loss, DISC_LOSSES)
        check_choice("disc_norm", self.disc_norm, NORMS)


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of the KL autoencoder; owns the discriminator and
    the learned log-variance (so both go in the checkpoint and ``logvar`` into the VAE optimizer).

    One training step (two optimizers, as in CompVis)::

        recon, posterior = vae(x, generator=g)
        loss, logs = criterion.generator_loss(x, recon, posterior, step, autoencoder_last_layer(vae))
        opt_vae.zero_grad(); loss.backward(); opt_vae.step()        # opt_vae: vae + criterion.logvar
        d_loss, d_logs = criterion.discriminator_loss(x, recon, step)
        opt_d.zero_grad(); d_loss.backward(); opt_d.step()          # zero_grad also drops the
                                                                    # generator step's D gradients
    """

    def __init__(self, config: AutoencoderLossConfig | None = None, perceptual: nn.Module | None = None) -> None:
        super().__init__()
        self.config = c = config or AutoencoderLossConfig()
        disc = (c.disc_in_channels, c.disc_base_channels, c.disc_num_layers, c.disc_norm)
        self.discriminator = PatchDiscriminator(*disc)
        self.logvar = nn.Parameter(torch.tensor(c.logvar_init))
        self.perceptual = perceptual.eval().requires_grad_(False) if perceptual is not None else None
        self.d_loss_fn = hinge_d_loss if c.disc_loss == "hinge" else vanilla_d_loss
        if perceptual is None:
            logger.info("AutoencoderLoss without a perceptual module: the LPIPS term is off")

    def train(self, mode: bool = True) -> AutoencoderLoss:
        """Switch the discriminator; the perceptual network stays in eval mode (no LPIPS dropout)."""
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    def disc_factor(self, global_step: int) -> float:
        """``disc_factor`` from ``disc_start`` on, 0 before (CompVis ``adopt_weight``)."""
        return self.config.disc_factor if check_int("global_step", global_step, 0) >= self.config.disc_start else 0.0

    def generator_loss(
        self,
        inputs: Tensor,
        recon: Tensor,
        posterior: DiagonalGaussian,
        global_step: int,
        last_layer: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """nll + kl_weight·KL + disc_factor·disc_weight·λ·(−E[D(x̂)]) for images (B,C,H,W) in [-1, 1].

        ``last_layer``: see :func:`autoencoder_last_layer`. Before ``disc_start`` (or with
        ``disc_factor=0``) the discriminator is not run. Without autograd (validation under
        ``torch.no_grad``) λ cannot be measured and is 0, as in CompVis.
        """
        check_same_shape("recon", tuple(recon.shape), tuple(inputs.shape))
        c, b = self.config, inputs.shape[0]
        diff = inputs - recon
        rec = c.pixel_weight * (diff.abs() if c.pixel_loss == "l1" else diff**2)  # (B,C,H,W)
        logs: dict[str, float] = {}
        if self.perceptual is not None and c.perceptual_weight > 0:
            p_loss = self.perceptual(inputs, recon)  # (B,1,1,1), broadcast over pixels as in CompVis
            rec = rec + c.perceptual_weight * p_loss
            logs["p_loss"] = p_loss.mean().item()
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / b  # summed over pixels, mean over batch
        kl = posterior.kl().sum() / b  # kl() is already summed over latent dims: (B,)
        loss = nll + c.kl_weight * kl

        factor = self.disc_factor(global_step)
        g_loss = d_weight = torch.zeros((), device=inputs.device)
        if factor > 0:
            g_loss = -self.discriminator(recon).mean()
            if torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad:
                d_weight = adaptive_weight(nll, g_loss, last_layer) * c.disc_weight
            loss = loss + d_weight * factor * g_loss
        logs.update(
            total_loss=loss.item(), logvar=self.logvar.item(), kl_loss=kl.item(), nll_loss=nll.item(),
            rec_loss=rec.mean().item(), d_weight=d_weight.item(), disc_factor=factor, g_loss=g_loss.item(),
        )  # fmt: skip
        return loss, logs

    def discriminator_loss(self, inputs: Tensor, recon: Tensor, global_step: int) -> tuple[Tensor, dict[str, float]]:
        """disc_factor·(hinge or vanilla) on D(x) and D(x̂) (both detached); 0 before ``disc_start``.

        The discriminator runs even before ``disc_start`` (as in CompVis), so the returned loss
        always has a graph and ``backward()`` needs no special case.
        """
        check_same_shape("recon", tuple(recon.shape), tuple(inputs.shape))
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(recon.detach())
        loss = self.disc_factor(global_step) * self.d_loss_fn(logits_real, logits_fake)
        return loss, {
            "disc_loss": loss.item(),
            "logits_real": logits_real.mean().item(),
            "logits_fake": logits_fake.mean().item(),
        }


# --- LPIPS (Zhang et al. 2018), VGG16 variant in the taming-transformers layout -------------------

LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # vgg16.features up to relu1_2 … relu5_3


class LPIPS(nn.Module):
    """d(x, y) = Σ_l mean_hw ‖w_l ⊙ (φ̂_l(x) − φ̂_l(y))‖² with unit-normalised VGG16 features φ̂_l
    (Zhang et al. 2018, eq. 1). Inputs in [-1, 1]; returns (B,1,1,1). State-dict keys are those of
    taming's ``LPIPS``: ``net.slice{1-5}.{i}.*`` and ``lin{0-4}.model.1.weight``."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import vgg16  # only needed here

        features = vgg16(weights=None, init_weights=False).features  # weights come from load_lpips
        self.net = nn.Module()
        for k, (lo, hi) in enumerate(LPIPS_SLICES, 1):
            s = nn.Sequential()
            for i in range(lo, hi):
                s.add_module(str(i), features[i])  # keep torchvision's indices in the keys
            setattr(self.net, f"slice{k}", s)
        for k, ch in enumerate(LPIPS_CHANNELS):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(), nn.Conv2d(ch, 1, 1, bias=False))
            setattr(self, f"lin{k}", lin)
        # LPIPS' ScalingLayer: [-1, 1] images to ImageNet statistics. Constants, not weights.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h_x, h_y, total = (x - self.shift) / self.scale, (y - self.shift) / self.scale, 0.0
        for k in range(len(LPIPS_CHANNELS)):
            s = getattr(self.net, f"slice{k + 1}")
            h_x, h_y = s(h_x), s(h_y)
            diff = (_unit(h_x) - _unit(h_y)) ** 2
            total = total + getattr(self, f"lin{k}").model(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _unit(h: Tensor, eps: float = 1e-10) -> Tensor:
    return h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def load_lpips(path: str | os.PathLike) -> LPIPS:
    """LPIPS-VGG with all weights (VGG16 features *and* linear heads) from one ``.safetensors`` or
    ``.pt``/``.pth``/``.ckpt`` file (loaded with ``weights_only=True``), frozen and in eval mode.

    Nothing is downloaded: a missing file or missing keys raise ``ValueError``. Such a file is,
    e.g., ``taming.modules.losses.lpips.LPIPS().state_dict()`` saved once where VGG is available.
    """
    p = Path(path)
    need = "one file holding both the VGG16 features (net.slice1-5.*) and the LPIPS heads (lin0-4.model.1.weight)"
    if not p.is_file():
        raise ValueError(f"LPIPS weights file {str(path)!r} does not exist; load_lpips needs {need} (no download)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p), device="cpu")
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k: v for k, v in state.items() if not k.startswith("scaling_layer.")}  # taming's constant buffers
    model = LPIPS()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"LPIPS weights file {str(path)!r} does not match: missing {missing[:6]}{'…' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'…' if len(unexpected) > 6 else ''}; expected {need}"
        )
    logger.info("loaded LPIPS-VGG weights from %s", p)
    return model.eval().requires_grad_(False)
