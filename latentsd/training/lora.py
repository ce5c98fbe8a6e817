"""LoRA: add peft adapters for training, export them (diffusers and kohya/A1111 formats), load them back.

Training adds low-rank adapters (``W x + (alpha / r) · B A x``) to the UNet's attention projections and,
optionally, the text encoder's; the base weights stay frozen and may be cast to fp16/bf16 while the
adapters stay fp32. Two export formats, both loadable with diffusers' ``pipe.load_lora_weights``:

- ``pytorch_lora_weights.safetensors`` (diffusers): keys ``unet.<module>.lora.down.weight`` /
  ``text_encoder.text_model.<module>.lora_linear_layer.down.weight``, with the peft ``LoraConfig`` of each model in the
  file's ``lora_adapter_metadata`` so that ``alpha != rank`` survives;
- a single kohya-ss / A1111 file: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` and ``lora_te_text_model_encoder_layers_<i>_self_attn_<q,k,v,out>_proj.*``, plus ``ss_network_*``
  metadata.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ..loaders import DIFFUSERS_WEIGHT_NAME  # the one name, shared with loading

logger = logging.getLogger(__name__)

ADAPTER = "default"                                   # peft's name for the one adapter we train
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
LORA_DIR_NAME = "lora"                                # suggested export folder: <output_dir>/lora/


# ---- training ----------------------------------------------------------------------------------------
def lora_config(rank: int, alpha: float | None, dropout: float, target_modules: Iterable[str]):
    """A peft ``LoraConfig``; ``alpha=None`` means ``alpha = rank`` (scale 1)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
                      target_modules=list(target_modules), init_lora_weights="gaussian")


