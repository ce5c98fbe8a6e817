"""Validation during training: images for fixed prompts and seeds, and a deterministic held-out loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..images import save_images


def validation_images(acc, pipe, cfg) -> list:
    """Every rank generates its share of the prompts; the main process gets all images, in prompt order.

    Seeds are fixed per prompt, so the grids of successive validations are comparable.
    """
    v = cfg.validation
    mine = list(range(acc.process_index, len(v.prompts), acc.num_processes))
    arrays = []
    for i in mine:
        generator = torch.Generator(pipe.device).manual_seed(v.seed + i)
        images = pipe(v.prompts[i], num_inference_steps=v.steps, guidance_scale=v.guidance,
                      num_images_per_prompt=v.num_images_per_prompt, generator=generator, output_type="np").images
        arrays.append(torch.from_numpy((images * 255).round().astype(np.uint8)))
    return _gather_in_prompt_order(acc, arrays, mine, len(v.prompts))


def _gather_in_prompt_order(acc, arrays, mine, n_prompts):
    from accelerate.utils import gather_object

    pairs = gather_object(list(zip(mine, [a.numpy() for a in arrays])))
    by_prompt = dict(pairs)
    return [img for i in range(n_prompts) for img in by_prompt[i]]


def save_validation_grid(images: list[np.ndarray], cfg, step: int) -> Path:
    import PIL.Image

    v = cfg.validation
    prompts = [p for p in v.prompts for _ in range(v.num_images_per_prompt)]
    path = Path(cfg.output_dir) / "validation" / f"step-{step:07d}.png"
    cols = v.num_images_per_prompt if v.num_images_per_prompt > 1 else None  # a row per prompt, or a square grid
    return save_images([PIL.Image.fromarray(a) for a in images], prompts, path, cols=cols)


def fixed_noise(shape, key: tuple[int, int], indices, device) -> torch.Tensor:
    """Noise that depends only on (key, sample index): the same sample always gets the same noise."""
    def one(i):
        gen = torch.Generator(device).manual_seed(key[0] * 1_000_003 + key[1] * 10_007 + int(i))
        return torch.randn(shape, generator=gen, device=device)
    return torch.stack([one(i) for i in indices])


@torch.no_grad()
def validation_loss(trainer, batches) -> float:
    """Mean ε/v/x₀ MSE over held-out samples at fixed timesteps and fixed noise (posterior mode latents).

    Deterministic: the same weights give the same number, so curves across runs are comparable.
    """
    from ..latents import encode
    from .distributed import reshard
    from .losses import loss_target

    acc, sched, v = trainer.acc, trainer.scheduler, trainer.cfg.validation
    total, count = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
    unet = acc.unwrap_model(trainer.unet)
    for batch in batches:  # the same number on every rank; padding samples have weight 0
        latents = encode(trainer.parts.vae, batch["pixel_values"].to(acc.device, trainer.weight_dtype), sample=False).float()
        weight = batch.get("weight", torch.ones(latents.shape[0])).to(acc.device)
        embeds = trainer.prompts(batch["caption"]).to(latents.dtype)
        for t in v.loss_timesteps:
            noise = fixed_noise(latents.shape[1:], (v.seed, t), batch["index"], acc.device)
            timesteps = torch.full((latents.shape[0],), t, device=acc.device, dtype=torch.long)
            pred = unet(sched.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=embeds).sample
            target = loss_target(sched, latents, noise, timesteps, trainer.prediction_type)
            per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            total += (per_sample * weight).sum()
            count += weight.sum()
    reshard(unet)  # FSDP: drop the gathered weights, so the next forward sees the current (non-EMA) shards
    total, count = acc.reduce(total, "sum"), acc.reduce(count, "sum")
    return (total / count.clamp(min=1)).item()
