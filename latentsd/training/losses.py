"""What the UNet is trained to predict, and how the error is weighted. Small functions the loop calls."""

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


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in fp32 (stable under mixed precision)."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
