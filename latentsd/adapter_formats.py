"""LoRA-family adapters in files: which variant a state dict holds, kohya/LyCORIS names, and peft loading.

The variants are peft tuners; per adapted module ``<m>`` they hold (the kohya/LyCORIS file uses the names A1111,
ComfyUI and LyCORIS read, each module with an ``alpha`` whose ``alpha / rank`` is the scale):

============  =============================================  =========================================================
variant       peft parameters of ``<m>``                     kohya / LyCORIS keys ``lora_unet_<m_with_underscores>.*``
============  =============================================  =========================================================
lora          ``lora_A``, ``lora_B``                         ``lora_down.weight``, ``lora_up.weight``, ``alpha``
dora          + ``lora_magnitude_vector`` (one per row)      + ``dora_scale`` shaped ``(out, 1, …)`` (LyCORIS wd_on_out)
loha          ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a/b``  the same names, ``alpha``
lokr          ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2``    the same names; the scale is baked into ``lokr_w1`` and
              or ``lokr_w2_a/b``                             ``alpha`` = rank (LyCORIS ignores alpha for full factors)
============  =============================================  =========================================================

diffusers' ``load_lora_weights`` reads LoRA (both layouts) and DoRA (PEFT layout only: it drops ``dora_scale`` from
kohya files); everything else is loaded here through peft (:func:`load_adapter_file`). Generation-side code: no
training imports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

VARIANTS = ("lora", "dora", "loha", "lokr")
_MARKERS = {"lokr": ".lokr_", "loha": ".hada_"}
ADAPTER_MARKERS = (".lora_", ".hada_", ".lokr_")  # in every adapter parameter's name, in no base weight's
TEXT_MODEL = "text_model."  # the classic CLIP prefix every SD LoRA file uses (transformers 5 dropped the submodule)
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def is_adapter_key(name: str) -> bool:
    """A parameter (or state-dict key) of a peft LoRA/DoRA/LoHa/LoKr adapter, not of the base model."""
    return any(marker in name for marker in ADAPTER_MARKERS)


def variant_of(keys) -> str:
    """``lora`` / ``dora`` / ``loha`` / ``lokr`` from the keys of a state dict (peft, diffusers or kohya layout)."""
    keys = list(keys)
    for variant, marker in _MARKERS.items():
        if any(marker in k for k in keys):
            return variant
    return "dora" if any(k.endswith(("lora_magnitude_vector", ".dora_scale")) or ".lora_magnitude_vector." in k
                         for k in keys) else "lora"


def with_prefix(name: str, prefix: str) -> str:
    return name if name.startswith(prefix) else prefix + name


def unwrap(model):
    """Accept accelerate/DDP/compile wrappers: peft state dicts need the bare module names."""
    while True:
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def kohya_module_names(model, part: str) -> dict[str, str]:
    """``{kohya name: module path}`` for every module of ``model`` (``part``: ``unet`` or ``text_encoder``)."""
    need = TEXT_MODEL if part == "text_encoder" else ""
    return {KOHYA_PREFIXES[part] + with_prefix(name, need).replace(".", "_"): name
            for name, _ in unwrap(model).named_modules() if name}


# ---- a peft layer <-> kohya / LyCORIS tensors ------------------------------------------------------------
def kohya_tensors(layer, adapter: str) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors (suffix → fp32 CPU tensor) of one peft layer's adapter, computing the same weight."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    def cpu(t):
        return t.detach().to("cpu", torch.float32).contiguous()

    scale, rank = float(layer.scaling[adapter]), layer.r[adapter]
    if isinstance(layer, LoHaLayer):
        out = {name: cpu(getattr(layer, name)[adapter]) for name in layer.adapter_layer_names
               if adapter in getattr(layer, name)}
        return {**out, "alpha": torch.tensor(scale * rank)}
    if isinstance(layer, LoKrLayer):
        out = {name: cpu(getattr(layer, name)[adapter]) for name in layer.adapter_layer_names
               if adapter in getattr(layer, name)}
        first = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
        out[first] = out[first] * scale  # kron is linear in w1: the whole scale, so alpha / rank = 1 everywhere
        return {**out, "alpha": torch.tensor(float(rank))}
    out = {"lora_down.weight": cpu(layer.lora_A[adapter].weight), "lora_up.weight": cpu(layer.lora_B[adapter].weight),
           "alpha": torch.tensor(scale * rank)}
    if layer.use_dora.get(adapter):
        ndim = layer.get_base_layer().weight.ndim
        magnitude = cpu(layer.lora_magnitude_vector[adapter].weight)
        out["dora_scale"] = magnitude.reshape(-1, *[1] * (ndim - 1))
    return out


def _module_config(variant: str, suffixes: dict[str, torch.Tensor], module: str) -> tuple[int, float, bool]:
    """(peft rank, peft alpha, decompose_both) that make peft build ``module``'s adapter with these tensors."""
    alpha = suffixes.get("alpha")
    if variant in ("lora", "dora"):
        rank = suffixes["lora_down.weight"].shape[0]
        return rank, float(alpha) if alpha is not None else float(rank), False
    if variant == "loha":
        rank = suffixes["hada_w1_b"].shape[0]
        return rank, float(alpha) if alpha is not None else float(rank), False
    decomposed = [suffixes[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in suffixes]
    if decomposed:  # LyCORIS: scale alpha / rank only for a rank-decomposed factor
        rank = decomposed[0]
        return rank, float(alpha) if alpha is not None else float(rank), "lokr_w1_b" in suffixes
    if "lokr_w2" not in suffixes:
        raise ValueError(f"LoKr module {module} has neither lokr_w2 nor lokr_w2_a/b")
    rank = max(suffixes["lokr_w2"].shape[:2])  # large enough that peft makes a full lokr_w2; scale 1 as in LyCORIS
    return rank, float(rank), False


def _peft_tensors(variant: str, suffixes: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """One module's kohya tensors under peft's names (``<module>.lora_A.weight``, ``<module>.hada_w1_a``, ...)."""
    if variant in ("loha", "lokr"):
        return {f"{module}.{k}": v for k, v in suffixes.items() if k != "alpha"}
    out = {f"{module}.lora_A.weight": suffixes["lora_down.weight"], f"{module}.lora_B.weight": suffixes["lora_up.weight"]}
    if "dora_scale" in suffixes:
        scale = suffixes["dora_scale"]
        out_features = suffixes["lora_up.weight"].shape[0]
        if scale.shape[0] != out_features or scale.numel() != out_features:
            raise ValueError(f"{module}: dora_scale of shape {tuple(scale.shape)} decomposes the input axis (LyCORIS "
                             "wd_on_out=False); peft and diffusers decompose per output row: re-train with "
                             "wd_on_out=True or merge the DoRA into the model in the tool that made it")
        out[f"{module}.lora_magnitude_vector"] = scale.reshape(-1)
    return out


# ---- peft configs ------------------------------------------------------------------------------------------
def peft_config(variant: str, rank: int, alpha: float, targets, dropout: float = 0.0, rank_pattern=None,
                alpha_pattern=None, decompose_both: bool = False, init: bool = True):
    """The peft config of a variant: ``LoraConfig`` (``use_dora`` for dora), ``LoHaConfig`` or ``LoKrConfig``."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    common = {"r": rank, "target_modules": targets, "rank_pattern": dict(rank_pattern or {}),
              "alpha_pattern": dict(alpha_pattern or {})}
    if variant in ("lora", "dora"):
        return LoraConfig(lora_alpha=alpha, lora_dropout=dropout, use_dora=variant == "dora",
                          init_lora_weights="gaussian" if init else True, **common)
    if dropout:
        raise ValueError(f"{variant} has no input dropout in peft: set lora.dropout=0")
    if variant == "loha":
        return LoHaConfig(alpha=alpha, **common)
    if variant == "lokr":
        return LoKrConfig(alpha=alpha, decompose_both=decompose_both, **common)
    raise ValueError(f"unknown LoRA variant {variant!r}: choose one of {', '.join(VARIANTS)}")


def _exact(name: str) -> str:
    """A peft rank/alpha pattern matching exactly the module ``name`` (peft matches ``(.*\\.)?(pattern)$``)."""
    return "^" + re.escape(name)


def config_from_modules(variant: str, modules: dict[str, dict[str, torch.Tensor]]):
    """A peft config adapting exactly ``modules`` (``{path: {kohya suffix: tensor}}``), each with its rank and alpha."""
    per = {m: _module_config(variant, s, m) for m, s in modules.items()}
    rank, alpha, both = next(iter(per.values()))
    if any(b != both for _, _, b in per.values()):
        raise ValueError("a LoKr file that decomposes w1 in some modules only cannot be loaded by peft")
    targets = "|".join(re.escape(m) for m in sorted(modules))  # a string: peft full-matches it, name by name
    return peft_config(variant, rank, alpha, targets, rank_pattern={_exact(m): r for m, (r, _, _) in per.items()},
                       alpha_pattern={_exact(m): a for m, (_, a, _) in per.items()}, decompose_both=both)


def config_from_metadata(meta: dict):
    """The peft config an export's ``lora_adapter_metadata`` describes (one model's entries, prefix stripped)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    meta = dict(meta)
    cls = {"LOHA": LoHaConfig, "LOKR": LoKrConfig}.get(str(meta.pop("peft_type", "LORA")).upper(), LoraConfig)
    return cls(**meta)


# ---- loading a file into a pipeline through peft -----------------------------------------------------------
def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter metadata by model: ``{"unet": {...}, "text_encoder": {...}}``) of a ``.safetensors`` file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    by_model: dict[str, dict] = {}
    for key, value in (json.loads(raw) if raw else {}).items():
        part, _, name = key.partition(".")
        by_model.setdefault(part, {})[name] = value
    return tensors, by_model


