"""Single-file checkpoints in the LDM layout that A1111 and ComfyUI use: read (SD-1.x/2.x) and write.

* :func:`load_single_file` (``LatentDiffusionPipeline.from_single_file``) builds a pipeline from a ``.safetensors``
  file offline: the architecture comes from the tensors' shapes (:mod:`latentsd.ldm_config` says which layers of
  hints fill in the rest), the weights go through diffusers' own LDM → diffusers converters. Pickles (``.ckpt``,
  ``.pt``, ``.pth``, ``.bin``) are refused unless ``allow_pickle=True``, and then read with
  ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only, never arbitrary objects.
* :func:`save_single_file` writes a folder or pipeline as one ``.safetensors`` file with LDM keys
  (:mod:`latentsd.ldm_keys`), atomically, plus ``latentsd.*`` metadata holding the full configs so the file loads
  back here exactly (other readers ignore safetensors metadata they do not know).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from .io import write_file_atomically
from .ldm_config import COMPONENTS, LdmCheckpoint, read_original_config, resolve_configs, split_checkpoint
from .ldm_keys import (OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, clip_to_ldm, open_clip_to_ldm, unet_to_ldm,
                       vae_to_ldm)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
METADATA_PREFIX = "latentsd."
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# The tokenizers diffusers' from_single_file uses (legacy path for SD-1, default pipeline repo for SD-2).
DEFAULT_TOKENIZERS = {"clip": ("openai/clip-vit-large-patch14", None),
                      "open_clip": ("stabilityai/stable-diffusion-2-1", "tokenizer")}
TEXT_ACTIVATIONS = {"quick_gelu": "clip", "gelu": "open_clip"}  # SD-1's CLIP ViT-L, SD-2's OpenCLIP ViT-H


def is_single_file(path: str | Path) -> bool:
    """True for a path naming a single-file checkpoint (by suffix), as opposed to a folder or hub id."""
    return Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES and not Path(path).is_dir()


# ---- reading -------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors and ``{"metadata": {component: config}, "global_step": int | None}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (a single-file checkpoint: .safetensors, or a pickle "
                                f"{'/'.join(PICKLE_SUFFIXES)} with allow_pickle=True)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, allow_pickle)
    raise ValueError(f"{path}: unknown single-file suffix {suffix!r}; use one of {list(SINGLE_FILE_SUFFIXES)}")


def _read_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable .safetensors file ({err}): it is truncated or not safetensors "
                         "at all; download or export it again") from None
    return state, {"metadata": _parse_metadata(header, path), "global_step": None}


def _parse_metadata(header: dict[str, str], path: Path) -> dict:
    configs = {}
    for name in COMPONENTS:
        raw = header.get(METADATA_PREFIX + name)
        if raw is None:
            continue
        try:
            configs[name] = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: metadata {METADATA_PREFIX + name} is not valid JSON ({err}); the file was "
                             "edited or damaged: export it again") from None
    return configs


def _read_pickle(path: Path, allow_pickle: bool):
    if not allow_pickle:
        raise ValueError(f"{path} is a pickle ({path.suffix}): unpickling can run arbitrary code, so it is refused. "
                         "Use a .safetensors file; or, if you trust this file, pass allow_pickle=True (CLI: "
                         "--allow-pickle): it is then read with torch.load(weights_only=True), tensors only")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (damaged or not a pickle)") from None
        raise ValueError(f"{path} asks to rebuild the Python object {found[1]}, not a tensor, which "
                         "weights_only=True refuses; convert the file to .safetensors with a tool you trust") from None
    except Exception as err:  # a damaged zip or pickle fails in many ways (RuntimeError, EOFError, struct.error...)
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}); download it "
                         "again") from None
    global_step = obj.get("global_step") if isinstance(obj, dict) else None
    while isinstance(obj, dict) and "state_dict" in obj:  # Lightning checkpoints nest the weights
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return state, {"metadata": {}, "global_step": global_step if isinstance(global_step, int) else None}


# ---- building the pipeline -----------------------------------------------------------------------------
def resolve_tokenizer(tokenizer, text_format: str, vocab_size: int):
    """A tokenizer object as given; else a folder / hub id; else ours (same vocab size) or diffusers' default."""
    from .tokenizer import builtin_vocab_size, load_tokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    if tokenizer is None and vocab_size == builtin_vocab_size():
        return load_tokenizer("builtin")
    source, subfolder = (str(tokenizer), None) if tokenizer is not None else DEFAULT_TOKENIZERS[text_format]
    if subfolder is None and (Path(source) / "tokenizer").is_dir():  # a diffusers model folder
        subfolder = "tokenizer"
    where = source + (f"/{subfolder}" if subfolder else "")
    try:
        tok = load_tokenizer(source, **({"subfolder": subfolder} if subfolder else {}))
    except (OSError, ValueError) as err:
        raise _no_tokenizer(where, str(err).splitlines()[0]) from None
    if len(tok) < 256:  # transformers 5 builds a specials-only tokenizer when the files are missing (offline)
        raise _no_tokenizer(where, f"it has no vocabulary here, {len(tok)} tokens: not cached, or not a tokenizer")
    if len(tok) > vocab_size:
        raise ValueError(f"tokenizer {where} has {len(tok)} tokens, the text encoder only {vocab_size}: pass the "
                         "model's own tokenizer=")
    return tok