def lora_parameters(model: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    """The adapter parameters (``lora_A`` / ``lora_B``) of a model with peft LoRA layers; [] for None."""
    if model is None:
        return []
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def add_lora(unet, text_encoder, lora_cfg) -> list[torch.nn.Parameter]:
    """Add LoRA adapters to ``unet`` (and ``text_encoder`` when ``lora_cfg.text_encoder``); return the trainable params.

    Call after the models are built, moved and cast to the compute dtype, and before ``accelerator.prepare``.
    Everything except the adapters is frozen (``requires_grad=False``). The adapters are fp32 even when the base
    weights are fp16/bf16: fp16 *trainable* parameters make GradScaler fail ("Attempting to unscale FP16
    gradients") and lose small updates; peft's forward casts activations to the adapter dtype and back.
    """
    if not lora_cfg.text_encoder:
        text_encoder = None
    models = [m for m in (unet, text_encoder) if m is not None]
    for model in models:
        if getattr(model, "peft_config", None) and ADAPTER in model.peft_config:
            raise ValueError(f"{type(model).__name__} already has a LoRA adapter {ADAPTER!r}: add_lora once per model")
        model.requires_grad_(False)
    unet.add_adapter(lora_config(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.target_modules))
    if text_encoder is not None:
        # transformers' PeftAdapterMixin; it also makes gradient checkpointing feed grads to the adapters
        text_encoder.add_adapter(lora_config(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout,
                                             lora_cfg.text_encoder_target_modules), adapter_name=ADAPTER)
    params = []
    for model in models:
        found = lora_parameters(model)
        if not found:
            raise ValueError(f"no LoRA layers were added to {type(model).__name__}: check the target modules")
        for p in found:
            p.requires_grad_(True)
            if p.dtype != torch.float32:
                p.data = p.data.float()  # keep the Parameter object, change only its storage dtype
        params += found
    return params


# ---- state dicts -------------------------------------------------------------------------------------
def _unwrap(model):
    """Accept accelerate/DDP/compile wrappers: peft state dicts need the bare module names."""
    while True:
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _peft_state_dict(model, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """``<module>.lora_A.weight`` / ``lora_B.weight`` (adapter name stripped), detached fp32 CPU copies."""
    from peft.utils import get_peft_model_state_dict

    if not _has_adapter(model, adapter_name):
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r}: call add_lora first")
    sd = get_peft_model_state_dict(_unwrap(model), adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def lora_state_dicts(unet, text_encoder=None, adapter_name: str = ADAPTER) -> tuple[dict, dict | None]:
    """(unet, text encoder or None) LoRA weights in diffusers naming, the keys diffusers' LoRA scripts save.

    From ``get_peft_model_state_dict``: UNet ``<module>.lora.down.weight`` / ``.lora.up.weight``, text encoder
    ``text_model.<module>.lora_linear_layer.down.weight`` / ``.up.weight``. For the default attention targets
    this equals ``convert_state_dict_to_diffusers``; we rename *every* key, not just attention projections,
    because diffusers' UNet loader decides from the first key alone whether to convert the names, so a file
    mixing ``to_q.lora.down`` with ``proj_in.lora_A`` (what that function gives for other targets) loads
    only half its layers. A text encoder without adapters gives None. ``adapter_name``: peft's adapter
    (``add_lora`` makes "default"; ``load_lora_weights`` names them "default_0", …).
    """
    unet_sd = _rename(_peft_state_dict(unet, adapter_name), ".lora.down.", ".lora.up.")
    te_sd = None
    if text_encoder is not None and _has_adapter(text_encoder, adapter_name):
        # transformers 5 flattened CLIPTextModel (no `text_model.` submodule); write the classic names that
        # every SD LoRA on the hub has: diffusers strips the prefix again for a flat model, older stacks need it
        te_sd = {_with_prefix(k, "text_model."): v for k, v in _rename(
            _peft_state_dict(text_encoder, adapter_name), ".lora_linear_layer.down.", ".lora_linear_layer.up.").items()}
    return unet_sd, te_sd


def _rename(sd: dict, down: str, up: str) -> dict:
    return {k.replace(".lora_A.", down).replace(".lora_B.", up): v for k, v in sd.items()}


def _json_targets(targets):
    """peft keeps target module names as a set (JSON has none) or one regex string."""
    return targets if isinstance(targets, str) else sorted(targets)


def _with_prefix(name: str, prefix: str) -> str:
    return name if name.startswith(prefix) else prefix + name


def _has_adapter(model, adapter_name: str = ADAPTER) -> bool:
    return adapter_name in (getattr(_unwrap(model), "peft_config", None) or {})


def _adapter_metadata(model) -> dict:
    """What diffusers rebuilds the ``LoraConfig`` from when loading (keeps alpha != rank, ranks, targets).

    Only the keys diffusers itself derives from a state dict (``get_peft_kwargs``), not the full
    ``LoraConfig.to_dict()``: ``LoraConfig(**metadata)`` must also work with older peft versions.
    """
    cfg = _unwrap(model).peft_config[ADAPTER]
    meta = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "rank_pattern": dict(cfg.rank_pattern),
            "alpha_pattern": dict(cfg.alpha_pattern), "target_modules": _json_targets(cfg.target_modules),
            "use_dora": cfg.use_dora, "lora_bias": cfg.lora_bias}
    if cfg.use_rslora:
        meta["use_rslora"] = True
    return meta


# ---- export ------------------------------------------------------------------------------------------
def save_lora_diffusers(out_dir: str | Path, unet, text_encoder=None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` (diffusers format) in ``dtype``; returns its path.

    Loads with ``pipe.load_lora_weights(out_dir)`` in diffusers' ``StableDiffusionPipeline`` and ours. The file
    appears atomically (written in a temp folder inside ``out_dir``, then ``os.replace``d), so a reader or a
    crash never sees half a file; other files in ``out_dir`` are left alone.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet_sd, te_sd = (_cast(sd, dtype) for sd in lora_state_dicts(unet, text_encoder))
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-lora-", dir=out_dir))
    try:
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, safe_serialization=True,
            weight_name=DIFFUSERS_WEIGHT_NAME, unet_lora_adapter_metadata=_adapter_metadata(unet),
            text_encoder_lora_adapter_metadata=_adapter_metadata(text_encoder) if te_sd else None)
        target = out_dir / DIFFUSERS_WEIGHT_NAME
        os.replace(tmp / DIFFUSERS_WEIGHT_NAME, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """peft LoRA layers by module path (``down_blocks.0.….to_q``) that carry our adapter."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in _unwrap(model).named_modules()
            if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def kohya_state_dict(unet, text_encoder=None) -> dict[str, torch.Tensor]:
    """The LoRA weights under kohya-ss / A1111 names (``lora_down`` = peft ``lora_A``, ``lora_up`` = ``lora_B``).

    ``alpha`` is written as ``scaling · r`` per module, so kohya's ``alpha / r`` equals peft's scaling exactly
    (also for rsLoRA). Text-encoder names always say ``text_model_encoder_…``: transformers 5 dropped the
    ``text_model`` submodule, but A1111, kohya and diffusers' converter expect it.
    """
    out = {}
    parts = [("lora_unet_", unet, "")]
    if text_encoder is not None and _has_adapter(text_encoder):
        parts.append(("lora_te_", text_encoder, "text_model."))
    for prefix, model, need in parts:
        layers = _lora_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no LoRA adapter {ADAPTER!r}: call add_lora first")
        for name, layer in layers.items():
            key = prefix + _with_prefix(name, need).replace(".", "_")
            down, up = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            out[f"{key}.lora_down.weight"] = down.detach().to("cpu", torch.float32).contiguous()
            out[f"{key}.lora_up.weight"] = up.detach().to("cpu", torch.float32).contiguous()
            alpha = float(layer.scaling[ADAPTER]) * layer.r[ADAPTER]
            out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def save_lora_kohya(path: str | Path, unet, text_encoder=None, dtype: torch.dtype = torch.float32) -> Path:
    """Write one kohya-ss / A1111 ``.safetensors`` LoRA file (atomically) in ``dtype``; returns its path.

    Rank and alpha come from the adapters themselves (``metadata ss_network_dim / ss_network_alpha``), so they
    cannot disagree with the weights. Loads with diffusers' ``pipe.load_lora_weights(path)`` and in A1111/ComfyUI.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a kohya LoRA file must end in .safetensors, got {path}")
    sd = _cast(kohya_state_dict(unet, text_encoder), dtype)
    _warn_if_diffusers_cannot_load_te(sd)
    cfg = _unwrap(unet).peft_config[ADAPTER]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.r),
                "ss_network_alpha": _number(cfg.lora_alpha),
                "ss_text_encoder_lr_trained": str(any(k.startswith("lora_te_") for k in sd)).lower()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _warn_if_diffusers_cannot_load_te(sd: dict) -> None:
    """diffusers (0.42) guesses the naming of a kohya text-encoder LoRA from ``out_proj``: attention LoRA
    without ``out_proj`` fails to load (q/k/v only) or loads only the MLP part (q/k/v + fc1/fc2)."""
    te = {k.split(".")[0] for k in sd if k.startswith("lora_te_")}
    attn = any(k.endswith(("_q_proj", "_k_proj", "_v_proj")) for k in te)
    if attn and not any(k.endswith("_out_proj") for k in te):
        logger.warning("kohya LoRA file: the text encoder adapts q/k/v_proj but not out_proj; diffusers' "
                       "load_lora_weights cannot load its text-encoder part (A1111/ComfyUI can). Add out_proj "
                       "to lora.text_encoder_target_modules, or load the diffusers-format export instead.")


def _cast(sd: dict | None, dtype: torch.dtype) -> dict | None:
    return None if sd is None else {k: v.to(dtype) for k, v in sd.items()}


def _number(x: float) -> str:
    """4.0 → "4", 2.5 → "2.5" (kohya writes integer alphas without a decimal point)."""
    return str(int(x)) if float(x).is_integer() else str(float(x))


def export_lora(out_dir: str | Path, unet, text_encoder=None, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Both formats into ``out_dir``: ``pytorch_lora_weights.safetensors`` (diffusers) and ``lora_kohya.safetensors``.

    Every tensor in ``dtype`` (the trainer passes ``export.dtype``; the adapters train in fp32 whatever the
    base dtype, and diffusers loads a file of any float dtype into a model of any other).
    Pass the *unwrapped* models (``accelerator.unwrap_model``); call on the main process only.
    Returns ``{"diffusers": path, "kohya": path}``.
    """
    out_dir = Path(out_dir)
    return {"diffusers": save_lora_diffusers(out_dir, unet, text_encoder, dtype),
            "kohya": save_lora_kohya(out_dir / KOHYA_WEIGHT_NAME, unet, text_encoder, dtype)}


def merged_copy(model):
    """An fp32 CPU copy of ``model`` with its LoRA merged into the base weights and the peft layers removed.

    For a full-model export (``save_pretrained``) of a LoRA run: saving the adapted model itself writes peft's
    ``base_layer`` / ``lora_A`` names (transformers even writes only the adapter), which a plain
    ``from_pretrained`` cannot read. The trained model is left untouched. The merge is done in fp32 whatever
    the base dtype: merging into a bf16/fp16 base would round the (small) update ``(alpha / r)·B A`` to the base
    weights' few mantissa bits. The copy is made straight on the CPU (no second copy on the GPU); cast it
    (or the saved files) to the export dtype afterwards.
    """
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = _cpu_fp32_copy(_unwrap(model))
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False  # else transformers' save_pretrained writes only the adapter
    return model


def merge_into(base, adapted):
    """``base`` in fp32 with ``adapted``'s LoRA update ``(alpha / r)·B A`` added to each adapted weight; returns it.

    ``base`` is a plain (peft-free) copy of the model ``adapted`` was built from, e.g. the source weights freshly
    loaded: a LoRA run under fp16/bf16 computes with a cast base, but its adapters are applied to the source
    model, so the merged export should be exactly "source + adapters". ``base`` is changed in place (pass a copy
    nobody else uses); ``adapted`` is left alone.
    """
    base = _unwrap(base).to(torch.float32)
    weights = dict(base.named_parameters())
    layers = _lora_layers(adapted)
    if not layers:
        raise ValueError(f"{type(adapted).__name__} has no LoRA adapter {ADAPTER!r}: nothing to merge")
    with torch.no_grad():
        for name, layer in layers.items():
            weight = weights.get(f"{name}.weight")
            if weight is None:
                raise ValueError(f"{type(base).__name__} has no {name}.weight: it is not the base of the adapted model")
            weight += layer.get_delta_weight(ADAPTER).to(weight.device, torch.float32)
    return base


def _cpu_fp32_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy`` whose tensors are fp32 CPU copies (deepcopy's memo supplies them; tied weights stay tied)."""
    def fresh(t: torch.Tensor) -> torch.Tensor:  # copy=True: never share storage with the model (CPU fp32 already)
        return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)

    memo = {id(p): torch.nn.Parameter(fresh(p), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): fresh(b) for b in model.buffers()})
    return copy.deepcopy(model, memo)
