"""Noise-schedule math shared by the schedulers: β tables, zero-terminal-SNR rescaling, the
posterior coefficients of Ho et al. (2020) and the one per-timestep gather helper."""

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def make_betas(
    num_train_timesteps: int,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Return the float32 table β_0..β_{T-1} for `beta_schedule` (same numbers as diffusers).

    `trained_betas`, when given, is used as is and must have `num_train_timesteps` entries.
    `max_beta` caps the cosine schedule, whose last steps would otherwise reach β = 1.
    """
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
        if betas.shape != (num_train_timesteps,):
            raise ValueError(
                f"trained_betas has shape {tuple(betas.shape)}, expected ({num_train_timesteps},) "
                "to match num_train_timesteps."
            )
        return betas
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps, max_beta)
    if beta_schedule == "sigmoid":
        ramp = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float32))
        return ramp * (beta_end - beta_start) + beta_start
    raise ValueError(f"Unknown beta_schedule {beta_schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}.")


def _cosine_betas(num_train_timesteps: int, max_beta: float) -> torch.Tensor:
    """β_t = 1 − ᾱ(t+1)/ᾱ(t) with ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008 (Nichol & Dhariwal 2021, Eq. 17)."""
    t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale `betas` so the last step has zero SNR (ᾱ_T = 0), Lin et al. 2023, Algorithm 1.

    √ᾱ is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def posterior_coefficients(alpha_prod_t: torch.Tensor, alpha_prod_prev: torch.Tensor, beta: torch.Tensor | None = None):
    """Coefficients of the posterior q(x_{t'} | x_t, x_0) for a jump t → t' < t (Ho et al. 2020, Eqs. 6–7).

    With α := 1 − β and β defaulting to the jump's 1 − ᾱ_t/ᾱ_{t'} (the usual β_t when t' = t − 1):
        β̃ = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · β
        μ̃ = √ᾱ_{t'} β / (1 − ᾱ_t) · x_0  +  √α (1 − ᾱ_{t'}) / (1 − ᾱ_t) · x_t
    Pass the exact `beta` for one-step tables: 1 − ᾱ_t/ᾱ_{t−1} cancels badly for small β.
    Returns `(beta, posterior_variance, coef_x0, coef_xt)`; without `beta` the float32 evaluation
    order follows diffusers' DDPM/DDIM step, so the tables match it bit for bit.
    """
    if beta is None:
        alpha = alpha_prod_t / alpha_prod_prev
        beta = 1 - alpha
    else:
        alpha = 1 - beta
    one_minus_prod, one_minus_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
    variance = one_minus_prev / one_minus_prod * beta
    coef_x0 = alpha_prod_prev**0.5 * beta / one_minus_prod
    coef_xt = alpha**0.5 * one_minus_prev / one_minus_prod
    return beta, variance, coef_x0, coef_xt


def extract(coeffs: torch.Tensor, timesteps, broadcast_like: torch.Tensor) -> torch.Tensor:
    """Gather `coeffs[timesteps]` shaped (B, 1, 1, ...) to broadcast against `broadcast_like`.

    `coeffs` is a 1-D per-timestep table; `timesteps` a Python int or a 0-d/1-d integer tensor.
    The result has `broadcast_like`'s device and dtype. Tensor indices always take the
    advanced-indexing path (reshape to 1-D), which never reads the index on the host.
    """
    coeffs = coeffs.to(broadcast_like.device)
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.to(broadcast_like.device).reshape(-1)
    values = coeffs[timesteps].to(broadcast_like.dtype)
    return values.reshape(-1, *([1] * (broadcast_like.ndim - 1)))
