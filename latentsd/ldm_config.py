"""The diffusers/transformers configs of an SD-1.x/2.x LDM single file, inferred from its tensors.

Shapes fix the architecture (channels, levels, layers per block, attention placement and depth, cross-attention
width, conv vs linear projections, in/out channels, the text encoder's width, depth, vocabulary and positions).
What no shape shows is filled in by layers, each overriding the one before:

1. SD conventions: 32 norm groups; UNet heads 8 (SD-1) or one per 64 channels (SD-2, linear projections); text
   heads one per 64 channels; CLIP (SD-1) ``quick_gelu``, OpenCLIP (SD-2) ``gelu``; VAE scaling 0.18215; our DDIM
   with SD's betas; prediction ``epsilon``, except SD-2 (an OpenCLIP text encoder) with a 4-channel UNet:
   ``v_prediction`` unless the checkpoint's ``global_step`` is 875000 (diffusers' rule: SD-2-base);
   512 px, 768 px for SD-2 v-prediction.
2. The file's own ``latentsd.*`` metadata (files written by :func:`latentsd.single_file.save_single_file` carry
   the full configs, so they load back exactly: norm groups, heads, scheduler, sample size, …).
3. ``original_config``, the model's LDM YAML (``num_heads`` / ``num_head_channels``, ``scale_factor``,
   ``parameterization``, ``linear_start`` / ``linear_end``, ``timesteps``).
4. The ``prediction_type`` argument.

The shapes themselves always win over every layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .ldm_keys import CLIP_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX

SD_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LDM_PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler")


@dataclass
class LdmCheckpoint:
    """The three models of an LDM state dict, each with its prefix removed."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    text_format: str  # "clip" (SD-1) or "open_clip" (SD-2)


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def split_checkpoint(state: dict[str, torch.Tensor], name: str = "the file") -> LdmCheckpoint:
    """Split a full LDM state dict; a clear error for anything that is not an SD-1.x/2.x checkpoint."""
    if any(k.startswith("conditioner.embedders.") for k in state):
        raise ValueError(f"{name} is an SDXL checkpoint; only SD-1.x/2.x single files are supported")
    unet, vae = _sub(state, UNET_PREFIX), _sub(state, VAE_PREFIX)
    clip, open_clip = _sub(state, CLIP_PREFIX), _sub(state, OPEN_CLIP_PREFIX)
    if not unet or not vae or not (clip or open_clip):
        missing = [p + "*" for p, part in ((UNET_PREFIX, unet), (VAE_PREFIX, vae)) if not part]
        missing += [] if clip or open_clip else [f"{CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}*"]
        sample = sorted(state)[:3]
        raise ValueError(f"{name} is not an SD-1.x/2.x LDM checkpoint (A1111 / ComfyUI layout): no "
                         f"{', '.join(missing)} "
                         f"keys (it starts with {sample}); a diffusers folder loads with from_pretrained instead")
    return LdmCheckpoint(unet, vae, clip or open_clip, "clip" if clip else "open_clip")


def _need(part: dict, name: str, *keys: str) -> None:
    missing = [k for k in keys if k not in part]
    if missing:
        raise ValueError(f"the file's {name} lacks {missing}: not an SD-1.x/2.x {name} (or a truncated export)")


def _count(part: dict, pattern: str) -> int:
    """Number of distinct indices ``N`` in keys matching ``pattern`` (a regex with one ``(\\d+)`` group)."""
    return len({int(m.group(1)) for k in part if (m := re.match(pattern, k))})


