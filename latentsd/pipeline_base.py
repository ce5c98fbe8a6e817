"""The parts every latentsd pipeline shares: loading and saving, prompt and image conditioning, timesteps,
latents, the denoising loop and decoding. ``LatentDiffusionPipeline`` (text to image) is this plus ``__call__``;
image-to-image and inpainting pipelines reuse the same parts and loop through its hooks.

diffusers' mixins give FreeU, fused QKV, LoRA, textual inversion and IP-Adapter loading; diffusers' own helpers
(``retrieve_timesteps``, ``rescale_noise_cfg``, the IP-Adapter and safety-checker methods) are used as they
are, so the numbers equal ``StableDiffusionPipeline``'s. The loop is ours: no host syncs, shapes fixed per call.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import IPAdapterMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg, retrieve_timesteps
from diffusers.utils import USE_PEFT_BACKEND, logging, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor

from .latents import decode
from .errors import UserError
from .models import as_our_scheduler, check_model_folder, load_errors, weights_kwargs
from .text import PromptEncoder

logger = logging.get_logger(__name__)
Hook = Callable[..., torch.Tensor]


@dataclass
class LatentDiffusionPipelineOutput(StableDiffusionPipelineOutput):
    """``images`` (PIL list, ``[N, H, W, 3]`` array or tensor, per ``output_type``) and, when a safety checker
    ran, ``nsfw_content_detected`` (one bool per image; None otherwise)."""

    nsfw_content_detected: list[bool] | None = None


@dataclass
class Conditioning:
    """What the UNet is conditioned on, fixed for one call. Embeddings are ``[N, L, D]`` (N images);
    ``attention_mask`` is ``[N or 2N, L]`` in the UNet's batch order (negatives first), or None (no padding)."""

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    added_cond_kwargs: dict | None = None  # IP-Adapter image embeddings
    timestep_cond: torch.Tensor | None = None  # guidance embedding of guidance-distilled (LCM) UNets


def find_nonfinite_images(image: torch.Tensor) -> list[int]:
    """Indices of the decoded images holding NaN/inf, with a warning (postprocessing would turn them black)."""
    bad = (~torch.isfinite(image).flatten(1).all(1)).nonzero().flatten().tolist()
    if bad:
        logger.warning(f"image(s) {bad} of {len(image)} have NaN/inf pixels and come out black: the model's weights "
                       "are NaN/inf (a diverged training run?) or the computation overflowed (fp16: try fp32)")
    return bad


def as_list(prompt: str | list[str] | None, n: int) -> list[str]:
    """A prompt / negative prompt as one string per image of the batch (None → ``""``)."""
    return list(prompt) if isinstance(prompt, list) else [prompt or ""] * n


def pair_mask(mask, negative_mask, embeds, negative_embeds) -> torch.Tensor | None:
    """The UNet's ``encoder_attention_mask`` for ``cat([negative, cond])`` (or cond alone): None when nothing is
    masked; a side without a mask (embeddings passed in) attends to every position."""
    if mask is None and negative_mask is None:
        return None
    ones = lambda e: torch.ones(e.shape[:2], dtype=torch.long, device=e.device)  # noqa: E731
    mask = ones(embeds) if mask is None else mask
    if negative_embeds is None:
        return mask
    return torch.cat([ones(negative_embeds) if negative_mask is None else negative_mask, mask])