def _no_tokenizer(where: str, why: str) -> ValueError:
    return ValueError(f"a single file holds no tokenizer, and {where} could not be loaded ({why}). Offline, pass "
                      "tokenizer=FOLDER (vocab.json + merges.txt, or a diffusers model folder with tokenizer/), or "
                      "load that hub id once online")


def build_scheduler(config: dict):
    """Our DDPM/DDIM for those class names, else the diffusers scheduler the config names."""
    import diffusers

    from . import schedulers

    name = config.get("_class_name", "DDIMScheduler")
    cls = getattr(schedulers, name, None) or getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"the file names an unknown scheduler {name!r}: pass scheduler=... explicitly")
    return cls.from_config({k: v for k, v in config.items() if k != "_class_name"})


def _fill(model: torch.nn.Module, weights: dict[str, torch.Tensor], dtype: torch.dtype, name: str):
    """Load ``weights`` (cast to ``dtype``) into a model built on the meta device; every weight must fit."""
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    try:
        result = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as err:
        raise ValueError(f"the file's {name} does not fit the inferred architecture ({str(err).splitlines()[-1]}); "
                         "pass original_config= (the model's LDM YAML)") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the file's {name} does not fit the inferred architecture: missing "
                         f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}; pass "
                         "original_config= (the model's LDM YAML)")
    return model.eval()


def _empty(build, name: str):
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():  # parameters on meta (filled by _fill), buffers real
            return build()
    except (ValueError, TypeError) as err:
        raise ValueError(f"cannot build the file's {name} from its inferred config ({err}): files without latentsd "
                         "metadata are read with SD's conventions (32 norm groups, 8 heads or 64 channels per head), "
                         "which this model breaks; write the file with `latentsd export-single-file` (it records "
                         "the configs) or load the diffusers folder instead") from None


