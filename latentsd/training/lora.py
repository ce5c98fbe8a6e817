"""LoRA and its variants: add peft adapters for training, export them (diffusers/PEFT and kohya/LyCORIS layouts).

Training adds adapters to the UNet's attention projections (``lora.target_modules``; with ``lora.conv`` also the
ResNet blocks and samplers, kohya's LoCon) and, optionally, the text encoder's; the base weights stay frozen and may
be cast to fp16/bf16 while the adapters stay fp32. ``lora.variant`` picks the peft tuner:

- ``lora``: ``W x + (alpha / r) · B A x``;
- ``dora``: LoRA with the weight decomposed into a per-row magnitude and a direction (``LoraConfig(use_dora=True)``);
- ``loha``: ``ΔW = (alpha / r) · (B1 A1) ⊙ (B2 A2)`` (``LoHaConfig``);
- ``lokr``: ``ΔW = (alpha / r) · W1 ⊗ W2`` (``LoKrConfig``).

Two export files (:func:`export_lora`); :mod:`latentsd.adapter_formats` has the names and which loader reads what:

- ``pytorch_lora_weights.safetensors`` (diffusers/PEFT): LoRA/DoRA keys ``unet.<module>.lora.down.weight`` /
  ``text_encoder.text_model.<module>.lora_linear_layer.down.weight`` (+ ``lora_magnitude_vector``), LoHa/LoKr keys
  ``unet.<module>.hada_w1_a`` / ``lokr_w1`` …, with each model's peft config in ``lora_adapter_metadata``;
- a single kohya-ss / LyCORIS file: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha`` (``dora_scale``, ``hada_*``, ``lokr_*``) and ``lora_te_text_model_encoder_layers_<i>_…``, plus
  ``ss_network_*`` metadata.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from ..adapter_formats import is_adapter_key, kohya_module_names, kohya_tensors, peft_config, unwrap, with_prefix
from ..io import write_file_atomically
from ..loaders import DIFFUSERS_WEIGHT_NAME  # the one name, shared with loading

logger = logging.getLogger(__name__)

ADAPTER = "default"                                   # peft's name for the one adapter we train
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
LORA_DIR_NAME = "lora"                                # suggested export folder: <output_dir>/lora/


# ---- training ----------------------------------------------------------------------------------------
# LoCon (kohya's conv_dim): every child of the ResNet blocks and samplers; the 3x3 convs take lora.conv_rank/alpha
CONV_TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
CONV_3X3 = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]


def lora_config(rank: int, alpha: float | None, dropout: float, target_modules: Iterable[str], variant: str = "lora",
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None):
    """The peft config of ``variant`` (``LoraConfig``, ``use_dora``, ``LoHaConfig``, ``LoKrConfig``); ``alpha=None``
    means ``alpha = rank`` (scale 1)."""
    return peft_config(variant, rank, rank if alpha is None else alpha, list(target_modules), dropout,
                       rank_pattern, alpha_pattern)


def unet_lora_config(lora_cfg):
    """The UNet's peft config: ``target_modules``, plus with ``conv`` the LoCon targets (3x3 convs at ``conv_rank`` /
    ``conv_alpha``, whose default keeps the scale ``alpha / rank`` of the others)."""
    targets, ranks, alphas = list(lora_cfg.target_modules), {}, {}
    if lora_cfg.conv:
        targets += [t for t in CONV_TARGETS if t not in targets]
        alpha = lora_cfg.rank if lora_cfg.alpha is None else lora_cfg.alpha
        conv_rank = lora_cfg.conv_rank or lora_cfg.rank
        conv_alpha = conv_rank * alpha / lora_cfg.rank if lora_cfg.conv_alpha is None else lora_cfg.conv_alpha
        ranks = {re.escape(t): conv_rank for t in CONV_3X3}
        alphas = {re.escape(t): conv_alpha for t in CONV_3X3}
    return lora_config(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, targets, lora_cfg.variant, ranks, alphas)


def lora_parameters(model: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    """The adapter parameters (``lora_A/B``, DoRA magnitudes, ``hada_*``, ``lokr_*``) of a model; [] for None."""
    if model is None:
        return []
    return [p for n, p in model.named_parameters() if is_adapter_key(n)]


def add_lora(unet, text_encoder, lora_cfg) -> list[torch.nn.Parameter]:
    """Add adapters of ``lora_cfg.variant`` to ``unet`` (and ``text_encoder`` when ``lora_cfg.text_encoder``); return
    the trainable params.

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
    unet.add_adapter(unet_lora_config(lora_cfg))
    if text_encoder is not None:
        # transformers' PeftAdapterMixin; it also makes gradient checkpointing feed grads to the adapters
        text_encoder.add_adapter(lora_config(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout,
                                             lora_cfg.text_encoder_target_modules, lora_cfg.variant),
                                 adapter_name=ADAPTER)
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


