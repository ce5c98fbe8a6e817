"""``LatentDiffusionImg2ImgPipeline``: image + text → image, a drop-in for diffusers'
``StableDiffusionImg2ImgPipeline``.

The init image is encoded, noised to the timestep where ``strength`` cuts the schedule, and denoised by the same
prompt, conditioning and loop code as text to image (:mod:`latentsd.pipeline_base`). ``ImageConditionedBase`` holds
what image-to-image and inpainting share: the argument checks, the strength cut of the schedule and the encoding
of init images.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from .pipeline import DEPRECATED, LatentDiffusionPipeline
from .pipeline_base import LatentDiffusionBase, LatentDiffusionPipelineOutput

__all__ = ["LatentDiffusionImg2ImgPipeline"]


def check_strength(strength: float) -> None:
    if not 0 <= strength <= 1:
        raise ValueError(f"`strength` must be in [0, 1] (0 keeps the image, 1 replaces it), got {strength}")


def encode_image_latents(vae, image: torch.Tensor, generator=None) -> torch.Tensor:
    """Pixels in [-1, 1] ``[B, 3, H, W]`` → scaled latents (a posterior sample; diffusers' ``retrieve_latents``).

    A list of generators draws image ``i`` from ``generator[i]``; 4-channel inputs are latents already."""
    if image.shape[1] == vae.config.latent_channels:
        return image
    image = image.to(device=vae.device, dtype=vae.dtype)
    if isinstance(generator, list):
        z = torch.cat([retrieve_latents(vae.encode(image[i:i + 1]), generator=generator[i])
                       for i in range(image.shape[0])])
    else:
        z = retrieve_latents(vae.encode(image), generator=generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0  # as latentsd.latents.decode undoes it
    return (z - shift) * vae.config.scaling_factor


def expand_batch(x: torch.Tensor, n: int, num_images_per_prompt: int, what: str) -> torch.Tensor:
    """``x`` (one row per image, per prompt, or a divisor of ``n``) → ``n`` rows in the prompts' order.

    One row per prompt is repeated ``num_images_per_prompt`` times in place, like the prompt embeddings (diffusers
    tiles the whole batch instead, pairing prompt 1 with image 2 when both counts exceed 1); any other divisor
    of ``n`` is tiled, as diffusers does."""
    b = x.shape[0]
    if b == n:
        return x
    if b * num_images_per_prompt == n:
        return x.repeat_interleave(num_images_per_prompt, dim=0)
    if n % b:
        raise ValueError(f"got {b} {what} for {n} images ({n // num_images_per_prompt} prompts × "
                         f"{num_images_per_prompt} per prompt): pass one, one per prompt, or one per image")
    return x.repeat(n // b, *([1] * (x.ndim - 1)))


class ImageConditionedBase(LatentDiffusionBase):
    """What image-to-image and inpainting share on top of :class:`LatentDiffusionBase`."""

    # the text-to-image argument checks, used as they are
    _check_prompts = LatentDiffusionPipeline._check_prompts
    _check_ip_adapter = staticmethod(LatentDiffusionPipeline._check_ip_adapter)
    _check_common = LatentDiffusionPipeline.check_inputs

    def _check_call_kwargs(self, kwargs: dict) -> None:
        for name in kwargs:
            fix = f"use `{DEPRECATED[name]}` (diffusers deprecated `{name}`)" if name in DEPRECATED else \
                f"see `help({type(self).__name__}.__call__)`"
            raise TypeError(f"{type(self).__name__}() got an unexpected argument `{name}`: {fix}")

    @staticmethod
    def _check_image(image, name: str = "image") -> None:
        if image is None:
            raise ValueError(f"`{name}` is required: pass a PIL image, a [0, 1] array or tensor, a list of them, "
                             "or latents")

    def get_timesteps(self, num_inference_steps, strength, device=None):
        """diffusers' ``get_timesteps``: the last ``strength`` of the schedule, and its number of steps."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order:]
        if hasattr(self.scheduler, "set_begin_index"):  # diffusers' stateful schedulers; ours look t up by value
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps, num_inference_steps - t_start

    def prepare_strength_timesteps(self, num_inference_steps, timesteps, sigmas, strength) -> torch.Tensor:
        """The full schedule (``retrieve_timesteps``), cut by ``strength``; ``num_timesteps`` is the cut length."""
        full = self.prepare_timesteps(num_inference_steps, timesteps, sigmas)
        steps = len(full) if timesteps is not None or sigmas is not None else num_inference_steps
        timesteps, steps = self.get_timesteps(steps, strength, self._execution_device)
        if steps < 1:
            raise ValueError(f"`strength`={strength} of {len(full)} steps leaves no denoising step: raise "
                             f"`strength` or `num_inference_steps` (strength × steps must be ≥ 1)")
        self._num_timesteps = len(timesteps)
        return timesteps


class LatentDiffusionImg2ImgPipeline(ImageConditionedBase):
    """Image-to-image over vae, text_encoder, tokenizer, unet, scheduler (+ optional safety_checker,
    feature_extractor, image_encoder); loads any text-to-image folder."""

    diffusers_class_name = "StableDiffusionImg2ImgPipeline"

    def check_inputs(self, prompt, strength, callback_steps=None, negative_prompt=None, prompt_embeds=None,
                     negative_prompt_embeds=None, ip_adapter_image=None, ip_adapter_image_embeds=None,
                     callback_on_step_end_tensor_inputs=None, *, image=None, **common):
        """diffusers' signature; ``image`` (preprocessed) and the keyword-only text-to-image checks (``common``:
        ``num_inference_steps``, ``guidance_scale``, ``output_type``, ``num_images_per_prompt``, ``timesteps``,
        ``sigmas``) are ours."""
        check_strength(strength)
        self._check_image(image)
        f = self.vae_scale_factor if image.shape[1] == self.vae.config.latent_channels else 1
        self._check_common(prompt, image.shape[-2] * f, image.shape[-1] * f, None, negative_prompt, prompt_embeds,
                           negative_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
                           callback_on_step_end_tensor_inputs, **common)

    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None):
        """diffusers' signature: the init image's latents noised to ``timestep`` (``batch_size`` prompts)."""
        n = batch_size * num_images_per_prompt
        if isinstance(generator, list):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for a batch of {n} images: pass one per image")
            if image.shape[1] != self.vae.config.latent_channels:  # one image per generator, as diffusers
                image = expand_batch(image, n, num_images_per_prompt, "images")
        init = encode_image_latents(self.vae, image, generator).to(device=device, dtype=dtype)
        init = expand_batch(init, n, num_images_per_prompt, "images")
        noise = randn_tensor(init.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(init, noise, timestep)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, strength: float = 0.8,
                 num_inference_steps: int | None = 50, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 ip_adapter_image=None, ip_adapter_image_embeds: list[torch.Tensor] | None = None,
                 output_type: str = "pil", return_dict: bool = True,
                 cross_attention_kwargs: dict[str, Any] | None = None, clip_skip: int | None = None,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), *, guidance_rescale: float = 0.0,
                 long_prompts: bool = False, prompt_weighting: bool = False, **kwargs):
        """diffusers' ``StableDiffusionImg2ImgPipeline.__call__`` arguments, in its order; ``image``: PIL, array or
        tensor in [0, 1] (or a list, or latents), ``strength`` in [0, 1]: the share of the schedule that is run.
        Keyword-only, as in ``LatentDiffusionPipeline``: ``guidance_rescale``, ``long_prompts``, ``prompt_weighting``.
        """
        self._check_call_kwargs(kwargs)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self._check_image(image)
        image = self.image_processor.preprocess(image)
        self.check_inputs(prompt, strength, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs, image=image,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          output_type=output_type, num_images_per_prompt=num_images_per_prompt, timesteps=timesteps,
                          sigmas=sigmas)
        self._begin_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)

        cond = self.prepare_conditioning(prompt, negative_prompt, num_images_per_prompt, prompt_embeds,
                                         negative_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
                                         long_prompts, prompt_weighting)
        n = cond.prompt_embeds.shape[0]
        timesteps = self.prepare_strength_timesteps(num_inference_steps, timesteps, sigmas, strength)
        latents = self.prepare_latents(image, timesteps[:1].repeat(n), n // num_images_per_prompt,
                                       num_images_per_prompt, self.unet.dtype, self._execution_device, generator)
        latents = self.denoise(latents, timesteps, cond, self.prepare_extra_step_kwargs(generator, eta),
                               callback_on_step_end, callback_on_step_end_tensor_inputs)
        images, nsfw = self.latents_to_images(latents, output_type, generator)
        self.maybe_free_model_hooks()
        return LatentDiffusionPipelineOutput(images, nsfw) if return_dict else (images, nsfw)