# ---- shapes --------------------------------------------------------------------------------------------
def unet_shapes(u: dict[str, torch.Tensor]) -> dict:
    _need(u, "UNet", "input_blocks.0.0.weight", "out.2.weight", "middle_block.1.proj_in.weight",
          "middle_block.1.transformer_blocks.0.attn2.to_k.weight")
    if any(k.startswith("label_emb") for k in u):
        raise ValueError("the file's UNet has class/label embeddings (SD-2 upscaler, unCLIP, SDXL): not supported")
    levels: list[list[tuple[int, int]]] = [[]]  # per level: (channels, transformer depth) of each resnet
    i = 1
    while True:
        if f"input_blocks.{i}.0.op.weight" in u:
            levels.append([])
        elif f"input_blocks.{i}.0.out_layers.3.weight" in u:
            depth = _count(u, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.")
            levels[-1].append((u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0], depth))
        else:
            break
        i += 1
    layers = {len(level) for level in levels}
    if len(layers) != 1 or 0 in layers:
        raise ValueError(f"the file's UNet has {[len(lv) for lv in levels]} resnets per level: not an SD UNet")
    per_level = layers.pop()
    depths = [level[0][1] for level in levels]
    up_attn = [_count(u, rf"output_blocks\.{b * (per_level + 1)}\.1\.transformer_blocks\.(\d+)\.") > 0
               for b in range(len(levels))]
    attn_depths = [d for d in depths if d]
    if len(set(attn_depths)) <= 1:  # one depth everywhere (SD: 1): diffusers' int form
        transformer_depth = attn_depths[0] if attn_depths else 1
    else:
        transformer_depth = [d or 1 for d in depths]
    return {
        "in_channels": u["input_blocks.0.0.weight"].shape[1],
        "out_channels": u["out.2.weight"].shape[0],
        "block_out_channels": [level[0][0] for level in levels],
        "layers_per_block": per_level,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "transformer_layers_per_block": transformer_depth,
        "cross_attention_dim": u["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "use_linear_projection": u["middle_block.1.proj_in.weight"].ndim == 2,
    }


def vae_shapes(v: dict[str, torch.Tensor]) -> dict:
    _need(v, "VAE", "encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
          "encoder.down.0.block.0.conv2.weight")
    levels = _count(v, r"encoder\.down\.(\d+)\.block\.0\.conv2\.weight")
    return {
        "in_channels": v["encoder.conv_in.weight"].shape[1],
        "out_channels": v["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)],
        "layers_per_block": _count(v, r"encoder\.down\.0\.block\.(\d+)\.conv2\.weight"),
        "latent_channels": v["decoder.conv_in.weight"].shape[1],
        "use_quant_conv": "quant_conv.weight" in v,
        "use_post_quant_conv": "post_quant_conv.weight" in v,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in v,
    }


def text_shapes(t: dict[str, torch.Tensor], text_format: str) -> dict:
    if text_format == "clip":
        _need(t, "text encoder", "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
              "encoder.layers.0.mlp.fc1.weight")
        embed, positions = t["embeddings.token_embedding.weight"], t["embeddings.position_embedding.weight"]
        layers = _count(t, r"encoder\.layers\.(\d+)\.mlp\.fc1\.weight")
        mlp = t["encoder.layers.0.mlp.fc1.weight"]
    else:
        _need(t, "text encoder", "token_embedding.weight", "positional_embedding",
              "transformer.resblocks.0.mlp.c_fc.weight")
        embed, positions = t["token_embedding.weight"], t["positional_embedding"]
        layers = _count(t, r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.weight")
        if layers > 24:
            raise ValueError(f"the file's OpenCLIP text encoder has {layers} layers: not SD-2's (24)")
        layers = min(layers, 23)  # diffusers drops SD-2's 24th block: SD-2 conditions on the penultimate layer
        mlp = t["transformer.resblocks.0.mlp.c_fc.weight"]
    return {"vocab_size": embed.shape[0], "hidden_size": embed.shape[1], "max_position_embeddings": positions.shape[0],
            "num_hidden_layers": layers, "intermediate_size": mlp.shape[0]}


# ---- layers of hints -----------------------------------------------------------------------------------
def _heads(width: int) -> int:
    return max(1, width // 64)


def default_prediction_type(ckpt: LdmCheckpoint, in_channels: int, global_step: int | None) -> str:
    sd2 = ckpt.text_format == "open_clip" and in_channels == 4
    return "v_prediction" if sd2 and global_step != 875000 else "epsilon"


def conventions(ckpt: LdmCheckpoint, shapes: dict, prediction_type: str) -> dict:
    unet, text = shapes["unet"], shapes["text_encoder"]
    sd2 = ckpt.text_format == "open_clip"
    image = 768 if sd2 and prediction_type == "v_prediction" else 512
    factor = 2 ** (len(shapes["vae"]["block_out_channels"]) - 1)
    heads = [_heads(c) for c in unet["block_out_channels"]] if unet["use_linear_projection"] else 8
    projection = ckpt.text.get("text_projection")
    return {
        "unet": {"norm_num_groups": 32, "attention_head_dim": heads, "sample_size": image // factor},
        "vae": {"norm_num_groups": 32, "scaling_factor": 0.18215, "sample_size": image},
        "text_encoder": {"hidden_act": "gelu" if sd2 else "quick_gelu",
                         "num_attention_heads": _heads(text["hidden_size"]),
                         # not a weight of CLIPTextModel; SD-2.1's diffusers config says 512
                         "projection_dim": projection.shape[1] if projection is not None else
                         512 if sd2 else text["hidden_size"]},
    }


def read_original_config(original_config: str | Path | dict | None) -> dict | None:
    if original_config is None or isinstance(original_config, dict):
        return original_config
    import yaml

    path = Path(original_config)
    if not path.is_file():
        raise FileNotFoundError(f"original_config {path} does not exist: pass the model's LDM YAML "
                                "(e.g. v1-inference.yaml) or leave it out to infer the architecture")
    return yaml.safe_load(path.read_text())


def yaml_hints(original: dict) -> dict:
    """The facts an LDM YAML adds to the shapes (heads, scale factor, parameterization, betas)."""
    try:
        params = original["model"]["params"]
        unet = params["unet_config"]["params"]
    except (KeyError, TypeError):
        raise ValueError("original_config is not an LDM model config (no model.params.unet_config.params): pass "
                         "the YAML the checkpoint was made with, e.g. v1-inference.yaml") from None
    hints = {"unet": {"norm_num_groups": 32}, "vae": {"norm_num_groups": 32}, "scheduler": {}, "text_encoder": {}}
    head_channels, heads = unet.get("num_head_channels", -1), unet.get("num_heads", -1)
    if head_channels and head_channels > 0:  # LDM: num_head_channels wins over num_heads when set
        channels = [unet["model_channels"] * m for m in unet["channel_mult"]]
        hints["unet"]["attention_head_dim"] = [c // head_channels for c in channels]
    elif heads and heads > 0:
        hints["unet"]["attention_head_dim"] = heads
    if "scale_factor" in params:
        hints["vae"]["scaling_factor"] = params["scale_factor"]
    if "parameterization" in params:
        if params["parameterization"] not in LDM_PARAMETERIZATION:
            raise ValueError(f"original_config: unknown parameterization {params['parameterization']!r}; "
                             f"known: {list(LDM_PARAMETERIZATION)}")
        hints["scheduler"]["prediction_type"] = LDM_PARAMETERIZATION[params["parameterization"]]
    for ldm, ours in (("linear_start", "beta_start"), ("linear_end", "beta_end"), ("timesteps", "num_train_timesteps")):
        if ldm in params:
            hints["scheduler"][ours] = params[ldm]
    return hints


def resolve_configs(ckpt: LdmCheckpoint, metadata: dict | None = None, original_config: dict | None = None,
                    prediction_type: str | None = None, global_step: int | None = None) -> dict[str, dict]:
    """``{"unet", "vae", "text_encoder", "scheduler"}`` configs: conventions < metadata < YAML < argument < shapes."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")
    metadata = metadata or {}
    shapes = {"unet": unet_shapes(ckpt.unet), "vae": vae_shapes(ckpt.vae),
              "text_encoder": text_shapes(ckpt.text, ckpt.text_format)}
    yaml_layer = yaml_hints(original_config) if original_config is not None else {}
    scheduler = dict(metadata.get("scheduler") or SD_SCHEDULER)
    if "scheduler" not in metadata:
        scheduler["prediction_type"] = default_prediction_type(ckpt, shapes["unet"]["in_channels"], global_step)
    scheduler.update(yaml_layer.get("scheduler", {}))
    if prediction_type is not None:
        scheduler["prediction_type"] = prediction_type
    base = conventions(ckpt, shapes, scheduler["prediction_type"])
    configs = {name: {**base[name], **metadata.get(name, {}), **yaml_layer.get(name, {}), **shapes[name]}
               for name in ("unet", "vae", "text_encoder")}
    return {**configs, "scheduler": scheduler}