def without_dropout_draws(model) -> None:
    """Put ``model``'s LoHa/LoKr layers in eval mode, for a meta-device trace (:mod:`latentsd.training.estimate`).

    In training mode their forward draws ``torch.rand(1)`` for module dropout, which a meta tensor cannot turn into
    a bool. The computation is the same: latentsd's LoHa/LoKr have no dropout (``lora.dropout`` is refused for them).
    """
    from peft.tuners.lycoris_utils import LycorisLayer

    for module in model.modules():
        if isinstance(module, LycorisLayer):
            module.eval()


# ---- state dicts -------------------------------------------------------------------------------------
_unwrap = unwrap  # accelerate/DDP/compile wrappers: peft state dicts need the bare module names


def _peft_state_dict(model, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """``<module>.lora_A.weight`` / ``hada_w1_a`` / … (adapter name stripped), detached fp32 CPU copies."""
    from peft.utils import get_peft_model_state_dict

    if not _has_adapter(model, adapter_name):
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r}: call add_lora first")
    sd = get_peft_model_state_dict(_unwrap(model), adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def lora_state_dicts(unet, text_encoder=None, adapter_name: str = ADAPTER) -> tuple[dict, dict | None]:
    """(unet, text encoder or None) adapter weights in diffusers naming, the keys diffusers' LoRA scripts save.

    From ``get_peft_model_state_dict``: LoRA/DoRA UNet ``<module>.lora.down.weight`` / ``.lora.up.weight``, text
    encoder ``text_model.<module>.lora_linear_layer.down.weight`` / ``.up.weight`` (DoRA adds
    ``lora_magnitude_vector``); LoHa/LoKr keep peft's names (``hada_w1_a``, ``lokr_w1``, …), which no diffusers
    converter renames. For the default attention targets this equals ``convert_state_dict_to_diffusers``; we rename
    *every* key, not just attention projections, because diffusers' UNet loader decides from the first key alone
    whether to convert the names, so a file mixing ``to_q.lora.down`` with ``proj_in.lora_A`` (what that function
    gives for other targets) loads only half its layers. A text encoder without adapters gives None.
    ``adapter_name``: peft's adapter (``add_lora`` makes "default"; ``load_lora_weights`` names them "default_0", …).
    """
    unet_sd = _rename(_peft_state_dict(unet, adapter_name), ".lora.down.", ".lora.up.")
    te_sd = None
    if text_encoder is not None and _has_adapter(text_encoder, adapter_name):
        # transformers 5 flattened CLIPTextModel (no `text_model.` submodule); write the classic names that
        # every SD LoRA on the hub has: diffusers strips the prefix again for a flat model, older stacks need it
        te_sd = {with_prefix(_magnitude_weight(k), "text_model."): v for k, v in _rename(
            _peft_state_dict(text_encoder, adapter_name), ".lora_linear_layer.down.", ".lora_linear_layer.up.").items()}
    return unet_sd, te_sd


def _magnitude_weight(key: str) -> str:
    """DoRA magnitudes of the text encoder as ``….lora_magnitude_vector.weight``: transformers 5's adapter loader
    (which diffusers uses for the text encoder) puts the adapter name before the last part, and the bare peft key
    (``….lora_magnitude_vector``) would miss the parameter ``….lora_magnitude_vector.<adapter>.weight``."""
    return key + ".weight" if key.endswith(".lora_magnitude_vector") else key


def _rename(sd: dict, down: str, up: str) -> dict:
    return {k.replace(".lora_A.", down).replace(".lora_B.", up): v for k, v in sd.items()}


def _json_targets(targets):
    """peft keeps target module names as a set (JSON has none) or one regex string."""
    return targets if isinstance(targets, str) else sorted(targets)


def _has_adapter(model, adapter_name: str = ADAPTER) -> bool:
    return adapter_name in (getattr(_unwrap(model), "peft_config", None) or {})


def _adapter_metadata(model) -> dict:
    """What diffusers (and :mod:`latentsd.adapter_formats`) rebuild the peft config from when loading.

    LoRA/DoRA: only the keys diffusers itself derives from a state dict (``get_peft_kwargs``), not the full
    ``LoraConfig.to_dict()``: ``LoraConfig(**metadata)`` must also work with older peft versions. LoHa/LoKr: their
    config's shape-defining keys and ``peft_type`` (diffusers' LoKr loader calls ``LoKrConfig(**metadata)``).
    """
    from peft import LoraConfig

    cfg = _unwrap(model).peft_config[ADAPTER]
    common = {"r": cfg.r, "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern),
              "target_modules": _json_targets(cfg.target_modules)}
    if not isinstance(cfg, LoraConfig):
        extra = {k: getattr(cfg, k) for k in ("decompose_both", "decompose_factor") if hasattr(cfg, k)}
        return {"peft_type": cfg.peft_type.value, "alpha": cfg.alpha, **common,
                "use_effective_conv2d": cfg.use_effective_conv2d, **extra}
    meta = {**common, "lora_alpha": cfg.lora_alpha, "use_dora": cfg.use_dora, "lora_bias": cfg.lora_bias}
    if cfg.use_rslora:
        meta["use_rslora"] = True
    return meta


# ---- export ------------------------------------------------------------------------------------------
def save_lora_diffusers(out_dir: str | Path, unet, text_encoder=None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` (diffusers/PEFT format) in ``dtype``; returns its path.

    LoRA and DoRA load with ``pipe.load_lora_weights(out_dir)`` in diffusers' ``StableDiffusionPipeline`` and ours;
    every variant loads with :func:`latentsd.loaders.load_lora_into_pipeline`. The file appears atomically
    (:mod:`latentsd.io`), so a reader or a crash never sees half a file; other files in ``out_dir`` are left alone.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet_sd, te_sd = (_cast(sd, dtype) for sd in lora_state_dicts(unet, text_encoder))

    def write(tmp: Path) -> None:  # diffusers writes save_directory / weight_name: the temp file itself
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            tmp.parent, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, safe_serialization=True,
            weight_name=tmp.name, unet_lora_adapter_metadata=_adapter_metadata(unet),
            text_encoder_lora_adapter_metadata=_adapter_metadata(text_encoder) if te_sd else None)

    return write_file_atomically(Path(out_dir) / DIFFUSERS_WEIGHT_NAME, write)


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """peft adapter layers (LoRA, DoRA, LoHa, LoKr) by module path (``down_blocks.0.….to_q``) carrying our adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in _unwrap(model).named_modules()
            if isinstance(m, BaseTunerLayer) and ADAPTER in getattr(m, "r", {})}


def kohya_state_dict(unet, text_encoder=None) -> dict[str, torch.Tensor]:
    """The adapter weights under kohya-ss / LyCORIS names (``lora_down`` = peft ``lora_A``, ``lora_up`` = ``lora_B``;
    ``dora_scale``, ``hada_*``, ``lokr_*``: :func:`latentsd.adapter_formats.kohya_tensors`).

    ``alpha`` is written so that kohya's ``alpha / r`` equals peft's scaling exactly (also for rsLoRA). Text-encoder
    names always say ``text_model_encoder_…``: transformers 5 dropped the ``text_model`` submodule, but A1111, kohya
    and diffusers' converter expect it.
    """
    out = {}
    parts = [("unet", unet)]
    if text_encoder is not None and _has_adapter(text_encoder):
        parts.append(("text_encoder", text_encoder))
    for part, model in parts:
        layers = _lora_layers(model)
        if not layers:
            raise ValueError(f"{type(model).__name__} has no LoRA adapter {ADAPTER!r}: call add_lora first")
        names = {path: kohya for kohya, path in kohya_module_names(model, part).items()}
        for name, layer in layers.items():
            out.update({f"{names[name]}.{suffix}": t for suffix, t in kohya_tensors(layer, ADAPTER).items()})
    return out


def save_lora_kohya(path: str | Path, unet, text_encoder=None, dtype: torch.dtype = torch.float32) -> Path:
    """Write one kohya-ss / LyCORIS ``.safetensors`` file (atomically) in ``dtype``; returns its path.

    Rank and alpha come from the adapters themselves (``metadata ss_network_dim / ss_network_alpha``), so they
    cannot disagree with the weights. LoRA loads with diffusers' ``pipe.load_lora_weights(path)`` and in
    A1111/ComfyUI; every variant loads with :func:`latentsd.loaders.load_lora_into_pipeline`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a kohya LoRA file must end in .safetensors, got {path}")
    sd = _cast(kohya_state_dict(unet, text_encoder), dtype)
    cfg = _unwrap(unet).peft_config[ADAPTER]
    alpha = getattr(cfg, "lora_alpha", getattr(cfg, "alpha", None))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.r), "ss_network_alpha": _number(alpha),
                "ss_text_encoder_lr_trained": str(any(k.startswith("lora_te_") for k in sd)).lower()}
    variant = _variant(cfg)
    if variant == "lora":
        _warn_if_diffusers_cannot_load_te(sd)
    else:  # LyCORIS' own metadata (its kohya wrapper); the keys alone tell A1111 / ComfyUI the algorithm
        args = {"algo": "lora" if variant == "dora" else variant, **({"dora_wd": True, "wd_on_out": True}
                                                                     if variant == "dora" else {})}
        metadata.update(ss_network_module="lycoris.kohya", ss_network_args=json.dumps(args))
    return write_file_atomically(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


def _variant(cfg) -> str:
    kind = cfg.peft_type.value.lower()
    return "dora" if kind == "lora" and cfg.use_dora else kind


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
    """``base`` in fp32 with ``adapted``'s adapters merged into each adapted weight; returns it.

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
            weight.copy_(merged_weight(layer, weight))
    return base


def merged_weight(layer, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (the fp32 base of a peft ``layer``) with the layer's adapter merged, as peft's ``merge`` does:
    ``W + ΔW``; DoRA: ``m / ‖W + ΔW‖ · (W + ΔW)``, the norm per output row."""
    merged = weight + layer.get_delta_weight(ADAPTER).to(weight.device, torch.float32)
    if not getattr(layer, "use_dora", {}).get(ADAPTER):
        return merged
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
    magnitude = layer.lora_magnitude_vector[ADAPTER].weight.to(weight.device, torch.float32).reshape(-1)  # conv: (1, out, 1, 1)
    return merged * (magnitude / norm).reshape(-1, *[1] * (merged.ndim - 1))


def _cpu_fp32_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``copy.deepcopy`` whose tensors are fp32 CPU copies (deepcopy's memo supplies them; tied weights stay tied)."""
    def fresh(t: torch.Tensor) -> torch.Tensor:  # copy=True: never share storage with the model (CPU fp32 already)
        return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)

    memo = {id(p): torch.nn.Parameter(fresh(p), requires_grad=False) for p in model.parameters()}
    memo.update({id(b): fresh(b) for b in model.buffers()})
    return copy.deepcopy(model, memo)
