"""Load a model folder and generate images to a file: what `latentsd generate` runs."""

from __future__ import annotations

from pathlib import Path

import torch

SCHEDULERS = ("ddpm", "ddim", "model")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model: str, scheduler: str = "model", device: str | None = None,
                  dtype: torch.dtype = torch.float32):
    """A ``LatentDiffusionPipeline`` from a diffusers-layout folder / hub id, with the chosen scheduler."""
    from .pipeline import LatentDiffusionPipeline
    from .schedulers import DDIMScheduler, DDPMScheduler

    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}: use one of {SCHEDULERS}")
    pipe = LatentDiffusionPipeline.from_pretrained(model, dtype=dtype)
    if scheduler != "model":
        cls = DDPMScheduler if scheduler == "ddpm" else DDIMScheduler
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe.to(device or default_device())


def generate_to_file(pipe, prompt: str, out: str | Path, negative_prompt: str | None = None,
                     steps: int = 50, guidance: float = 7.5, seed: int = 0, num_images: int = 1,
                     height: int | None = None, width: int | None = None, eta: float = 0.0) -> Path:
    """Generate ``num_images`` for one prompt with a seeded generator and save them (a grid when > 1)."""
    from .images import save_images

    generator = torch.Generator(pipe.device).manual_seed(seed)
    images = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                  num_images_per_prompt=num_images, height=height, width=width, generator=generator,
                  eta=eta).images
    return save_images(images, [prompt] * len(images), out)