def build_unet(state, config: dict, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    model = _empty(lambda: UNet2DConditionModel.from_config(config), "UNet")
    return _fill(model, convert_ldm_unet_checkpoint(state, dict(model.config)), dtype, "UNet")


def build_vae(state, config: dict, dtype: torch.dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model = _empty(lambda: AutoencoderKL.from_config(config), "VAE")
    return _fill(model, convert_ldm_vae_checkpoint(state, dict(model.config)), dtype, "VAE")


def build_text_encoder(state, ckpt: LdmCheckpoint, config: dict, tokenizer, dtype: torch.dtype):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model = _empty(lambda: CLIPTextModel(CLIPTextConfig(**{**ids, **config})), "text encoder")
    if ckpt.text_format == "clip":
        weights = convert_ldm_clip_checkpoint(state)
    else:
        weights = convert_open_clip_checkpoint(model, state, prefix=OPEN_CLIP_PREFIX)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}  # a buffer, not a weight
    tokenizer.model_max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    return _fill(model, weights, dtype, "text encoder")


def load_single_file(path: str | Path, pipeline_class=None, *, original_config: str | Path | dict | None = None,
                     prediction_type: str | None = None, tokenizer=None, scheduler=None, allow_pickle: bool = False,
                     dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None):
    """A pipeline from an SD-1.x/2.x LDM single file, offline; see the module and README for every argument.

    ``dtype`` (or diffusers' older ``torch_dtype``) is the dtype of every component; default float32.
    ``scheduler`` (an instance) replaces the one the file's metadata or the SD defaults give.
    """
    dtype = dtype or torch_dtype or torch.float32
    state, info = read_checkpoint(path, allow_pickle)
    ckpt = split_checkpoint(state, str(path))
    configs = resolve_configs(ckpt, info["metadata"], read_original_config(original_config), prediction_type,
                              info["global_step"])
    tok = resolve_tokenizer(tokenizer, ckpt.text_format, configs["text_encoder"]["vocab_size"])
    if pipeline_class is None:
        from .pipeline import LatentDiffusionPipeline as pipeline_class
    return pipeline_class(vae=build_vae(state, configs["vae"], dtype), unet=build_unet(state, configs["unet"], dtype),
                          text_encoder=build_text_encoder(state, ckpt, configs["text_encoder"], tok, dtype),
                          tokenizer=tok,
                          scheduler=scheduler if scheduler is not None else build_scheduler(configs["scheduler"]))


# ---- writing -------------------------------------------------------------------------------------------
def text_format(text_encoder) -> str:
    """``clip`` (SD-1) or ``open_clip`` (SD-2): the layout is read back by the activation it implies."""
    act = text_encoder.config.hidden_act
    if act not in TEXT_ACTIVATIONS:
        raise ValueError(f"the text encoder's activation {act!r} is neither SD-1's CLIP (quick_gelu) nor SD-2's "
                         "OpenCLIP (gelu): it has no LDM single-file layout")
    return TEXT_ACTIVATIONS[act]


def ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The three models' weights under LDM keys (tensors shared with the models, not copied)."""
    for name, module in (("UNet", unet), ("VAE", vae), ("text encoder", text_encoder)):
        if any("lora_" in k or ".base_layer." in k for k in module.state_dict()):
            raise ValueError(f"the {name} has LoRA adapters attached: merge them first (pipe.fuse_lora() then "
                             "pipe.unload_lora_weights()), or export the merged model/ folder")
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config.layers_per_block).items()}
    state.update({VAE_PREFIX + k: v for k, v in
                  vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)).items()})
    to_ldm = clip_to_ldm if text_format(text_encoder) == "clip" else open_clip_to_ldm
    state.update(to_ldm(text_encoder.state_dict()))
    return state


def config_metadata(unet, vae, text_encoder, scheduler) -> dict[str, str]:
    """``latentsd.*`` header entries: each component's full config as JSON."""
    def public(config):
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    dropped = ("transformers_version", "model_type", "architectures", "dtype", "torch_dtype")
    configs = {"unet": public(unet.config), "vae": public(vae.config),
               "text_encoder": {k: v for k, v in text_encoder.config.to_diff_dict().items() if k not in dropped},
               "scheduler": {**public(scheduler.config), "_class_name": type(scheduler).__name__}}
    return {METADATA_PREFIX + name: json.dumps(cfg, sort_keys=True) for name, cfg in configs.items()}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def save_single_file(pipe_or_dir, out: str | Path, dtype: torch.dtype | str | None = torch.float32) -> Path:
    """Write a pipeline (or a diffusers-layout folder) as one LDM-layout ``.safetensors`` file, atomically.

    Floating tensors are written in ``dtype`` (``None`` keeps each one's own). The keys are LDM's (what A1111 and
    ComfyUI read; tested through diffusers' LDM converters, not against those programs), diffusers'
    ``StableDiffusionPipeline.from_single_file`` loads the file, and :func:`load_single_file` loads it back exactly.
    """
    from safetensors.torch import save_file

    dtype = as_dtype(dtype)
    if Path(str(out)).suffix.lower() != ".safetensors":
        raise ValueError(f"{out}: single files are written as .safetensors; name it e.g. model.safetensors")
    if isinstance(pipe_or_dir, (str, Path)):
        from .models import load_components

        pipe_or_dir = load_components(str(pipe_or_dir))
    parts = [getattr(pipe_or_dir, name) for name in ("unet", "vae", "text_encoder", "scheduler")]
    tensors = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
               for k, v in ldm_state_dict(*parts[:3]).items()}
    metadata = {"format": "pt", **config_metadata(*parts)}
    return write_file_atomically(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
