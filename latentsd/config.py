"""Typed training configuration: nested dataclasses loaded from YAML + dotted overrides.

Every key is declared exactly once, as a dataclass field with a default and a
``help`` string (see :func:`opt`).  The loader is generic: it walks the type
annotations, so adding a new section is one dataclass plus one line in
:class:`TrainConfig` (``ema: EMAConfig = section(EMAConfig, "...")``).

Typical use::

    cfg = load_config("configs/train/tiny.yaml", ["optim.learning_rate=3e-4", "data.dataset=data/x"])
    save_config(cfg, out_dir / "config.yaml")   # reloading gives an equal config

Errors are :class:`ConfigError` (a ``ValueError``) and always name the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import UserError
from .resources import shipped_config, shipped_configs

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "ExportConfig",
    "EMAConfig",
    "LoRAConfig",
    "LossConfig",
    "CacheConfig",
    "ValidationConfig",
    "DreamBoothConfig",
    "TextualInversionConfig",
    "TrainConfig",
    "LR_SCHEDULERS",
    "OPTIMIZERS",
    "REPORT_TO",
    "opt",
    "section",
    "load_config",
    "parse_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "save_config",
    "config_help",
]


class ConfigError(UserError):
    """A config file, dict or override is invalid; the message names the dotted key and the fix."""


# --------------------------------------------------------------------------- field helpers


def opt(default: Any, help: str, path: bool = False) -> Any:
    """Declare a config field with a default and a one-line help string (shown by :func:`config_help`).

    ``path=True``: the value is a filesystem path (or hub id); a leading ``~`` is expanded when it is loaded."""
    metadata = {"help": help, "path": path}
    if isinstance(default, (list, dict, set)):
        # mutable defaults must be copied per instance
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    """Declare a nested config section (a dataclass with all-default fields)."""
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------- sections

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
"""Names accepted by ``diffusers.optimization.get_scheduler`` that need no extra arguments."""

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "schedulefree_adamw", "adafactor", "lion")
"""Values of ``optim.optimizer`` (built by ``latentsd.training.optimizers.build_optimizer``)."""

REPORT_TO = ("none", "all", "tensorboard", "wandb", "trackio", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab")
"""Values accepted for ``report_to`` ("none" disables tracking; the rest are accelerate trackers)."""


@dataclass
class ModelConfig:
    """What to train: a pretrained diffusers folder/hub id, or a model config to build from scratch."""

    pretrained: str = opt("", "diffusers-layout folder or hub id; empty = build from `config`", path=True)
    config: str = opt("tiny", "model config name (latentsd/configs/models/, shipped in the package) or a YAML path (used when pretrained is empty)", path=True)
    revision: Optional[str] = opt(None, "hub revision (branch, tag or commit) of `pretrained`")
    variant: Optional[str] = opt(None, "weights variant of `pretrained`, e.g. fp16")
    train_text_encoder: bool = opt(False, "also train the text encoder (otherwise frozen)")
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the UNet (and text encoder)")
    attention: Literal["sdpa", "xformers", "math"] = opt(
        "sdpa", "UNet attention: torch SDPA, xformers, or math (batched matmuls and a softmax: on a CPU under bf16 "
        "autocast faster than SDPA's flash kernel for small heads, and fused by optim.compile)")
    prediction_type: Optional[Literal["epsilon", "v_prediction", "sample"]] = opt(
        None, "training target; null = follow the noise scheduler config"
    )
    vae: str = opt("", "diffusers AutoencoderKL folder (or a model folder with vae/) replacing the model's VAE", path=True)
    allow_pickle: bool = opt(False, "also read pickled .bin weights of `pretrained` / `vae` (torch.load(weights_only=True)); trusted files only")

    def check(self):
        if self.config.strip() == "" and self.pretrained.strip() == "":
            yield "config", "is empty and model.pretrained is empty: set one of them (e.g. model.config=tiny)"


@dataclass
class DataConfig:
    """Where the image/caption pairs come from and how they are augmented."""

    dataset: str = opt("", "hub id, local imagefolder dir, or a local .parquet/.arrow/.csv/.json/.jsonl file", path=True)
    split: str = opt("train", "dataset split to train on")
    image_column: Optional[str] = opt(None, "image column; null = auto-detect")
    caption_column: Optional[str] = opt(None, "caption column (string or list of strings); null = auto-detect")
    resolution: int = opt(512, "square training resolution in pixels (multiple of 8)")
    center_crop: bool = opt(True, "center crop after resizing; false = random crop")
    random_flip: bool = opt(False, "random horizontal flip with p=0.5")
    caption_dropout: float = opt(0.0, "probability of replacing the caption by '' (for classifier-free guidance)")
    streaming: bool = opt(False, "stream the dataset instead of loading/caching it")
    max_samples: Optional[int] = opt(None, "use only the first N samples; null = all")
    num_workers: int = opt(0, "DataLoader worker processes")
    shuffle: bool = opt(True, "shuffle samples every epoch")
    buckets: bool = opt(False, "aspect-ratio bucketing: batch images of similar aspect at ~resolution² pixels, uncropped")
    bucket_step: int = opt(64, "bucket sides are multiples of this many pixels")
    bucket_max_aspect: float = opt(2.0, "widest/tallest bucket aspect ratio")
    missing_caption: Literal["empty", "error"] = opt(
        "empty", "a row without a caption: 'empty' trains it with '' (counted, warned once), 'error' stops and names the rows")
    shuffle_tags: bool = opt(False, "split captions into tags at tag_separator and shuffle them per sample (the first keep_tokens stay first)")
    keep_tokens: int = opt(0, "leading tags never shuffled nor dropped (e.g. the instance token)")
    tag_separator: str = opt(",", "separator of a caption's tags (joined back with it and a space)")
    tag_dropout: float = opt(0.0, "probability of dropping each tag (not the kept ones) per sample")
    caption_template: str = opt("{caption}", "the trained caption: {caption} (after tags) and {instance} in a text, e.g. 'a photo of {caption}'")
    instance_token: str = opt("", "what {instance} in caption_template stands for, e.g. sks")
    mask_column: Optional[str] = opt(None, "column of per-image loss masks (grayscale: white = train, black = not; the image's size); null = none")
    mask_from_alpha: bool = opt(False, "use each image's alpha channel as its loss mask (no alpha = all trained)")

    def check(self):
        if not self.dataset.strip():
            yield "dataset", "is empty: set it in the YAML or pass data.dataset=PATH_OR_HUB_ID"
        if self.resolution < 8 or self.resolution % 8:
            fix = max(8, round(self.resolution / 8) * 8)
            yield "resolution", f"must be a positive multiple of 8 (the VAE downsamples by 8), got {self.resolution}; e.g. {fix}"
        if not 0.0 <= self.caption_dropout <= 1.0:
            yield "caption_dropout", f"must be in [0, 1], got {self.caption_dropout}"
        if self.max_samples is not None and self.max_samples < 1:
            yield "max_samples", f"must be >= 1 or null (all samples), got {self.max_samples}"
        if self.num_workers < 0:
            yield "num_workers", f"must be >= 0, got {self.num_workers}"
        yield from self._check_captions_and_masks()

    def _check_captions_and_masks(self):
        from .data.captions import template_problems

        if self.keep_tokens < 0:
            yield "keep_tokens", f"must be >= 0, got {self.keep_tokens}"
        if not 0.0 <= self.tag_dropout <= 1.0:
            yield "tag_dropout", f"must be in [0, 1], got {self.tag_dropout}"
        if not self.tag_separator:
            yield "tag_separator", "is empty: use e.g. ','"
        for problem in template_problems(self.caption_template, self.instance_token):
            yield "caption_template", problem
        if self.mask_column is not None and self.mask_from_alpha:
            yield "mask_column", "and data.mask_from_alpha are both set: masks come from one of them"


@dataclass
class OptimConfig:
    """AdamW optimizer, LR schedule and batch geometry (defaults follow diffusers' train_text_to_image)."""

    learning_rate: float = opt(1e-4, "peak learning rate (per total batch unless scale_lr)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_weight_decay: float = opt(1e-2, "AdamW decoupled weight decay")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this value")
    lr_scheduler: Literal[LR_SCHEDULERS] = opt("constant", "diffusers.optimization.get_scheduler name")
    lr_warmup_steps: int = opt(0, "linear warmup steps (optimizer steps)")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    scale_lr: bool = opt(False, "multiply learning_rate by batch size * accumulation * processes")
    train_batch_size: int = opt(1, "batch size per process (per GPU)")
    use_8bit_adam: bool = opt(False, "bitsandbytes 8-bit AdamW (needs bitsandbytes + CUDA)")
    optimizer: Literal[OPTIMIZERS] = opt("adamw", "adamw, adamw8bit (bitsandbytes), prodigy (prodigyopt; learning_rate "
                                                  "1.0), schedulefree_adamw (schedulefree; constant LR schedule), "
                                                  "adafactor (transformers) or lion (lion-pytorch)")
    optimizer_args: dict = opt({}, "extra keyword arguments for the optimizer, e.g. {d_coef: 2.0} for prodigy")
    max_nonfinite_steps: int = opt(5, "stop the run (naming the last good checkpoint) after this many optimizer steps "
                                      "in a row with a NaN/inf loss or gradient norm; each is skipped (0: never stop)")
    compile: bool = opt(False, "torch.compile the UNet (forward and backward); the first steps compile it (shapes "
                               "model on a CPU: 1.5-2 minutes; pays there with model.attention=math, most under bf16)")
    compile_backend: str = opt("inductor", "torch.compile backend (aot_eager: graph capture without code generation)")
    channels_last: bool = opt(False, "UNet weights and activations in channels-last memory format (GPU convolutions; "
                                     "no gain on CPU)")

    def check(self):
        if self.learning_rate <= 0:
            yield "learning_rate", f"must be > 0, got {self.learning_rate}"
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                yield name, f"must be in [0, 1), got {getattr(self, name)}"
        if self.adam_weight_decay < 0:
            yield "adam_weight_decay", f"must be >= 0, got {self.adam_weight_decay}"
        if self.adam_epsilon <= 0:
            yield "adam_epsilon", f"must be > 0, got {self.adam_epsilon}"
        if self.max_grad_norm <= 0:
            yield "max_grad_norm", f"must be > 0, got {self.max_grad_norm}"
        if self.max_nonfinite_steps < 0:
            yield "max_nonfinite_steps", f"must be >= 0 (0: never stop), got {self.max_nonfinite_steps}"
        if self.lr_warmup_steps < 0:
            yield "lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}"
        if self.gradient_accumulation_steps < 1:
            yield "gradient_accumulation_steps", f"must be >= 1, got {self.gradient_accumulation_steps}"
        if self.train_batch_size < 1:
            yield "train_batch_size", f"must be >= 1, got {self.train_batch_size}"
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw8bit"):
            yield "use_8bit_adam", (f"is the older name of optimizer=adamw8bit and contradicts optimizer="
                                    f"{self.optimizer}: drop optim.use_8bit_adam")
        if self.optimizer == "schedulefree_adamw" and self.lr_scheduler not in ("constant", "constant_with_warmup"):
            yield "lr_scheduler", (f"is {self.lr_scheduler!r}, but schedule-free AdamW replaces the LR schedule (it "
                                   "warms up over lr_warmup_steps itself): set optim.lr_scheduler=constant")


@dataclass
class ExportConfig:
    """Diffusers-layout pipeline export."""

    every_checkpoint: bool = opt(False, "also export a diffusers pipeline next to every checkpoint")
    dtype: Literal["fp32", "fp16", "bf16"] = opt("fp32", "weight dtype of the final export")
    single_file: bool = opt(False, "also write each export as one A1111/ComfyUI .safetensors file (model.safetensors beside model/)")


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights (used for validation and export when enabled)."""

    enabled: bool = opt(False, "keep an EMA copy of the trained weights")
    decay: float = opt(0.9999, "EMA decay (the cap when warmup is on)")
    warmup: bool = opt(True, "decay = min(decay, (1 + n) / (10 + n)) after n updates, so early EMA tracks the model")
    update_every: int = opt(1, "update the EMA every N optimizer steps")
    offload_to_cpu: bool = opt(False, "keep the EMA weights in CPU memory (saves GPU memory)")

    def check(self):
        if not 0.0 <= self.decay < 1.0:
            yield "decay", f"must be in [0, 1), got {self.decay}"
        if self.update_every < 1:
            yield "update_every", f"must be >= 1, got {self.update_every}"


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) instead of full fine-tuning."""

    enabled: bool = opt(False, "train LoRA adapters; the base weights stay frozen")
    variant: Literal["lora", "dora", "loha", "lokr"] = opt("lora", "adapter kind (peft): lora, dora (weight-decomposed LoRA), loha (Hadamard product), lokr (Kronecker product)")
    rank: int = opt(4, "adapter rank r")
    alpha: Optional[float] = opt(None, "scale numerator (effective scale alpha / rank); null = rank")
    dropout: float = opt(0.0, "dropout on the adapter input (lora and dora only)")
    target_modules: list = opt(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules to adapt (attention projections)")
    conv: bool = opt(False, "LoCon: also adapt the UNet's ResNet blocks and up/down samplers (conv1, conv2, conv_shortcut, time_emb_proj, sampler convs), as kohya's conv_dim does")
    conv_rank: Optional[int] = opt(None, "rank of the 3x3 conv adapters when `conv`; null = rank")
    conv_alpha: Optional[float] = opt(None, "alpha of the 3x3 conv adapters; null = the same scale alpha / rank as the others")
    text_encoder: bool = opt(False, "also adapt the text encoder")
    text_encoder_target_modules: list = opt(["q_proj", "k_proj", "v_proj", "out_proj"], "text encoder modules to adapt")

    def check(self):
        if self.rank < 1:
            yield "rank", f"must be >= 1, got {self.rank}"
        if self.conv_rank is not None and self.conv_rank < 1:
            yield "conv_rank", f"must be >= 1 or null, got {self.conv_rank}"
        if not 0.0 <= self.dropout < 1.0:
            yield "dropout", f"must be in [0, 1), got {self.dropout}"
        if self.dropout and self.variant in ("loha", "lokr"):
            yield "dropout", f"peft's {self.variant} has no input dropout: set lora.dropout=0 (or use lora/dora)"


@dataclass
class LossConfig:
    """Loss function and weighting, noise tricks and which timesteps are trained."""

    type: Literal["mse", "huber", "smooth_l1"] = opt("mse", "mse; huber: 2c(sqrt(r^2 + c^2) - c), MSE-like for small "
                                                             "errors r, L1-like for large; smooth_l1: the same / c")
    huber_c: float = opt(0.1, "pseudo-Huber c of huber / smooth_l1: the constant, or the value at t = T of a schedule")
    huber_schedule: Literal["constant", "exponential", "snr"] = opt(
        "snr", "c over timesteps (Khrapov et al. 2024): constant; exponential from 1 at t = 0 to huber_c at t = T; "
               "snr: (1 - huber_c) / (1 + sigma_t)^2 + huber_c")
    snr_gamma: Optional[float] = opt(None, "min-SNR-gamma weighting (Hang et al. 2023), e.g. 5; null = off")
    inverse_snr_max: Optional[float] = opt(None, "also weight by clamp(1/SNR, 1, this): more weight at high noise; null = off")
    debiased_estimation: bool = opt(False, "weight by 1/sqrt(SNR) (Yu et al. 2024; SNR clamped to [1e-3, 1000]), in "
                                           "epsilon terms like min-SNR: with v- or x0-targets converted once")
    noise_offset: float = opt(0.0, "add offset * N(0,1) per channel to the noise (brighter/darker images), e.g. 0.05")
    input_perturbation: float = opt(0.0, "perturb the noise fed to the model by this * N(0,1) (Ning et al. 2023), e.g. 0.1")
    timestep_min: int = opt(0, "smallest trained timestep (inclusive)")
    timestep_max: Optional[int] = opt(None, "largest trained timestep (exclusive); null = num_train_timesteps")
    high_noise_fraction: float = opt(0.0, "fraction of each batch drawn from [high_noise_start, timestep_max)")
    high_noise_start: int = opt(600, "start of the high-noise timestep range")
    zero_terminal_snr: bool = opt(False, "rescale betas to zero terminal SNR (Lin et al. 2023); use with v_prediction")
    unmasked_weight: float = opt(0.0, "loss weight outside the loss masks (data.mask_column / mask_from_alpha): 0 = ignore, 1 = no masking")

    def check(self):
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            yield "snr_gamma", f"must be > 0 or null, got {self.snr_gamma}"
        if self.inverse_snr_max is not None and self.inverse_snr_max < 1:
            yield "inverse_snr_max", f"must be >= 1 or null, got {self.inverse_snr_max}"
        if self.timestep_min < 0 or (self.timestep_max is not None and self.timestep_max <= self.timestep_min):
            yield "timestep_min", f"need 0 <= timestep_min < timestep_max, got {self.timestep_min}, {self.timestep_max}"
        if not 0.0 <= self.high_noise_fraction <= 1.0:
            yield "high_noise_fraction", f"must be in [0, 1], got {self.high_noise_fraction}"
        if not 0.0 <= self.unmasked_weight <= 1.0:
            yield "unmasked_weight", f"must be in [0, 1], got {self.unmasked_weight}"
        if self.huber_c <= 0 or (self.huber_schedule != "constant" and self.huber_c > 1):
            limit = "in (0, 1] (the schedule falls from 1 to huber_c)" if self.huber_schedule != "constant" else "> 0"
            yield "huber_c", f"must be {limit}, got {self.huber_c}"


@dataclass
class CacheConfig:
    """Precomputed VAE latents and text-encoder outputs, on disk in shards, keyed by content hashes."""

    latents: Union[bool, Literal["auto"]] = opt("auto", "cache VAE latents: auto = when the VAE is frozen and the data allows "
                                                        "(center crop, map-style, no loss masks); flips cached as a second variant")
    text: Union[bool, Literal["auto"]] = opt("auto", "cache text-encoder outputs: auto = when the text encoder is frozen and "
                                                     "the captions allow (map-style, no tag shuffling)")
    dir: str = opt("", "cache folder; empty = <output_dir>/cache (share it between runs to reuse entries)", path=True)
    shard_size: int = opt(1024, "entries per shard file")

    def check(self):
        if self.shard_size < 1:
            yield "shard_size", f"must be >= 1, got {self.shard_size}"


@dataclass
class ValidationConfig:
    """Images for fixed prompts and a deterministic held-out loss, every N steps."""

    every: int = opt(0, "validate every N optimizer steps (and at the end); 0 = off")
    prompts: list = opt([], "prompts to generate (a grid PNG per validation in <output_dir>/validation)")
    num_images_per_prompt: int = opt(1, "images per prompt")
    steps: int = opt(25, "sampling steps (DDIM)")
    guidance: float = opt(7.5, "classifier-free guidance scale")
    seed: int = opt(0, "seed of the validation images (fixed across validations)")
    holdout: int = opt(0, "samples held out of training for the validation loss; 0 = no validation loss")
    loss_timesteps: list = opt([100, 300, 500, 700, 900], "fixed timesteps of the validation loss")

    def check(self):
        if self.every < 0:
            yield "every", f"must be >= 0, got {self.every}"
        if self.num_images_per_prompt < 1 or self.steps < 1:
            yield "steps", "num_images_per_prompt and steps must be >= 1"
        if self.holdout < 0:
            yield "holdout", f"must be >= 0, got {self.holdout}"


@dataclass
class DreamBoothConfig:
    """DreamBooth: the instance images (data.dataset) learn an identifier; prior preservation trains class images
    the base model generated once (cached on disk) beside them, in the same batch."""

    enabled: bool = opt(False, "train DreamBooth on data.dataset (the instance images)")
    instance_prompt: str = opt("", "caption of every instance image, e.g. 'a photo of sks dog' (then data.dataset may "
                                   "be a folder of images only); empty = the dataset's own captions")
    class_prompt: Union[str, list] = opt("", "prompt (or list of prompts, cycled) of the class images, e.g. 'a photo of "
                                             "a dog'; empty = no prior preservation")
    num_class_images: int = opt(100, "class images generated with the base model and trained")
    prior_loss_weight: float = opt(1.0, "loss = instance MSE + this x class MSE (0 = no prior preservation)")
    class_data_dir: str = opt("", "class image cache: one subfolder per base model, class prompt and generation "
                                  "settings, reused across runs; empty = <cache dir>/class_images", path=True)
    class_steps: int = opt(25, "DDIM steps of the class images")
    class_guidance: float = opt(7.5, "guidance scale of the class images")
    class_seed: int = opt(0, "seed of the class images (image i has its own generator: the seed and i)")
    class_batch_size: int = opt(4, "class images generated per batch")

    @property
    def class_prompts(self) -> list[str]:
        return [self.class_prompt] if isinstance(self.class_prompt, str) else list(self.class_prompt)

    @property
    def prior_preservation(self) -> bool:
        return self.enabled and self.prior_loss_weight > 0 and any(p.strip() for p in self.class_prompts)

    def check(self):
        prompts = self.class_prompts
        if not all(isinstance(p, str) for p in prompts) or (len(prompts) > 1 and not all(p.strip() for p in prompts)):
            yield "class_prompt", f"must be a string or a list of non-empty strings, got {self.class_prompt!r}"
        if self.prior_loss_weight < 0:
            yield "prior_loss_weight", f"must be >= 0 (0 = no prior preservation), got {self.prior_loss_weight}"
        for name in ("num_class_images", "class_steps", "class_batch_size"):
            if getattr(self, name) < 1:
                yield name, f"must be >= 1, got {getattr(self, name)}"

    def conflicts(self, cfg):
        """Settings of other sections DreamBooth cannot work with (keys relative to the top level)."""
        if not self.enabled:
            return
        if cfg.data.streaming:
            yield "dreambooth.enabled", "needs a map-style dataset: set data.streaming=false"
        if self.prior_preservation and cfg.data.buckets:
            yield "dreambooth.enabled", ("with prior preservation batches pair instance and class images of one size: "
                                         "set data.buckets=false")
        if cfg.validation.holdout:
            yield "dreambooth.enabled", "the instance images are all trained: set validation.holdout=0"


@dataclass
class TextualInversionConfig:
    """Textual inversion: new tokens whose embedding vectors are learned with everything else frozen; with
    lora.enabled, pivotal tuning (the tokens and the LoRA adapters together)."""

    tokens: list[str] = opt([], "new tokens to learn, e.g. ['<sks>'], written in the captions; empty = off")
    num_vectors: int = opt(1, "embedding vectors per token (in prompts a token expands to token, token_1, ...)")
    init_word: str = opt("", "word(s) whose token embeddings start the vectors (cycled); empty = the mean embedding")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def check(self):
        if self.num_vectors < 1:
            yield "num_vectors", f"must be >= 1, got {self.num_vectors}"
        if len(set(self.tokens)) < len(self.tokens):
            yield "tokens", f"has duplicates: {self.tokens}"
        for token in self.tokens:
            if not token.strip() or token != token.strip() or len(token.split()) > 1:
                yield "tokens", f"{token!r} must be one word without spaces, e.g. '<sks>'"
            elif token != token.lower():
                yield "tokens", f"{token!r}: CLIP lowercases prompts, so it would never match; use {token.lower()!r}"
        stems = [token_file_stem(t) for t in self.tokens]
        if "" in stems or len(set(stems)) < len(stems):
            yield "tokens", (f"{self.tokens} must give distinct file names when <, > and other characters outside "
                             "[A-Za-z0-9._-] are dropped (A1111 takes the token from the file name)")

    def conflicts(self, cfg):
        if self.enabled and cfg.model.train_text_encoder:
            yield "ti.tokens", ("trains only the new tokens' vectors, model.train_text_encoder=true the whole text "
                                "encoder: set one of them")


def token_file_stem(token: str) -> str:
    """The file name an embedding of ``token`` is saved under (``<glyph>`` -> ``glyph``): A1111's token."""
    return re.sub(r"[^A-Za-z0-9._-]", "", token)


RESUME_WORDS = ("none", "latest", "latest_or_fail")  # any other `resume` value is a checkpoint path


@dataclass
class TrainConfig:
    """Top-level training config. Add a section with one line: ``name: Cls = section(Cls, "help")``."""

    output_dir: str = opt("outputs/run", "run directory: checkpoints, logs, resolved config, exports", path=True)
    seed: int = opt(0, "global seed (model init, noise, data order and augmentation)")
    max_steps: int = opt(1000, "total optimizer steps")
    checkpoint_every: int = opt(500, "save a resumable checkpoint every N optimizer steps")
    checkpoints_total_limit: int = opt(3, "keep only the last K checkpoints; 0 = keep all")
    resume: str = opt("none", "'none', 'latest' (newest checkpoint in output_dir; none there: a warning, fresh start), "
                              "'latest_or_fail' (none there: an error) or a checkpoint path", path=True)
    mixed_precision: Literal["no", "fp16", "bf16"] = opt("no", "autocast precision (bf16 on Ampere+)")
    log_every: int = opt(10, "log loss/lr every N optimizer steps")
    report_to: str = opt("none", "tracker: " + ", ".join(REPORT_TO))

    model: ModelConfig = section(ModelConfig, "model to train")
    data: DataConfig = section(DataConfig, "training data")
    optim: OptimConfig = section(OptimConfig, "optimizer and schedule")
    export: ExportConfig = section(ExportConfig, "diffusers-layout export")
    ema: EMAConfig = section(EMAConfig, "EMA of the trained weights")
    lora: LoRAConfig = section(LoRAConfig, "LoRA adapters (peft)")
    loss: LossConfig = section(LossConfig, "loss weighting and noise tricks")
    cache: CacheConfig = section(CacheConfig, "precomputed latents / text embeddings")
    validation: ValidationConfig = section(ValidationConfig, "validation images and loss")
    dreambooth: DreamBoothConfig = section(DreamBoothConfig, "DreamBooth with prior preservation")
    ti: TextualInversionConfig = section(TextualInversionConfig, "textual inversion (new tokens; + lora: pivotal tuning)")

    def text_encoder_trained(self) -> bool:
        """Whether any text-encoder weight trains: all of them, LoRA adapters, or new textual-inversion vectors."""
        return self.model.train_text_encoder or (self.lora.enabled and self.lora.text_encoder) or self.ti.enabled

    def check(self):
        if self.max_steps < 1:
            yield "max_steps", f"must be >= 1, got {self.max_steps}"
        if self.checkpoint_every < 1:
            yield "checkpoint_every", f"must be >= 1, got {self.checkpoint_every} (set it > max_steps to checkpoint only at the end)"
        if self.checkpoints_total_limit < 0:
            yield "checkpoints_total_limit", f"must be >= 0 (0 = keep all), got {self.checkpoints_total_limit}"
        if self.log_every < 1:
            yield "log_every", f"must be >= 1, got {self.log_every}"
        if not self.output_dir.strip():
            yield "output_dir", "is empty: set a run directory, e.g. output_dir=outputs/my_run"
        if not self.resume.strip():
            yield "resume", "is empty: use 'none', 'latest', 'latest_or_fail' or a checkpoint directory path"
        elif self.resume.strip().lower() in RESUME_WORDS and self.resume not in RESUME_WORDS:
            yield "resume", f"got {self.resume!r}: write it lowercase ({self.resume.strip().lower()!r})"
        if self.report_to not in REPORT_TO:
            yield "report_to", f"must be one of {', '.join(map(repr, REPORT_TO))}, got {self.report_to!r}"
        yield from self.dreambooth.conflicts(self)
        yield from self.ti.conflicts(self)
        if getattr(self.ema, "enabled", False) and self.optim.optimizer == "schedulefree_adamw":  # (subclasses may swap ema)
            yield "ema.enabled", ("schedule-free AdamW already averages the weights (its eval-mode weights validate "
                                  "and export): set ema.enabled=false")


# --------------------------------------------------------------------------- YAML flavour

_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (plain PyYAML needs ``1.0e-4``) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}: each key may appear once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper with the same float rule, so a *string* like "1e-4" gets quoted and round-trips."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None


# --------------------------------------------------------------------------- typed conversion

_NoneType = type(None)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    """Readable name of an annotation, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not _NoneType]
        body = " | ".join(_type_name(a) for a in inner)
        return f"{body} or null" if len(inner) < len(args) else body
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__} section)"
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, tp: Any, value: Any, hint: str = "") -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` against annotation ``tp``; raise ConfigError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty YAML section (all children commented out)
            value = {}
        if not isinstance(value, dict):
            raise _bad(key, tp, value)
        return _build(tp, value, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and _NoneType in args:
            return None
        inner = [a for a in args if a is not _NoneType]
        if len(inner) == 1:
            if dataclasses.is_dataclass(inner[0]) or typing.get_origin(inner[0]) in (list, tuple, dict):
                return _coerce(value, inner[0], key)  # keep the precise nested error
            try:
                return _coerce(value, inner[0], key)
            except ConfigError:
                raise _bad(key, tp, value) from None
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise _bad(key, tp, value)
    if origin is Literal:
        # compare type too: True == 1 and 1 == 1.0 must not sneak through
        for a in args:
            if type(value) is type(a) and value == a:
                return value
        hint = "; YAML reads bare yes/no/on/off as booleans, quote the value" if isinstance(value, bool) else ""
        raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(key, tp, value, f"; quote it in YAML ({key.rsplit('.', 1)[-1]}: \"{value}\")")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _bad(key, tp, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(key, tp, value)
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{key}.<key>"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _bad(key, tp, value)
    raise TypeError(f"{key}: unsupported annotation {tp!r} in config dataclass")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from mapping ``raw``; missing keys take their defaults."""
    fields, hints = _fields(cls), _hints(cls)
    kwargs = {}
    for k, v in raw.items():
        if k not in fields:
            raise _unknown_key(prefix, str(k), list(fields))
        kwargs[k] = _coerce(v, hints[k], prefix + k)
        if fields[k].metadata.get("path") and isinstance(kwargs[k], str):
            kwargs[k] = os.path.expanduser(kwargs[k])
    return cls(**kwargs)


def _unknown_key(prefix: str, key: str, allowed: list[str]) -> ConfigError:
    where = f"in section '{prefix[:-1]}'" if prefix else "at top level"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{prefix}{key}'{hint} Allowed keys {where}: {', '.join(allowed)}")


def _validate(obj: Any, prefix: str = "") -> list[str]:
    """Run every section's ``check()`` (yielding (field, message)); return 'dotted.key: message' lines."""
    errors = []
    check = getattr(obj, "check", None)
    if callable(check):
        errors += [f"{prefix}{k}: {msg}" for k, msg in check()]
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            errors += _validate(v, f"{prefix}{f.name}.")
    return errors


# --------------------------------------------------------------------------- overrides

_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def parse_overrides(overrides: typing.Iterable[str]) -> list[tuple[list[str], Any]]:
    """Parse ``dotted.key=value`` strings; values go through YAML (``3``, ``1e-4``, ``true``, ``[a, b]``, ``null``)."""
    out = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            raise ConfigError(
                f"malformed override {item!r}: expected dotted.key=value, e.g. optim.learning_rate=1e-4 or data.dataset=data/pets"
            )
        out.append((key.split("."), _yaml_load(text, f"override {item!r}")))
    return out


def _check_override_path(cls: type, parts: list[str]) -> None:
    """Fail early (with a suggestion) on an override whose dotted path is not a declared key."""
    for i, p in enumerate(parts):
        fields = _fields(cls)
        if p not in fields:
            raise _unknown_key("".join(q + "." for q in parts[:i]), p, list(fields))
        tp = _hints(cls)[p]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"override {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
            cls = tp


def _set_dotted(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for k, v in value.items():  # `model={pretrained: x}` merges into the section
            _set_dotted(node[last], [k], v)
    else:
        node[last] = value


# --------------------------------------------------------------------------- public API


def config_from_dict(raw: dict, cls: type = TrainConfig, validate: bool = True) -> Any:
    """Build and (optionally) validate a config dataclass from a plain nested dict."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of keys to values, got {type(raw).__name__}")
    cfg = _build(cls, raw)
    if validate:
        errors = _validate(cfg)
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def load_config(
    path_or_dict: Union[str, os.PathLike, dict, Any, None] = None,
    overrides: typing.Iterable[str] = (),
    cls: type = TrainConfig,
) -> Any:
    """Load a YAML file (or dict / config instance), apply ``dotted.key=value`` overrides, build and validate.

    Unknown keys, wrong types and invalid values raise :class:`ConfigError` naming the dotted key.
    """
    if path_or_dict is None:
        raw = {}
    elif dataclasses.is_dataclass(path_or_dict) and not isinstance(path_or_dict, type):
        raw = config_to_dict(path_or_dict)
    elif isinstance(path_or_dict, dict):
        raw = _deepcopy_plain(path_or_dict)
    else:
        path = _config_path(path_or_dict)
        raw = _yaml_load(path.read_text(encoding="utf-8"), str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(raw).__name__}")
    for parts, value in parse_overrides(overrides):
        _check_override_path(cls, parts)
        _set_dotted(raw, parts, value)
    return config_from_dict(raw, cls)


def _config_path(path_or_name: Union[str, os.PathLike]) -> Path:
    """A YAML path, or the name of a shipped train config (``tiny`` → latentsd/configs/train/tiny.yaml)."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    shipped = shipped_config("train", os.fspath(path_or_name))
    if shipped is None:
        raise ConfigError(f"config file not found: {path} (pass a YAML path, or the name of a shipped train "
                          f"config: {', '.join(shipped_configs('train'))})")
    return shipped


def _deepcopy_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _deepcopy_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_deepcopy_plain(v) for v in x]
    return x


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON and for ``load_config``."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(cfg)


def dump_config(cfg: Any) -> str:
    """YAML text of a config (key order = declaration order)."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: Union[str, os.PathLike]) -> Path:
    """Write the resolved config as YAML atomically (:mod:`latentsd.io`); returns the path."""
    from .io import write_text_atomically

    header = "# resolved latentsd config; reload with latentsd.config.load_config(this_file)\n"
    return write_text_atomically(path, header + dump_config(cfg))


def config_help(cls: type = TrainConfig, prefix: str = "") -> str:
    """One line per key: ``dotted.key: type = default  # help`` (for ``--help`` style listings)."""
    lines, hints = [], _hints(cls)
    for name, f in _fields(cls).items():
        tp, help_ = hints[name], f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{name}:  # {help_}")
            lines.append(config_help(tp, f"{prefix}{name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{prefix}{name}: {_type_name(tp)} = {default!r}  # {help_}")
    return "\n".join(lines)


def config_table(cls: type = TrainConfig, prefix: str = "") -> str:
    """Markdown rows ``| key | default | meaning |`` for every key (the README's table is made by this)."""
    rows, hints = [], _hints(cls)
    for name, f in _fields(cls).items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            rows.append(config_table(tp, f"{prefix}{name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{prefix}{name}` | `{text}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)
