"""``LatentDiffusionInpaintPipeline``: repaint the white part of a mask, a drop-in for diffusers'
``StableDiffusionInpaintPipeline``.

Two kinds of UNet, as in diffusers: a 9-channel inpainting UNet sees ``cat([latents, mask, masked-image latents])``
(the loop's ``model_input`` hook); a plain 4-channel UNet is steered by blending: after every step the unmasked
part is replaced by the init image's latents noised to the next timestep (the ``after_step`` hook). Prompts,
conditioning, schedule and loop are the text-to-image pipeline's (:mod:`latentsd.pipeline_base`).
"""

from __future__ import annotations

from typing import Any, Callable

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .img2img import ImageConditionedBase, check_strength, encode_image_latents, expand_batch
from .pipeline_base import LatentDiffusionPipelineOutput

__all__ = ["LatentDiffusionInpaintPipeline"]


class LatentDiffusionInpaintPipeline(ImageConditionedBase):
    """Inpainting over vae, text_encoder, tokenizer, unet (4 or 9 input channels), scheduler (+ optional
    safety_checker, feature_extractor, image_encoder); loads any text-to-image or inpainting folder."""

    diffusers_class_name = "StableDiffusionInpaintPipeline"
    _callback_tensor_inputs = [*ImageConditionedBase._callback_tensor_inputs, "mask", "masked_image_latents"]

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """diffusers' mask processor: grayscale, not normalized, binarized at 0.5 (white = repaint)."""
        if getattr(self, "_mask_processor", None) is None:
            self._mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                     do_binarize=True, do_convert_grayscale=True)
        return self._mask_processor

    # ---- checks -------------------------------------------------------------------------------------
    def check_inputs(self, prompt, image, mask_image, height, width, strength, callback_steps=None,
                     output_type="pil", negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                     ip_adapter_image=None, ip_adapter_image_embeds=None, callback_on_step_end_tensor_inputs=None,
                     padding_mask_crop=None, **common):
        """diffusers' signature, plus the keyword-only text-to-image checks (``common``)."""
        check_strength(strength)
        self._check_image(image)
        self._check_image(mask_image, "mask_image")
        if padding_mask_crop is not None:
            if not isinstance(image, PIL.Image.Image) or not isinstance(mask_image, PIL.Image.Image):
                raise ValueError("`padding_mask_crop` needs `image` and `mask_image` as single PIL images, got "
                                 f"{type(image).__name__} and {type(mask_image).__name__}")
            if output_type != "pil":
                raise ValueError(f"`padding_mask_crop` pastes the result back into the image: use "
                                 f"output_type='pil', not {output_type!r}")
        in_channels, c = self.unet.config.in_channels, self.vae.config.latent_channels
        if in_channels not in (c, 2 * c + 1):
            raise ValueError(f"the UNet has {in_channels} input channels: inpainting needs a plain UNet ({c}) or an "
                             f"inpainting UNet ({2 * c + 1}: latents, mask, masked-image latents)")
        self._check_common(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                           ip_adapter_image, ip_adapter_image_embeds, callback_on_step_end_tensor_inputs,
                           output_type=output_type, **common)

    # ---- latents, mask and masked image --------------------------------------------------------------
    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator,
                        latents=None, image=None, timestep=None, is_strength_max=True, return_noise=False,
                        return_image_latents=False, *, num_images_per_prompt: int = 1):
        """diffusers' signature and draws: noise (strength 1, or the given ``latents``) or the image's latents
        noised to ``timestep``; returns ``(latents[, noise][, image_latents])``."""
        shape = (batch_size, num_channels_latents, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size} images: pass one per image")
        if (image is None or timestep is None) and not is_strength_max:
            raise ValueError("strength < 1 starts from the noised image: pass `image` and `timestep`")
        image_latents = None
        if return_image_latents or (latents is None and not is_strength_max):
            image_latents = encode_image_latents(self.vae, image, generator).to(device=device, dtype=dtype)
            image_latents = expand_batch(image_latents, batch_size, num_images_per_prompt, "images")
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = noise * self.scheduler.init_noise_sigma if is_strength_max else \
                self.scheduler.add_noise(image_latents, noise, timestep)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
            noise = latents.to(device=device, dtype=dtype)
            latents = noise * self.scheduler.init_noise_sigma
        return (latents, *((noise,) if return_noise else ()), *((image_latents,) if return_image_latents else ()))

    def prepare_mask_latents(self, mask, masked_image, batch_size, height, width, dtype, device, generator,
                             do_classifier_free_guidance, *, num_images_per_prompt: int = 1):
        """diffusers' signature: the mask at latent size and the masked image's latents, ``batch_size`` rows each
        (doubled under guidance)."""
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        mask = F.interpolate(mask, size=size).to(device=device, dtype=dtype)
        masked = encode_image_latents(self.vae, masked_image.to(device), generator).to(device=device, dtype=dtype)
        if masked.shape[-2:] != size:
            raise ValueError(f"`masked_image_latents` are {tuple(masked.shape[-2:])}, the latents {size}: pass latents "
                             f"of {height}x{width} pixels, or leave them out")
        mask = expand_batch(mask, batch_size, num_images_per_prompt, "masks")
        masked = expand_batch(masked, batch_size, num_images_per_prompt, "masked images")
        double = (lambda x: torch.cat([x] * 2)) if do_classifier_free_guidance else (lambda x: x)  # noqa: E731
        return double(mask), double(masked)

    # ---- the loop's hooks -----------------------------------------------------------------------------
    @staticmethod
    def concat_mask(x, t, state) -> torch.Tensor:
        """9-channel UNets: the scaled latents, the mask and the masked image's latents along channels."""
        n = x.shape[0]  # guidance switched off by a callback keeps the conditional half
        return torch.cat([x, state["mask"][-n:], state["masked_image_latents"][-n:]], dim=1)

    def blend_known_region(self, image_latents, noise, timesteps):
        """4-channel UNets: after step i, outside the mask, the init latents noised to timestep i + 1 (clean
        after the last step), as diffusers does."""
        last = len(timesteps) - 1

        def after_step(i, t, state):
            latents = state["latents"]
            known = image_latents if i == last else \
                self.scheduler.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
            mask = state["mask"][:latents.shape[0]]  # the unconditional half under guidance: same rows
            return (1 - mask) * known + mask * latents

        return after_step

    # ---- the call -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, mask_image=None,
                 masked_image_latents: torch.Tensor | None = None, height: int | None = None,
                 width: int | None = None, padding_mask_crop: int | None = None, strength: float = 1.0,
                 num_inference_steps: int | None = 50, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
                 return_dict: bool = True, cross_attention_kwargs: dict[str, Any] | None = None,
                 clip_skip: int | None = None,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), *, guidance_rescale: float = 0.0,
                 long_prompts: bool = False, prompt_weighting: bool = False, **kwargs):
        """diffusers' ``StableDiffusionInpaintPipeline.__call__`` arguments, in its order: ``mask_image`` white
        (≥ 0.5) where the image is repainted; ``masked_image_latents`` replace the encoded masked image;
        ``padding_mask_crop`` inpaints a crop around the mask (PIL in and out) and pastes it back.
        Keyword-only, as in ``LatentDiffusionPipeline``: ``guidance_rescale``, ``long_prompts``, ``prompt_weighting``.
        """
        self._check_call_kwargs(kwargs)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height, width = self.default_size(height, width)
        self.check_inputs(prompt, image, mask_image, height, width, strength, None, output_type, negative_prompt,
                          prompt_embeds, negative_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
                          callback_on_step_end_tensor_inputs, padding_mask_crop,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          num_images_per_prompt=num_images_per_prompt, timesteps=timesteps, sigmas=sigmas)
        self._begin_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)

        cond = self.prepare_conditioning(prompt, negative_prompt, num_images_per_prompt, prompt_embeds,
                                         negative_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
                                         long_prompts, prompt_weighting)
        n, device, dtype = cond.prompt_embeds.shape[0], self._execution_device, self.unet.dtype
        timesteps = self.prepare_strength_timesteps(num_inference_steps, timesteps, sigmas, strength)

        crops = None if padding_mask_crop is None else \
            self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
        resize = {"height": height, "width": width, "crops_coords": crops,
                  "resize_mode": "default" if crops is None else "fill"}
        init_image = self.image_processor.preprocess(image, **resize).to(dtype=torch.float32)
        plain_unet = self.unet.config.in_channels == self.vae.config.latent_channels
        latents, noise, *image_latents = self.prepare_latents(
            n, self.vae.config.latent_channels, height, width, dtype, device, generator, latents, init_image,
            timesteps[:1].repeat(n), strength == 1.0, True, plain_unet, num_images_per_prompt=num_images_per_prompt)
        mask_condition = self.mask_processor.preprocess(mask_image, **resize)
        masked = init_image * (mask_condition < 0.5) if masked_image_latents is None else masked_image_latents
        mask, masked_image_latents = self.prepare_mask_latents(
            mask_condition, masked, n, height, width, dtype, device, generator, self.do_classifier_free_guidance,
            num_images_per_prompt=num_images_per_prompt)

        hooks = {"after_step": self.blend_known_region(image_latents[0], noise, timesteps)} if plain_unet else \
            {"model_input": self.concat_mask}
        latents = self.denoise(latents, timesteps, cond, self.prepare_extra_step_kwargs(generator, eta),
                               callback_on_step_end, callback_on_step_end_tensor_inputs,
                               extra_state={"mask": mask, "masked_image_latents": masked_image_latents}, **hooks)
        images, nsfw = self.latents_to_images(latents, output_type, generator)
        if crops is not None:
            images = [self.image_processor.apply_overlay(mask_image, image, i, crops) for i in images]
        self.maybe_free_model_hooks()
        return LatentDiffusionPipelineOutput(images, nsfw) if return_dict else (images, nsfw)