class LatentDiffusionBase(DiffusionPipeline, StableDiffusionMixin, TextualInversionLoaderMixin,
                          StableDiffusionLoraLoaderMixin, IPAdapterMixin):
    """vae, text_encoder, tokenizer, unet, scheduler, plus diffusers' optional safety_checker, feature_extractor
    (the safety checker's image processor, also IP-Adapter's) and image_encoder (IP-Adapter)."""

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _exclude_from_cpu_offload = ["safety_checker"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    diffusers_class_name = "StableDiffusionPipeline"  # what model_index.json names, so diffusers loads our folders

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: UNet2DConditionModel, scheduler,
                 safety_checker=None, feature_extractor=None, image_encoder=None,
                 requires_safety_checker: bool = False):
        super().__init__()
        if safety_checker is not None and feature_extractor is None:
            raise ValueError("a `safety_checker` needs its `feature_extractor` (a CLIPImageProcessor): pass both, "
                             "or `safety_checker=None`")
        if safety_checker is None and requires_safety_checker:
            logger.warning("this model asks for a safety checker (requires_safety_checker) and none is loaded: "
                           "its images are not filtered")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              safety_checker=safety_checker, feature_extractor=feature_extractor,
                              image_encoder=image_encoder)
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ---- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, allow_pickle: bool = False, **kwargs):
        """Load a diffusers-layout folder or hub id; diffusers' DDPM/DDIM become ours, others stay as they are.

        Safetensors weights only, unless ``allow_pickle=True`` (then ``.bin`` too, read with
        ``torch.load(weights_only=True)``). ``~`` is expanded; a local-looking path that does not exist is an error
        naming it, never a hub lookup (:mod:`latentsd.paths`)."""
        if kwargs.get("use_safetensors") is False and not allow_pickle:
            raise UserError("use_safetensors=False loads pickled .bin weights: pass allow_pickle=True too (only for "
                            "files you trust)")
        src = check_model_folder(str(pretrained_model_name_or_path), allow_pickle)
        with load_errors(src):
            pipe = super().from_pretrained(src, **{**weights_kwargs(allow_pickle), **kwargs})
        pipe.scheduler = as_our_scheduler(pipe.scheduler)
        return pipe

    @classmethod
    def from_single_file(cls, path, **kwargs):
        """Load an SD-1.x/2.x LDM single file (A1111 / ComfyUI ``.safetensors``) offline: ``latentsd.single_file``."""
        from .single_file import load_single_file

        return load_single_file(Path(path).expanduser(), pipeline_class=cls, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Write a folder that diffusers' ``StableDiffusionPipeline.from_pretrained`` loads unchanged (optional
        components are kept when present)."""
        kwargs.setdefault("safe_serialization", True)
        super().save_pretrained(save_directory, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        # Our schedulers share diffusers' class names and configs, so diffusers can load its own twin.
        index.update(_class_name=self.diffusers_class_name, scheduler=["diffusers", type(self.scheduler).__name__])
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ---- per-call state, as diffusers' properties ---------------------------------------------------
    def _begin_call(self, guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs):
        self._guidance_scale, self._guidance_rescale = guidance_scale, guidance_rescale
        self._clip_skip, self._cross_attention_kwargs = clip_skip, cross_attention_kwargs
        self._interrupt, self._num_timesteps = False, 0

    guidance_scale = property(lambda self: self._guidance_scale)
    guidance_rescale = property(lambda self: self._guidance_rescale)
    clip_skip = property(lambda self: self._clip_skip)
    cross_attention_kwargs = property(lambda self: self._cross_attention_kwargs)
    num_timesteps = property(lambda self: self._num_timesteps)
    interrupt = property(lambda self: self._interrupt)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """``guidance_scale > 1`` (1 = plain conditional sampling), never for guidance-distilled (LCM) UNets."""
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    def default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        size = self.unet.config.sample_size
        size_h, size_w = (size, size) if isinstance(size, int) else size
        # None (not 0, unlike diffusers' `height or ...`) means the native size: 0 is an error in check_inputs
        return (size_h * self.vae_scale_factor if height is None else height,
                size_w * self.vae_scale_factor if width is None else width)

    # diffusers' own methods, used as they are (they only read components this class has)
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds
    run_safety_checker = StableDiffusionPipeline.run_safety_checker
    prepare_extra_step_kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs
    get_guidance_scale_embedding = StableDiffusionPipeline.get_guidance_scale_embedding

    # ---- prompts ------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, device=None, num_images_per_prompt: int = 1, do_classifier_free_guidance=True,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                      lora_scale: float | None = None, clip_skip: int | None = None, *, long_prompts: bool = False,
                      prompt_weighting: bool = False):
        """diffusers' ``encode_prompt``: ``(prompt_embeds, negative_prompt_embeds)``, each repeated
        ``num_images_per_prompt`` times (negatives None without guidance), on ``device`` in the UNet's dtype.
        ``long_prompts`` / ``prompt_weighting`` as in ``__call__`` (the padding mask is left out: see
        :meth:`encode_text`)."""
        text = self.encode_text(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
                                prompt_embeds, negative_prompt_embeds, lora_scale, clip_skip, long_prompts,
                                prompt_weighting)
        return text.prompt_embeds, text.negative_prompt_embeds

    def encode_text(self, prompt, device, num_images_per_prompt, guidance, negative_prompt=None, prompt_embeds=None,
                    negative_prompt_embeds=None, lora_scale=None, clip_skip=None, long_prompts=False,
                    prompt_weighting=False) -> Conditioning:
        """Prompt and negative embeddings plus the UNet's attention mask over padding chunks (long prompts).

        Prompt and negatives are encoded in one call, so their chunk counts agree. As in diffusers,
        ``negative_prompt`` (default ``""``) is encoded also when ``prompt_embeds`` are given, at their length.
        """
        device = device or self._execution_device
        with self._text_encoder_lora_scale(lora_scale):
            embeds, mask, negative, negative_mask = self._embed_prompts(
                prompt, negative_prompt, prompt_embeds, negative_prompt_embeds if guidance else None, guidance,
                PromptEncoder(self.tokenizer, self.text_encoder, device=device),
                {"clip_skip": clip_skip, "long_prompts": long_prompts, "weighting": prompt_weighting})
        if guidance and negative.shape != embeds.shape:
            raise ValueError(f"negative embeddings {tuple(negative.shape)} and prompt embeddings {tuple(embeds.shape)} "
                             "differ: pass `negative_prompt_embeds` of the prompts' shape, or a `negative_prompt`")

        def repeat(x, dtype):
            return None if x is None else x.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, 0)

        embeds, mask = repeat(embeds, self.unet.dtype), repeat(mask, torch.long)
        negative, negative_mask = (repeat(negative, self.unet.dtype), repeat(negative_mask, torch.long)) \
            if guidance else (None, None)
        return Conditioning(embeds, negative, pair_mask(mask, negative_mask, embeds, negative))

    def _embed_prompts(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, guidance, encoder, opts):
        n = prompt_embeds.shape[0] if prompt is None else (1 if isinstance(prompt, str) else len(prompt))
        want_negative = guidance and negative_prompt_embeds is None
        negatives = as_list(negative_prompt, n) if want_negative else []
        mask = negative_mask = None
        if prompt_embeds is None:  # one call for both halves: one chunk count
            texts = self.maybe_convert_prompt(as_list(prompt, n) + negatives, self.tokenizer)
            both, both_mask = encoder.encode(texts, **opts)
            prompt_embeds, mask = both[:n], None if both_mask is None else both_mask[:n]
            if want_negative:
                negative_prompt_embeds, negative_mask = both[n:], None if both_mask is None else both_mask[n:]
        elif want_negative:
            chunks, rest = divmod(prompt_embeds.shape[1], encoder.window)
            if rest or not chunks:
                raise ValueError(f"`prompt_embeds` has {prompt_embeds.shape[1]} tokens, not a multiple of the text "
                                 f"encoder's {encoder.window}: pass `negative_prompt_embeds` of the same shape too")
            chunked = opts["long_prompts"] or chunks > 1
            negative_prompt_embeds, negative_mask = encoder.encode(
                self.maybe_convert_prompt(negatives, self.tokenizer),
                **{**opts, "long_prompts": chunked, "num_chunks": chunks if chunked else None})
        return prompt_embeds, mask, negative_prompt_embeds, negative_mask

    @contextmanager
    def _text_encoder_lora_scale(self, lora_scale: float | None):
        """diffusers' LoRA scale on the text encoder's PEFT layers for the duration of the encoding."""
        scaled = lora_scale is not None and USE_PEFT_BACKEND and self.text_encoder is not None
        if lora_scale is not None:
            self._lora_scale = lora_scale
        if scaled:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            yield
        finally:
            if scaled:
                unscale_lora_layers(self.text_encoder, lora_scale)

    # ---- the rest of the conditioning, timesteps, latents -------------------------------------------
    def prepare_conditioning(self, prompt, negative_prompt, num_images_per_prompt, prompt_embeds=None,
                             negative_prompt_embeds=None, ip_adapter_image=None, ip_adapter_image_embeds=None,
                             long_prompts=False, prompt_weighting=False) -> Conditioning:
        """Text embeddings (+ mask), IP-Adapter image embeddings, and the guidance embedding of LCM UNets."""
        device, guidance = self._execution_device, self.do_classifier_free_guidance
        lora_scale = (self.cross_attention_kwargs or {}).get("scale")
        cond = self.encode_text(prompt, device, num_images_per_prompt, guidance, negative_prompt, prompt_embeds,
                                negative_prompt_embeds, lora_scale, self.clip_skip, long_prompts, prompt_weighting)
        n = cond.prompt_embeds.shape[0]
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                                                n, guidance)
            cond.added_cond_kwargs = {"image_embeds": image_embeds}
        if self.unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(self.guidance_scale - 1).repeat(n)
            cond.timestep_cond = self.get_guidance_scale_embedding(
                w, embedding_dim=self.unet.config.time_cond_proj_dim).to(device=device, dtype=self.unet.dtype)
        return cond

    def prepare_timesteps(self, num_inference_steps, timesteps=None, sigmas=None) -> torch.Tensor:
        """diffusers' ``retrieve_timesteps``: a step count, or custom ``timesteps`` / ``sigmas`` (e.g. AYS)."""
        steps = None if timesteps is not None or sigmas is not None else num_inference_steps
        timesteps, _ = retrieve_timesteps(self.scheduler, steps, self._execution_device, timesteps, sigmas)
        self._num_timesteps = len(timesteps)
        return timesteps

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator,
                        latents=None):
        """diffusers' signature: initial noise (or the given ``latents``) times the scheduler's ``init_noise_sigma``."""
        shape = (batch_size, num_channels_latents, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size} images: pass one per image")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    # ---- the loop -----------------------------------------------------------------------------------
    def denoise(self, latents, timesteps, cond: Conditioning, extra_step_kwargs: dict,
                callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                model_input: Hook | None = None, after_step: Hook | None = None,
                extra_state: dict | None = None) -> torch.Tensor:
        """Run the scheduler from ``latents`` over ``timesteps``; returns the final latents.

        The loop's variables live in ``state`` (``latents``, ``prompt_embeds`` as the UNet sees them, i.e.
        ``cat([negative, cond])`` under guidance, ``negative_prompt_embeds``, plus ``extra_state``); a callback sees
        and may replace those named in ``callback_on_step_end_tensor_inputs``. Hooks for other pipelines:
        ``model_input(x, t, state)`` edits the scaled UNet input (inpainting's extra channels) and
        ``after_step(i, t, state)`` returns the stepped latents to keep (inpainting's blending).
        """
        embeds, negative = cond.prompt_embeds, cond.negative_prompt_embeds
        state = {"latents": latents, "prompt_embeds": embeds if negative is None else torch.cat([negative, embeds]),
                 "negative_prompt_embeds": negative, **(extra_state or {})}
        if hasattr(self.denoise_step, "begin"):  # the fast mode's compiled step: once per call, not per step
            self.denoise_step.begin(extra_step_kwargs)
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                break
            state["latents"] = self.denoise_step(state, t, cond, extra_step_kwargs, model_input)
            if after_step is not None:
                state["latents"] = after_step(i, t, state)
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, t, {k: state[k] for k in callback_on_step_end_tensor_inputs})
                state.update({k: v for k, v in out.items() if k in state})
        return state["latents"]

    def denoise_step(self, state: dict, t, cond: Conditioning, extra_step_kwargs: dict,
                     model_input: Hook | None = None) -> torch.Tensor:
        """One step: the guided noise prediction, then the scheduler's step; returns the new latents.
        :meth:`optimize` replaces it with one compiled graph."""
        noise_pred = self.predict_noise(state, t, cond, model_input)
        return self.scheduler.step(noise_pred, t, state["latents"], **extra_step_kwargs, return_dict=False)[0]

    def optimize(self, **options):
        """Opt-in fast mode (``latentsd.fast.optimize``): the denoising step compiled as one graph, plus what pays on
        the device (CPU: frozen weights, inductor's C++ wrapper; CUDA: CUDA graphs, channels_last, fused QKV, the VAE
        decoder compiled); compile artefacts cached between processes. Returns the pipeline."""
        from .fast import optimize

        return optimize(self, **options)

    def predict_noise(self, state: dict, t, cond: Conditioning, model_input: Hook | None = None) -> torch.Tensor:
        """The guided noise prediction for one step (guidance read each step: a callback may change it)."""
        latents, embeds = state["latents"], state["prompt_embeds"]
        guided = self.do_classifier_free_guidance
        x = torch.cat([latents] * 2) if guided else latents
        x = self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x
        x = model_input(x, t, state) if model_input is not None else x
        mask = cond.attention_mask
        mask = None if mask is None else mask[-embeds.shape[0]:]  # guidance turned off mid-call keeps the cond half
        noise_pred = self.unet(x, t, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                               timestep_cond=cond.timestep_cond, cross_attention_kwargs=self.cross_attention_kwargs,
                               added_cond_kwargs=cond.added_cond_kwargs, return_dict=False)[0]
        if not guided:
            return noise_pred
        pred_uncond, pred_cond = noise_pred.chunk(2)
        noise_pred = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        if self.guidance_rescale > 0:
            noise_pred = rescale_noise_cfg(noise_pred, pred_cond, guidance_rescale=self.guidance_rescale)
        return noise_pred

    # ---- latents → images ---------------------------------------------------------------------------
    @property
    def nonfinite_images(self) -> list[int]:
        """Indices of the last call's images with NaN/inf pixels (warned about; they come out black)."""
        return getattr(self, "_nonfinite_images", [])

    def latents_to_images(self, latents, output_type: str, generator=None) -> tuple[Any, list[bool] | None]:
        """Decode, run the safety checker when there is one (flagged images come back black), postprocess."""
        self._nonfinite_images = []
        if output_type == "latent":
            return latents, None
        image = decode(self.vae, latents, generator=generator)
        self._nonfinite_images = find_nonfinite_images(image)  # one host sync, after the loop
        checker_dtype = self.safety_checker.dtype if self.safety_checker is not None else None
        image, nsfw = self.run_safety_checker(image, self._execution_device, checker_dtype)
        denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), nsfw