def is_kohya(keys) -> bool:
    return all(k.startswith(tuple(KOHYA_PREFIXES.values())) for k in keys)


def diffusers_loads(tensors: dict) -> bool:
    """Whether diffusers' ``load_lora_weights`` reproduces this file: LoRA in any layout, DoRA in the PEFT layout."""
    variant = variant_of(tensors)
    return variant == "lora" or (variant == "dora" and not is_kohya(tensors))


def load_adapter_file(pipe, path: str | Path, adapter_name: str) -> None:
    """Add the adapters of a LoRA/DoRA/LoHa/LoKr file (PEFT/diffusers or kohya/LyCORIS layout) to ``pipe``'s UNet
    and text encoder under ``adapter_name``, through peft; every tensor of the file must land in the model."""
    tensors, metadata = read_adapter_file(path)
    kohya = is_kohya(tensors)
    variant = variant_of(tensors)
    found = False
    for part in ("unet", "text_encoder"):
        model = getattr(pipe, part, None)
        if model is None:
            continue
        config, sd = (_from_kohya(model, part, variant, tensors) if kohya
                      else _from_peft_layout(model, part, tensors, metadata.get(part)))
        if sd:
            inject_adapter(model, config, sd, adapter_name)
            found = True
    if not found:
        raise ValueError(f"{path} holds no adapter for the UNet or the text encoder (keys like {next(iter(tensors))})")


