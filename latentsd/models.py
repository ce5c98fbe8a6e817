"""Build Stable-Diffusion-style components from a model config, or load them from a diffusers folder / hub id.

A model config (``latentsd/configs/models/NAME.yaml``, shipped in the package, or any YAML path) has one
section per component, passed as keyword arguments to the standard classes: ``transformers.CLIPTextConfig``,
``diffusers.AutoencoderKL``, ``diffusers.UNet2DConditionModel`` and our ``DDPMScheduler``; plus ``tokenizer``
(``builtin`` or a folder / hub id) and ``resolution`` (the default image side).

Loading reads safetensors weights only, unless ``allow_pickle=True`` (then ``.bin`` too, with
``torch.load(weights_only=True)``); a path that looks local (:mod:`latentsd.paths`) is checked here and never
looked up on the hub.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import UserError
from .paths import expand, looks_local
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
    path = Path(expand(name_or_path))
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
                    torch_dtype: torch.dtype | None = None, allow_pickle: bool = False) -> Components:
    """Load every component from a diffusers-layout folder or hub id (``unet/``, ``vae/``, …).

    Weights are read from safetensors only; ``allow_pickle=True`` also reads ``.bin`` files, with
    ``torch.load(weights_only=True)`` (diffusers' and transformers' own loaders). A local-looking path that does
    not exist fails before any hub call (:mod:`latentsd.paths`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = check_model_folder(pretrained, allow_pickle)
    common = {"revision": revision}
    weights = {**common, "variant": variant, "torch_dtype": torch_dtype, **weights_kwargs(allow_pickle)}
    with load_errors(src):
        return Components(
            vae=AutoencoderKL.from_pretrained(src, subfolder="vae", **weights),
            text_encoder=CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **weights),
            tokenizer=load_tokenizer(src, subfolder="tokenizer", **common),
            unet=UNet2DConditionModel.from_pretrained(src, subfolder="unet", **weights),
            scheduler=load_scheduler(src, **common),
        )


def load_vae(path: str, allow_pickle: bool = False, **kwargs):
    """An ``AutoencoderKL`` from its own folder, or from a model folder's ``vae/`` (safetensors unless
    ``allow_pickle``)."""
    from diffusers import AutoencoderKL

    src, sub = check_vae_folder(path, allow_pickle)
    with load_errors(src):
        return AutoencoderKL.from_pretrained(src, subfolder=sub, **weights_kwargs(allow_pickle), **kwargs)


def check_vae_folder(path: str, allow_pickle: bool = False) -> tuple[str, str | None]:
    """``(source, subfolder)`` of a VAE: its own folder, a model folder's ``vae/``, or a hub id; a local path must
    be an AutoencoderKL folder with safetensors weights (pickles only with ``allow_pickle``), never a hub lookup."""
    src = expand(path)
    sub = "vae" if (Path(src) / "vae").is_dir() else None
    if looks_local(src):
        folder = Path(src) / (sub or "")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"VAE {path!r} is not an AutoencoderKL folder (no {folder / 'config.json'}): pass "
                                    "a folder written by vae.save_pretrained, or a model folder with vae/")
        check_weights(folder, allow_pickle)
    return src, sub


MODEL_DIRS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")


def check_model_folder(pretrained: str, allow_pickle: bool = False) -> str:
    """The folder or hub id to load (``~`` expanded). A local path must exist, have the diffusers layout and hold
    safetensors weights (pickles only with ``allow_pickle``): each fails here with the fix, never as a hub lookup."""
    src = expand(pretrained)
    if not looks_local(src):
        return src
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(
            f"model {pretrained!r} does not exist (resolved to {path.resolve()}); a local path is never looked up on "
            "the hub. Fix the path, or create a model with `latentsd init-model --config tiny --out DIR`; hub ids "
            "are written 'org/name'")
    missing = [d for d in MODEL_DIRS if not (path / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{pretrained} is not a diffusers-layout model folder (missing {missing}); create one with "
            "`latentsd init-model --config tiny --out DIR` or pipe.save_pretrained(DIR)")
    check_weights(path, allow_pickle)
    return src


def check_weights(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse a folder (or its component subfolders) whose weights are pickles only, unless ``allow_pickle``."""
    if allow_pickle:
        return
    pickled = []
    for d in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        files = [f for f in d.iterdir() if f.is_file()]
        if not any(f.suffix == ".safetensors" for f in files):
            pickled += [f for f in sorted(files) if f.suffix in PICKLE_WEIGHTS]
    if pickled:
        names = ", ".join(str(f.relative_to(folder)) for f in pickled[:4])
        raise UserError(
            f"{folder} holds pickled weights without .safetensors ({names}): unpickling can run arbitrary code, so "
            "they are refused. Use safetensors weights (load once with allow_pickle=True and save_pretrained); or, "
            "if you trust these files, pass allow_pickle=True (CLI: --allow-pickle; training: model.allow_pickle=true): "
            "they are then read with torch.load(weights_only=True), tensors only")


def weights_kwargs(allow_pickle: bool) -> dict:
    """``from_pretrained`` arguments: safetensors only, unless pickles are allowed (then safetensors first)."""
    return {} if allow_pickle else {"use_safetensors": True}


@contextmanager
def load_errors(src: str):
    """Name the source and the fix when a hub id (not a local path) cannot be loaded, or when an allowed pickle
    asks to rebuild a Python object (``weights_only=True`` refuses it)."""
    import pickle

    def refused(err: BaseException) -> UserError:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"the Python object {found[1]}" if found else "a Python object"
        return UserError(f"{src}: a pickled weights file asks to rebuild {what}, not a tensor, which "
                         "torch.load(weights_only=True) refuses: convert the weights to .safetensors with a tool you "
                         "trust")

    try:
        yield
    except pickle.UnpicklingError as err:  # transformers
        raise refused(err) from None
    except OSError as err:
        cause = err
        while cause is not None and not isinstance(cause, pickle.UnpicklingError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:  # diffusers wraps the refusal in "Unable to load weights"
            raise refused(cause) from None
        if looks_local(src):
            raise
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "; a hub repo with only .bin weights needs allow_pickle=True (--allow-pickle)" \
            if "safetensors" in why else ""
        raise FileNotFoundError(
            f"{src!r} is not a local path, so it was looked up on the hub, and that failed ({why}). Check the id "
            f"('org/name'), the network or HF_HUB_OFFLINE, and access to gated models; a local folder is written "
            f"./{src}{hint}") from err


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
