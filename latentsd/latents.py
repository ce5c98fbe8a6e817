"""Pixels ↔ scaled latents with a diffusers ``AutoencoderKL``.

Latents handed to the UNet are ``(z - shift) * scaling_factor`` (shift is 0 for SD-1.x/2.x VAEs), the
convention diffusers uses, so latents and models move freely between latentsd and diffusers.
"""

from __future__ import annotations

import torch


def _scale_shift(vae) -> tuple[float, float]:
    return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0


def latent_shape(vae, pixel_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``[B, 3, H, W]`` → ``[B, C, H/f, W/f]`` for this VAE."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (pixel_shape[0], vae.config.latent_channels, pixel_shape[2] // factor, pixel_shape[3] // factor)


def encode(vae, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images in [-1, 1] ``[B, 3, H, W]`` → scaled latents.

    ``sample=False`` takes the posterior mode; ``noise`` (of :func:`latent_shape`) replaces the
    posterior's own draw, for callers that must control every random number.
    """
    scale, shift = _scale_shift(vae)
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    if not sample:
        z = posterior.mode()
    elif noise is not None:
        z = posterior.mean + posterior.std * noise.to(posterior.mean)
    else:
        z = posterior.sample(generator)
    return (z - shift) * scale


@torch.no_grad()
def decode(vae, latents: torch.Tensor, slice_size: int | None = None, tiled: bool = False,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents → images in about [-1, 1].

    ``slice_size`` decodes that many latents at a time (bounded memory for big batches); ``tiled``
    decodes overlapping tiles with diffusers' blending (bounded memory for large images).
    """
    scale, shift = _scale_shift(vae)
    z = (latents / scale + shift).to(dtype=vae.dtype)
    step = z.shape[0] if slice_size is None else slice_size
    if step < 1:
        raise ValueError(f"slice_size must be >= 1, got {slice_size}")

    def run(part):
        if tiled:
            return vae.tiled_decode(part, return_dict=False)[0]
        return vae.decode(part, return_dict=False, generator=generator)[0]

    return torch.cat([run(part) for part in z.split(step)])
