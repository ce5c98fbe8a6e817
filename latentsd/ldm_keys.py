"""diffusers → LDM (CompVis / A1111 / ComfyUI) state-dict keys: the exact inverse of diffusers' own mapping.

diffusers ships only the LDM → diffusers direction (``diffusers.loaders.single_file_utils.convert_ldm_*``);
this module writes the other one, rule by rule, so that a folder written out as a single file and read back
with those converters gives every tensor back bit for bit (tested). Prefixes inside the file:

* ``model.diffusion_model.``  the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``)
* ``first_stage_model.``      the VAE (``encoder.down.N.block.M`` …, 1×1-conv attention weights)
* ``cond_stage_model.transformer.text_model.``  SD-1's CLIP text encoder (the transformers layout)
* ``cond_stage_model.model.``                   SD-2's OpenCLIP text encoder (``resblocks``, fused q/k/v)
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module path of ``rest`` (``norm1.weight`` → ``in_layers.0.weight``) by ``table``."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unmapped(part: str, key: str) -> ValueError:
    return ValueError(f"the {part} has a weight {key!r} with no place in the LDM single-file layout (SD-1.x/2.x "
                      "only: no extra embeddings, adapters or other block types); export a plain SD-1/2 model")


# ---- UNet ----------------------------------------------------------------------------------------------
def unet_to_ldm(state_dict: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel`` state dict → LDM keys (without the ``model.diffusion_model.`` prefix)."""
    fixed = {d: ldm for d, ldm in DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()}
    up_has_attention = {int(m.group(1)) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, tensor in state_dict.items():
        new = fixed.get(key) or _unet_block_key(key, layers_per_block + 1, up_has_attention)
        if new is None:
            raise _unmapped("UNet", key)
        out[new] = tensor
    return out


def _unet_block_key(key: str, per_level: int, up_has_attention: set[int]) -> str | None:
    """``per_level`` = layers_per_block + 1: the LDM blocks one level of the UNet spans."""
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0.{_rename_head(m[3], RESNET)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_head(m[2], RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{_rename_head(m[3], RESNET)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        slot = 2 if int(m[1]) in up_has_attention else 1  # after the attention when the level has one
        return f"output_blocks.{int(m[1]) * per_level + per_level - 1}.{slot}.conv.{m[2]}"
    return None


# ---- VAE -----------------------------------------------------------------------------------------------
def vae_to_ldm(state_dict: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` state dict → LDM keys (no ``first_stage_model.``); attention weights as 1×1 convs."""
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
    out = {}
    for key, tensor in state_dict.items():
        new = fixed.get(key) or _vae_block_key(key, num_levels)
        if new is None:
            raise _unmapped("VAE", key)
        if ".mid.attn_1." in new and new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1×1 convolutions
        out[new] = tensor
    return out


def _vae_block_key(key: str, num_levels: int) -> str | None:
    shortcut = {"conv_shortcut": "nin_shortcut"}
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_head(m[3], shortcut)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):  # LDM counts up from the bottom
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{_rename_head(m[3], shortcut)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename_head(m[2], VAE_ATTENTION)}"
    return None


# ---- text encoders -------------------------------------------------------------------------------------
def _text_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` keys without ``text_model.`` (transformers ≥ 5.6 flattened the model; older ones nest it)."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items() if k != "text_model.embeddings.position_ids"
            and k != "embeddings.position_ids"}


def clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD-1: a ``CLIPTextModel`` state dict → full LDM keys (``cond_stage_model.transformer.text_model.*``)."""
    return {CLIP_PREFIX + k: v for k, v in _text_keys(state_dict).items()}


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD-2: a ``CLIPTextModel`` state dict → full OpenCLIP LDM keys (``cond_stage_model.model.*``, fused q/k/v)."""
    out, fused = {}, {}
    for key, tensor in _text_keys(state_dict).items():
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_PREFIX + OPEN_CLIP_TOP[key]] = tensor
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((int(m[1]), m[3]), {})[m[2]] = tensor
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            rest = _rename_head(m[2], OPEN_CLIP_LAYER)
            if rest == m[2]:
                raise _unmapped("text encoder", key)
            out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{m[1]}.{rest}"] = tensor
        elif key == "text_projection.weight":  # CLIPTextModelWithProjection: OpenCLIP stores x @ P
            out[OPEN_CLIP_PREFIX + "text_projection"] = tensor.T
        else:
            raise _unmapped("text encoder", key)
    for (layer, kind), qkv in fused.items():
        if set(qkv) != {"q", "k", "v"}:
            raise ValueError(f"text encoder layer {layer} lacks some of q/k/v {kind}: {sorted(qkv)}")
        out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = \
            torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out
