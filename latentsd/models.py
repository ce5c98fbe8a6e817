"""Build Stable-Diffusion-style components from a model config, or load them from a diffusers folder / hub id.

A model config (``latentsd/configs/models/NAME.yaml``, shipped in the package, or any YAML path) has one
section per component, passed as keyword arguments to the standard classes: ``transformers.CLIPTextConfig``,
``diffusers.AutoencoderKL``, ``diffusers.UNet2DConditionModel`` and our ``DDPMScheduler``; plus ``tokenizer``
(``builtin`` or a folder / hub id) and ``resolution`` (the default image side).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from .resources import shipped_config, shipped_configs
from .tokenizer import load_tokenizer

SECTIONS = ("resolution", "tokenizer", "text_encoder", "vae", "unet", "scheduler")


@dataclass
class Components:
    """The five parts of a text-to-image latent diffusion model (diffusers' module names)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    unet: Any
    scheduler: Any

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def model_config_path(name_or_path: str) -> Path:
    """``tiny`` → latentsd/configs/models/tiny.yaml (shipped in the package); a path to a YAML file is used as is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        return path
    shipped = shipped_config("models", name_or_path)
    if shipped is None:
        raise ValueError(f"unknown model config {name_or_path!r}: use one of {shipped_configs('models')} "
                         "or a path to a YAML file")
    return shipped


def load_model_config(name_or_path: str | dict) -> dict:
    """Read a model config and check that it has exactly the known sections."""
    cfg = dict(name_or_path) if isinstance(name_or_path, dict) else yaml.safe_load(model_config_path(name_or_path).read_text())
    unknown = set(cfg) - set(SECTIONS)
    missing = {"text_encoder", "vae", "unet"} - set(cfg)
    if unknown or missing:
        raise ValueError(f"model config: unknown sections {sorted(unknown)}, missing {sorted(missing)}; "
                         f"allowed sections are {list(SECTIONS)}")
    return cfg


def build_components(config: str | dict = "tiny", seed: int = 0) -> Components:
    """Random-init components from a model config (deterministic for a given ``seed``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .schedulers import DDPMScheduler

    cfg = load_model_config(config)
    tokenizer = load_tokenizer(cfg.get("tokenizer", "builtin"))
    te_cfg = {"vocab_size": len(tokenizer), **cfg["text_encoder"]}
    te_cfg.setdefault("bos_token_id", tokenizer.bos_token_id)
    te_cfg.setdefault("eos_token_id", tokenizer.eos_token_id)
    te_cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
    # A text encoder with fewer positions than the tokenizer's window sets the window (tiny models).
    tokenizer.model_max_length = min(tokenizer.model_max_length, te_cfg.get("max_position_embeddings", 77))
    torch.manual_seed(seed)  # the classes below draw their init from the global RNG
    text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
    vae = AutoencoderKL(**cfg["vae"])
    unet = UNet2DConditionModel(**cfg["unet"])
    scheduler = DDPMScheduler.from_config(cfg.get("scheduler", {}))
    return Components(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def load_scheduler(pretrained: str, subfolder: str = "scheduler", **kwargs):
    """Load a folder's scheduler: ours for DDPM/DDIM configs, else the diffusers class it names (e.g. PNDM)."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(pretrained, subfolder=subfolder, **kwargs)
    return as_our_scheduler(getattr(diffusers, config["_class_name"]).from_config(config))


def as_our_scheduler(scheduler):
    """Swap diffusers' DDPM/DDIM for ours (same config and numbers); leave any other scheduler alone."""
    from . import schedulers

    ours = getattr(schedulers, type(scheduler).__name__, None)
    if ours is not None and type(scheduler).__module__.startswith("diffusers"):
        return ours.from_config(scheduler.config)
    return scheduler


def load_components(pretrained: str, revision: str | None = None, variant: str | None = None,
                    torch_dtype: torch.dtype | None = None) -> Components:
    """Load every component from a diffusers-layout folder or hub id (``unet/``, ``vae/``, …)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    check_model_folder(pretrained)
    common = {"revision": revision}
    weights = {**common, "variant": variant, "torch_dtype": torch_dtype}
    return Components(
        vae=AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **weights),
        text_encoder=CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **weights),
        tokenizer=load_tokenizer(pretrained, subfolder="tokenizer", **common),
        unet=UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **weights),
        scheduler=load_scheduler(pretrained, **common),
    )


def load_vae(path: str, **kwargs):
    """An ``AutoencoderKL`` from its own folder, or from a model folder's ``vae/``."""
    from diffusers import AutoencoderKL

    sub = "vae" if (Path(path) / "vae").is_dir() else None
    return AutoencoderKL.from_pretrained(path, subfolder=sub, **kwargs)


def check_model_folder(pretrained: str) -> None:
    """A local folder must have the diffusers layout; fail early with the fix instead of a hub lookup."""
    path = Path(pretrained)
    looks_local = path.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
    if not looks_local:
        return
    missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{pretrained} is not a diffusers-layout model folder (missing {missing}); create one with "
            "`latentsd init-model --config tiny --out DIR` or pipe.save_pretrained(DIR)")


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
