"""``LatentDiffusionPipeline``: text → image with classifier-free guidance, diffusers-compatible.

Its numbers equal diffusers' ``StableDiffusionPipeline`` for the same components, scheduler and seed;
its folders load in diffusers and diffusers' folders load here. The sampling loop keeps everything on
the device (no ``.item()``, no branching on tensor values) and its shapes are static.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .latents import decode
from .models import as_our_scheduler, check_model_folder
from .text import PromptEncoder

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class LatentDiffusionPipelineOutput(BaseOutput):
    """``images``: a list of PIL images, an ``[N, H, W, 3]`` array, or a tensor (per ``output_type``)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, factor: float) -> torch.Tensor:
    """Match the guided prediction's std to the conditional one's (Lin et al. 2023, §3.4): fixes overexposure."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return factor * rescaled + (1 - factor) * guided


def batch_size(prompt, prompt_embeds) -> int:
    """Number of prompts of a call (before ``num_images_per_prompt``)."""
    if prompt is None:
        return prompt_embeds.shape[0]
    return 1 if isinstance(prompt, str) else len(prompt)


class LatentDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Stable-Diffusion-style text-to-image pipeline over vae, text_encoder, tokenizer, unet, scheduler."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ---- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a diffusers-layout folder or hub id; diffusers' DDPM/DDIM become ours, others stay as they are."""
        check_model_folder(str(pretrained_model_name_or_path))
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.scheduler = as_our_scheduler(pipe.scheduler)
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        """Write a folder that diffusers' ``StableDiffusionPipeline.from_pretrained`` loads unchanged."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        # Our schedulers share diffusers' class names and configs, so diffusers can load its own twin.
        index["scheduler"] = ["diffusers", type(self.scheduler).__name__]
        index.update(_class_name="StableDiffusionPipeline", safety_checker=[None, None],
                     feature_extractor=[None, None], requires_safety_checker=False)
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ---- checks -------------------------------------------------------------------------------------
    def check_inputs(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                     prompt_embeds, negative_prompt_embeds, output_type, num_images_per_prompt):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` or `prompt_embeds`")
        if not isinstance(prompt, (str, list, type(None))):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
        for name, value in (("height", height), ("width", width)):
            if value % self.vae_scale_factor:
                raise ValueError(f"`{name}`={value} must be divisible by {self.vae_scale_factor}: use "
                                 f"{value - value % self.vae_scale_factor} or {value - value % self.vae_scale_factor + self.vae_scale_factor}")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0 (1 disables guidance), got {guidance_scale}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown `output_type` {output_type!r}: use one of {OUTPUT_TYPES}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass `negative_prompt` or `negative_prompt_embeds`, not both")
        if isinstance(negative_prompt, list):
            n = batch_size(prompt, prompt_embeds)
            if len(negative_prompt) != n:
                raise ValueError(f"got {len(negative_prompt)} negative prompts for {n} prompts: pass one per "
                                 "prompt, or a single string used for all")
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")

    # ---- the parts of a call ------------------------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt=None, num_images_per_prompt=1, guidance=True,
                      prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None):
        """Return (cond, uncond) embeddings, each repeated ``num_images_per_prompt`` times (uncond None w/o guidance).

        Both lie on the execution device in the UNet's dtype, whatever the text encoder's. As in diffusers,
        ``negative_prompt`` is encoded also when ``prompt_embeds`` are given (at their length); ``""`` is the default.
        """
        encoder = PromptEncoder(self.tokenizer, self.text_encoder, device=self._execution_device)
        negatives = negative_prompt if isinstance(negative_prompt, list) else \
            [negative_prompt or ""] * batch_size(prompt, prompt_embeds)
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if guidance and negative_prompt_embeds is None:
                prompt_embeds, negative_prompt_embeds = encoder.encode_pair(prompts, negatives, clip_skip)
            else:
                prompt_embeds = encoder(prompts, clip_skip)
        elif guidance and negative_prompt_embeds is None:
            chunks, rest = divmod(prompt_embeds.shape[1], encoder.window)
            if rest or not chunks:
                raise ValueError(f"`prompt_embeds` has {prompt_embeds.shape[1]} tokens, not a multiple of the text "
                                 f"encoder's {encoder.window}: pass `negative_prompt_embeds` of the same shape too")
            negative_prompt_embeds = encoder(negatives, clip_skip, num_chunks=chunks)

        def repeat(embeds):
            embeds = embeds.to(device=self._execution_device, dtype=self.unet.dtype)
            return embeds.repeat_interleave(num_images_per_prompt, 0)

        return repeat(prompt_embeds), (repeat(negative_prompt_embeds) if guidance else None)

    def prepare_latents(self, batch, height, width, dtype, device, generator, latents=None):
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} images: pass one per image")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def step_kwargs(self, generator, eta: float) -> dict:
        """Pass ``eta`` / ``generator`` only to schedulers whose ``step`` takes them (any diffusers scheduler works)."""
        params = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}

    # ---- the call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, eta: float = 0.0,
                 guidance_rescale: float = 0.0, clip_skip: int | None = None, output_type: str = "pil",
                 callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
                 return_dict: bool = True):
        """Generate images for ``prompt``; see README for the meaning of each argument."""
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                          prompt_embeds, negative_prompt_embeds, output_type, num_images_per_prompt)
        device = self._execution_device
        guidance = guidance_scale > 1.0  # the diffusers convention: 1 means plain conditional sampling

        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt, guidance,
                                          prompt_embeds, negative_prompt_embeds, clip_skip)
        embeds = torch.cat([uncond, cond]) if guidance else cond  # one UNet call for both branches
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(cond.shape[0], height, width, self.unet.dtype, device, generator, latents)
        extra = self.step_kwargs(generator, eta)

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * 2) if guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if guidance:
                pred_uncond, pred_cond = noise_pred.chunk(2)
                noise_pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
                if guidance_rescale > 0:
                    noise_pred = rescale_guidance(noise_pred, pred_cond, guidance_rescale)
            latents = self.scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, i, t, {"latents": latents}).get("latents", latents)

        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(decode(self.vae, latents, generator=generator),
                                                      output_type=output_type)
        self.maybe_free_model_hooks()
        return LatentDiffusionPipelineOutput(images=images) if return_dict else (images,)