def _from_kohya(model, part: str, variant: str, tensors: dict):
    names = kohya_module_names(model, part)
    modules: dict[str, dict] = {}
    prefix = KOHYA_PREFIXES[part]
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        kohya_name, _, suffix = key.partition(".")
        if kohya_name not in names:
            raise ValueError(f"{key}: the {type(unwrap(model)).__name__} has no module {kohya_name[len(prefix):]} "
                             "(a LoRA for another model architecture?)")
        modules.setdefault(names[kohya_name], {})[suffix] = value
    if not modules:
        return None, {}
    sd = {k: v for m, s in modules.items() for k, v in _peft_tensors(variant, s, m).items()}
    return config_from_modules(variant, modules), sd


def _from_peft_layout(model, part: str, tensors: dict, meta: dict | None):
    """``unet.<m>.<param>`` / ``text_encoder.[text_model.]<m>.<param>`` keys with the peft config in the metadata."""
    lead = f"{part}."
    flat = not hasattr(unwrap(model), "text_model")  # transformers 5 CLIP: no text_model submodule
    sd = {}
    for key, value in tensors.items():
        if key.startswith(lead):
            name = key[len(lead):]
            sd[name[len(TEXT_MODEL):] if flat and name.startswith(TEXT_MODEL) else name] = value
    if not sd:
        return None, {}
    if not meta:
        raise ValueError(f"the {part} adapters of this file have no lora_adapter_metadata: peft cannot rebuild their "
                         "config (export it again with latentsd, or load it in the tool that wrote it)")
    return config_from_metadata(meta), sd


def inject_adapter(model, config, state_dict: dict, adapter_name: str) -> None:
    """``model.add_adapter(config)`` then the file's tensors into it; an error if any tensor has no place."""
    from peft.utils import set_peft_model_state_dict

    bare = unwrap(model)
    bare.add_adapter(config, adapter_name=adapter_name)
    for key, value in list(state_dict.items()):  # DoRA magnitudes: peft shapes a conv's (1, out, 1, 1)
        if key.endswith(".lora_magnitude_vector"):
            target = bare.get_submodule(key.removesuffix(".lora_magnitude_vector")).lora_magnitude_vector[adapter_name]
            state_dict[key] = value.reshape(target.weight.shape)
    result = set_peft_model_state_dict(bare, state_dict, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if is_adapter_key(k)]
    missing = [k for k in getattr(result, "missing_keys", []) if is_adapter_key(k) and f".{adapter_name}" in k]
    if unexpected or missing:
        raise ValueError(f"the adapter file does not fit the {type(bare).__name__}: unexpected {unexpected[:3]}, "
                         f"missing {missing[:3]}")
