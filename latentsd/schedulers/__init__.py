"""Noise schedulers: DDPM and DDIM, numerically matching diffusers and usable in its pipelines."""

from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler, DDPMSchedulerOutput
from .schedules import extract, make_betas, rescale_zero_terminal_snr

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DDPMSchedulerOutput",
    "extract",
    "make_betas",
    "rescale_zero_terminal_snr",
]
