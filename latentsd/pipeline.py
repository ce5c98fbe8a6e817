"""``LatentDiffusionPipeline``: text → image with classifier-free guidance, a drop-in for diffusers'
``StableDiffusionPipeline``.

It takes every argument of diffusers' ``__call__`` and ``encode_prompt``, has its properties, optional
components (safety checker, feature extractor, image encoder) and mixins (FreeU, fused QKV, LoRA, textual
inversion, IP-Adapter), and its images equal diffusers' for the same components, scheduler and seed. Its
folders load in diffusers and diffusers' folders load here. The sampling loop (:mod:`latentsd.pipeline_base`)
keeps everything on the device (no ``.item()``, no branching on tensor values) and its shapes are static.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from .pipeline_base import LatentDiffusionBase, LatentDiffusionPipelineOutput

__all__ = ["LatentDiffusionPipeline", "LatentDiffusionPipelineOutput"]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEPRECATED = {"callback": "callback_on_step_end", "callback_steps": "callback_on_step_end"}


def batch_size(prompt, prompt_embeds) -> int:
    """Number of prompts of a call (before ``num_images_per_prompt``)."""
    if prompt is None:
        return prompt_embeds.shape[0]
    return 1 if isinstance(prompt, str) else len(prompt)


class LatentDiffusionPipeline(LatentDiffusionBase):
    """Stable-Diffusion-style text-to-image pipeline over vae, text_encoder, tokenizer, unet, scheduler
    (+ optional safety_checker, feature_extractor, image_encoder)."""

    # ---- checks -------------------------------------------------------------------------------------
    def check_inputs(self, prompt, height, width, callback_steps=None, negative_prompt=None, prompt_embeds=None,
                     negative_prompt_embeds=None, ip_adapter_image=None, ip_adapter_image_embeds=None,
                     callback_on_step_end_tensor_inputs=None, *, num_inference_steps=50, guidance_scale=7.5,
                     output_type="pil", num_images_per_prompt=1, timesteps=None, sigmas=None):
        """diffusers' signature (``callback_steps`` is refused by ``__call__``), plus keyword-only checks of the other
        arguments; each error says what to change."""
        self._check_prompts(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value < factor or value % factor:
                near = max(factor, value - value % factor)
                raise ValueError(f"`{name}`={value} must be a positive multiple of {factor} (divisible by {factor}): "
                                 f"use {near}{f' or {near + factor}' if value > factor else ''}, or leave it out for "
                                 "the model's native size")
        if timesteps is None and sigmas is None and (num_inference_steps is None or num_inference_steps < 1):
            raise ValueError(f"`num_inference_steps` must be >= 1 (or pass `timesteps` / `sigmas`), got "
                             f"{num_inference_steps}")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be >= 1, got {num_images_per_prompt}")
        if not 0 <= guidance_scale < float("inf"):  # NaN fails every comparison
            raise ValueError(f"`guidance_scale` must be a finite number >= 0 (1 disables guidance), got {guidance_scale}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown `output_type` {output_type!r}: use one of {OUTPUT_TYPES}")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` {unknown} unknown: use some of "
                             f"{self._callback_tensor_inputs}")
        self._check_ip_adapter(ip_adapter_image, ip_adapter_image_embeds)

    def _check_prompts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` or `prompt_embeds`")
        if not isinstance(prompt, (str, list, type(None))):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass `negative_prompt` or `negative_prompt_embeds`, not both")
        n = batch_size(prompt, prompt_embeds)
        if isinstance(negative_prompt, list) and len(negative_prompt) != n:
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {n} prompts: pass one per "
                             "prompt, or a single string used for all")
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")

    @staticmethod
    def _check_ip_adapter(image, embeds):
        if image is not None and embeds is not None:
            raise ValueError("pass `ip_adapter_image` or `ip_adapter_image_embeds`, not both")
        if embeds is not None and (not isinstance(embeds, list) or any(e.ndim not in (3, 4) for e in embeds)):
            raise ValueError("`ip_adapter_image_embeds` must be a list (one entry per IP-Adapter) of 3-D or 4-D "
                             "tensors `[batch, num_images, dim]`, negatives first under guidance")

    # ---- the call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = 50, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
                 return_dict: bool = True, cross_attention_kwargs: dict[str, Any] | None = None,
                 guidance_rescale: float = 0.0, clip_skip: int | None = None,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), *, long_prompts: bool = False,
                 prompt_weighting: bool = False, **kwargs):
        """Generate images: diffusers' ``StableDiffusionPipeline.__call__`` arguments, in its order, plus

        ``long_prompts``: prompts longer than 77 tokens are encoded in 75-token chunks (padding chunks masked)
        instead of truncated; ``prompt_weighting``: A1111 weights, ``(word:1.3)``, ``(word)``, ``[word]``.
        Returns ``LatentDiffusionPipelineOutput(images, nsfw_content_detected)`` or that tuple.
        """
        for name in kwargs:
            fix = f"use `{DEPRECATED[name]}` (diffusers deprecated `{name}`)" if name in DEPRECATED else \
                "see `help(LatentDiffusionPipeline.__call__)`"
            raise TypeError(f"LatentDiffusionPipeline() got an unexpected argument `{name}`: {fix}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height, width = self.default_size(height, width)
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          output_type=output_type, num_images_per_prompt=num_images_per_prompt, timesteps=timesteps,
                          sigmas=sigmas)
        self._begin_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)

        cond = self.prepare_conditioning(prompt, negative_prompt, num_images_per_prompt, prompt_embeds,
                                         negative_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
                                         long_prompts, prompt_weighting)
        timesteps = self.prepare_timesteps(num_inference_steps, timesteps, sigmas)
        latents = self.prepare_latents(cond.prompt_embeds.shape[0], self.unet.config.in_channels, height, width,
                                       self.unet.dtype, self._execution_device, generator, latents)
        latents = self.denoise(latents, timesteps, cond, self.prepare_extra_step_kwargs(generator, eta),
                               callback_on_step_end, callback_on_step_end_tensor_inputs)
        images, nsfw = self.latents_to_images(latents, output_type, generator)
        self.maybe_free_model_hooks()
        return LatentDiffusionPipelineOutput(images, nsfw) if return_dict else (images, nsfw)

