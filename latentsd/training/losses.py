"""What the UNet is trained to predict, on which timesteps, and how each sample's error is weighted.

Small pure functions; the training loop calls them in order and never branches on flags itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def loss_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                prediction_type: str | None = None) -> torch.Tensor:
    """The regression target: ε, v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho), or x₀ itself."""
    kind = prediction_type or scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r}: use epsilon, v_prediction or sample")


def sample_timesteps(draw, n: int, num_train_timesteps: int, loss_cfg) -> torch.Tensor:
    """Uniform on [timestep_min, timestep_max); a ``high_noise_fraction`` of samples from [high_noise_start, max).

    High-noise steps decide global layout (e.g. where an object sits) yet carry little ε-loss signal,
    so a small model may need to see more of them.
    """
    high = loss_cfg.timestep_max or num_train_timesteps
    uniform = draw.randint(loss_cfg.timestep_min, high, n)
    noisy = draw.randint(min(loss_cfg.high_noise_start, high - 1), high, n)
    pick_noisy = draw.rand(n) < loss_cfg.high_noise_fraction
    return torch.where(pick_noisy, noisy, uniform)


def make_noise(draw, shape: tuple[int, ...], noise_offset: float) -> torch.Tensor:
    """Gaussian noise plus an optional per-channel offset (lets the model shift overall brightness)."""
    noise = draw.randn(shape)
    if noise_offset:
        noise = noise + noise_offset * draw.randn((*shape[:2], 1, 1))
    return noise


def perturb_input_noise(draw, noise: torch.Tensor, strength: float) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023): noise the model input with ε + γ·ξ, keep ε as the target."""
    return noise + strength * draw.randn(tuple(noise.shape)) if strength else noise


def snr_weights(snr: torch.Tensor, prediction_type: str, snr_gamma: float | None,
                inverse_snr_max: float | None, debiased: bool = False) -> torch.Tensor:
    """Per-sample loss weights from the signal-to-noise ratio of each timestep.

    Weightings are defined on the ε-loss, and ‖v̂ − v‖² = ‖ε̂ − ε‖²·(SNR + 1)/SNR, ‖x̂₀ − x₀‖² = ‖ε̂ − ε‖²/SNR: an
    ε-weight w becomes w·SNR/(SNR + 1) on a v-loss and w·SNR on an x₀-loss, converted once however many are on.
    min-SNR-γ (Hang et al. 2023) caps the weight of easy low-noise steps: min(SNR, γ)/SNR for ε, so
    min(SNR, γ)/(SNR + 1) for v and min(SNR, γ) for x₀. ``debiased`` (Yu et al. 2024, kohya's debiased estimation)
    multiplies the ε-weight by 1/√SNR, SNR clamped to [1e-3, 1000]. ``inverse_snr_max`` multiplies the final weight by
    clamp(1/SNR, 1, max), shifting weight toward high noise.
    """
    weights = torch.ones_like(snr)
    if snr_gamma is not None or debiased:
        if snr_gamma is not None:
            weights = (snr_gamma / snr).clamp(max=1)  # min(SNR, γ)/SNR, also at SNR = 0
        if debiased:
            weights = weights * snr.clamp(1e-3, 1e3).rsqrt()
        weights = weights * _epsilon_to_target(snr, prediction_type)
    if inverse_snr_max is not None:
        weights = weights * (1 / snr.clamp(min=1e-8)).clamp(1, inverse_snr_max)
    return weights


def _epsilon_to_target(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The factor that turns an ε-loss weight into the same weight on this target's loss."""
    if prediction_type == "epsilon":
        return torch.ones_like(snr)
    if prediction_type == "v_prediction":
        return snr / (snr + 1)
    if prediction_type == "sample":
        return snr
    raise ValueError(f"unknown prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")


def huber_c(loss_cfg, timesteps: torch.Tensor, snr: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Each sample's pseudo-Huber c (Khrapov et al. 2024): ``constant`` huber_c; ``exponential``
    exp(ln(huber_c)·t/T), 1 at t = 0 falling to huber_c at t = T; ``snr`` (1 − huber_c)/(1 + σ_t)² + huber_c with
    σ_t = √((1 − ᾱ_t)/ᾱ_t) = 1/√SNR. So c is large (MSE-like) at low noise and small (robust) at high noise."""
    c, schedule = loss_cfg.huber_c, loss_cfg.huber_schedule
    if schedule == "constant":
        return torch.full_like(snr, c)
    if schedule == "exponential":
        return torch.exp(math.log(c) * timesteps.float() / num_train_timesteps)
    if schedule == "snr":
        return (1 - c) / (1 + snr.rsqrt()) ** 2 + c
    raise ValueError(f"unknown loss.huber_schedule {schedule!r}: use constant, exponential or snr")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse",
                     c: torch.Tensor | None = None) -> torch.Tensor:
    """Each element's loss in fp32: ``mse`` r²; ``huber`` 2c(√(r² + c²) − c) (≈ r² for |r| ≪ c, ≈ 2c|r| for
    |r| ≫ c); ``smooth_l1`` the same divided by c (≈ r²/c, then 2|r|). r = pred − target, c per sample.
    The pseudo-Huber core is computed as r²/(√(r² + c²) + c), which equals √(r² + c²) − c without its cancellation."""
    if kind == "mse":
        return F.mse_loss(pred.float(), target.float(), reduction="none")
    if kind not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown loss.type {kind!r}: use mse, huber or smooth_l1")
    squared = (pred.float() - target.float()) ** 2
    c = c.float().view(-1, *[1] * (squared.ndim - 1))
    core = squared / (torch.sqrt(squared + c**2) + c)
    return 2 * c * core if kind == "huber" else 2 * core


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, kind: str = "mse",
                  c: torch.Tensor | None = None, pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of each sample's mean :func:`elementwise_loss` times its weight, in fp32 (stable under
    mixed precision). ``pixel_weights`` ``[B, 1, h, w]`` (masked loss: :func:`latentsd.data.masks.latent_mask_weights`)
    weight each latent pixel's loss before the per-sample mean over channels and pixels."""
    elementwise = elementwise_loss(pred, target, kind, c)
    if pixel_weights is not None:
        elementwise = elementwise * pixel_weights.to(elementwise)
    per_sample = elementwise.flatten(1).mean(1)
    return (per_sample * weights).mean()
