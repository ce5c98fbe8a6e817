"""What the UNet is trained to predict, on which timesteps, and how each sample's error is weighted.

Small pure functions; the training loop calls them in order and never branches on flags itself.
"""

from __future__ import annotations

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
                inverse_snr_max: float | None) -> torch.Tensor:
    """Per-sample loss weights from the signal-to-noise ratio of each timestep.

    min-SNR-γ (Hang et al. 2023) caps the weight of easy low-noise steps: min(SNR, γ)/SNR for ε,
    min(SNR, γ)/(SNR + 1) for v, min(SNR, γ) for x₀. ``inverse_snr_max`` multiplies by
    clamp(1/SNR, 1, max), shifting weight toward high noise.
    """
    weights = torch.ones_like(snr)
    if snr_gamma is not None:
        capped = snr.clamp(max=snr_gamma)
        denominator = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[prediction_type]
        weights = capped / denominator.clamp(min=1e-8)
    if inverse_snr_max is not None:
        weights = weights * (1 / snr.clamp(min=1e-8)).clamp(1, inverse_snr_max)
    return weights


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sample's MSE times its weight, in fp32 (stable under mixed precision)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * weights).mean()
