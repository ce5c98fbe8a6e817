"""Single files in the LDM layout (A1111 / ComfyUI): export, import, and diffusers' own loader as the reference."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from latentsd import DDIMScheduler, LatentDiffusionPipeline
from latentsd.cli import main
from latentsd.ldm_config import resolve_configs, split_checkpoint
from latentsd.ldm_keys import OPEN_CLIP_PREFIX
from latentsd.models import build_components, load_model_config
from latentsd.single_file import ldm_state_dict, load_single_file, read_checkpoint, save_single_file

COMPONENTS = ("unet", "vae", "text_encoder")


# ---- model variants ------------------------------------------------------------------------------------
def sd2_config():
    """Tiny SD-2 style: linear projections, OpenCLIP-layout (gelu) text encoder, v-prediction."""
    cfg = load_model_config("tiny")
    cfg["unet"].update(use_linear_projection=True, attention_head_dim=[2, 4])
    cfg["text_encoder"]["hidden_act"] = "gelu"
    cfg["scheduler"]["prediction_type"] = "v_prediction"
    return cfg


def plain_config():
    """Tiny but following SD's conventions (32 norm groups, 8 UNet heads, 64-channel text heads): no hints needed."""
    cfg = load_model_config("tiny")
    cfg["unet"].update(norm_num_groups=32, cross_attention_dim=64)
    cfg["vae"].update(block_out_channels=[32, 32, 32, 32], norm_num_groups=32)
    cfg["text_encoder"].update(hidden_size=64, intermediate_size=128, num_attention_heads=1, projection_dim=64)
    return cfg


def plain_sd2_config():
    """``plain_config`` in SD-2's conventions: linear projections, one head per 64 channels, gelu, v-prediction."""
    cfg = plain_config()
    cfg["unet"].update(use_linear_projection=True, attention_head_dim=[1, 1])
    cfg["text_encoder"].update(hidden_act="gelu", projection_dim=512)
    cfg["scheduler"]["prediction_type"] = "v_prediction"
    return cfg


def inpainting_config():
    cfg = plain_config()
    cfg["unet"]["in_channels"] = 9
    return cfg


def _save(cfg, path):
    LatentDiffusionPipeline(**build_components(cfg).as_dict()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    return _save(sd2_config(), tmp_path_factory.mktemp("sd2"))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def plain_dir(request, tmp_path_factory):
    cfg = plain_config() if request.param == "sd1" else plain_sd2_config()
    return _save(cfg, tmp_path_factory.mktemp(f"plain_{request.param}"))


@pytest.fixture(params=["sd1", "sd2"])
def model_dir(request, tiny_model_dir, sd2_dir):
    return tiny_model_dir if request.param == "sd1" else sd2_dir


# ---- helpers -------------------------------------------------------------------------------------------
def _images(pipe, **kw):
    return pipe("a red circle on the left", num_inference_steps=3, guidance_scale=2.0, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


def _public(config):
    """A config's architecture keys: diffusers' FrozenDict or transformers' config, without bookkeeping entries."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    bookkeeping = ("transformers_version", "architectures", "dtype", "torch_dtype")
    return {k: v for k, v in items.items() if not k.startswith("_") and k not in bookkeeping}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]


def _configs_only(folder, dst):
    """The folder without its weights: what diffusers' from_single_file(config=...) reads besides the file."""
    return shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))


def _without_metadata(src, dst):
    save_file(load_file(str(src)), str(dst))
    return dst


def _diffusers_text_weights(text_encoder, state):
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
        weights = sfu.convert_open_clip_checkpoint(text_encoder, state, prefix=OPEN_CLIP_PREFIX)
    else:
        weights = sfu.convert_ldm_clip_checkpoint(state)
    return {k.removeprefix("text_model."): v for k, v in weights.items()}


# ---- the key mapping -----------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [load_model_config("tiny"), sd2_config(), inpainting_config()],
                         ids=["sd1", "sd2", "inpainting"])
def test_every_tensor_round_trips_through_diffusers_converters(config):
    parts = build_components(config)
    state = ldm_state_dict(parts.unet, parts.vae, parts.text_encoder)
    back = {"unet": sfu.convert_ldm_unet_checkpoint(state, dict(parts.unet.config)),
            "vae": sfu.convert_ldm_vae_checkpoint(state, dict(parts.vae.config)),
            "text_encoder": _diffusers_text_weights(parts.text_encoder, state)}
    for name in COMPONENTS:
        original = getattr(parts, name).state_dict()
        assert back[name].keys() == original.keys(), name
        assert all(torch.equal(back[name][k], original[k]) for k in original), name


# Keys that LDM's own modules (openaimodel.UNetModel, model.Encoder/Decoder) give SD: a level's Upsample follows its
# SpatialTransformer (slot 2) or, without one, its ResBlock (slot 1); Downsample opens its own input block; the
# decoder counts levels from the bottom and the lowest one has no Upsample.
_UNET = ["input_blocks.3.0.op.weight", "input_blocks.9.0.op.weight", "output_blocks.2.1.conv.weight",
         "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight", "middle_block.2.out_layers.3.weight",
         "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight", "time_embed.2.weight", "out.2.weight"]
_VAE = ["encoder.down.0.downsample.conv.weight", "decoder.up.3.upsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight", "quant_conv.weight"]
_COMMON = [f"model.diffusion_model.{k}" for k in _UNET] + [f"first_stage_model.{k}" for k in _VAE]
LDM_LAYOUT = {"v1": _COMMON + ["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                               "cond_stage_model.transformer.text_model.final_layer_norm.weight"],
              "v2": _COMMON + ["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight",
                               "cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.weight",
                               "cond_stage_model.model.ln_final.weight", "cond_stage_model.model.positional_embedding"]}
NOT_IN_LDM_LAYOUT = ["model.diffusion_model.output_blocks.5.1.conv.weight",
                     "first_stage_model.decoder.up.0.upsample.conv.weight",
                     "first_stage_model.encoder.down.3.downsample.conv.weight"]


def _sd_size_models(cfg):
    with init_empty_weights():  # SD-sized on the meta device: shapes only, no memory, milliseconds
        return (UNet2DConditionModel(**cfg["unet"]), AutoencoderKL(**cfg["vae"]),
                CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])))


def _sd21_config():
    cfg = load_model_config("sd15")  # SD-2.1's diffusers configs differ from SD-1.5's in these keys
    cfg["unet"].update(attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, cross_attention_dim=1024,
                       sample_size=96)
    cfg["vae"]["sample_size"] = 768
    cfg["text_encoder"].update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                               num_attention_heads=16, hidden_act="gelu", projection_dim=512)
    return cfg


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_sd_sized_files_are_what_diffusers_detects_and_their_configs_are_inferred(family):
    cfg = load_model_config("sd15") if family == "v1" else _sd21_config()
    unet, vae, text_encoder = _sd_size_models(cfg)
    state = ldm_state_dict(unet, vae, text_encoder)
    assert sfu.infer_diffusers_model_type(state) == family  # diffusers recognises the layout
    for proj in ("q", "k", "v", "proj_out"):  # LDM's VAE attention projections are 1x1 convolutions (AttnBlock)
        assert state[f"first_stage_model.decoder.mid.attn_1.{proj}.weight"].shape == (512, 512, 1, 1)
    assert set(LDM_LAYOUT[family]) <= set(state), sorted(set(LDM_LAYOUT[family]) - set(state))
    assert not set(NOT_IN_LDM_LAYOUT) & set(state)
    back = sfu.convert_ldm_unet_checkpoint(state, dict(unet.config))
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    inferred = resolve_configs(split_checkpoint(state))  # no metadata: shapes + SD conventions
    for name, module in (("unet", unet), ("vae", vae)):
        assert {k: v for k, v in inferred[name].items()} == {k: module.config[k] for k in inferred[name]}, name
    assert inferred["text_encoder"] == {k: getattr(text_encoder.config, k) for k in inferred["text_encoder"]}
    expected = "epsilon" if family == "v1" else "v_prediction"  # diffusers' rule for SD-2 files
    assert inferred["scheduler"]["prediction_type"] == expected


# ---- folder → file → ours and diffusers ----------------------------------------------------------------
def test_folder_to_file_to_ours_and_diffusers_gives_the_folders_images(model_dir, tmp_path):
    folder = LatentDiffusionPipeline.from_pretrained(model_dir)
    path = save_single_file(model_dir, tmp_path / "model.safetensors")
    ours = LatentDiffusionPipeline.from_single_file(path)
    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(_configs_only(model_dir, tmp_path / "cfg")),
                                                      local_files_only=True)
    for name in COMPONENTS:
        _assert_same_weights(getattr(ours, name), getattr(folder, name))
        assert _public(getattr(ours, name).config) == _public(getattr(folder, name).config), name
    assert type(ours.scheduler) is type(folder.scheduler)
    assert _public(ours.scheduler.config) == _public(folder.scheduler.config)
    expected = _images(folder)
    np.testing.assert_allclose(_images(ours), expected, atol=1e-4)
    np.testing.assert_allclose(_images(theirs), expected, atol=1e-4)


def test_a_file_without_metadata_loads_from_shapes_and_sd_conventions(plain_dir, tmp_path):
    """The layout another tool writes: no latentsd hints, only tensors (SD-1 and SD-2 conventions)."""
    folder = LatentDiffusionPipeline.from_pretrained(plain_dir)
    sd2 = folder.text_encoder.config.hidden_act == "gelu"
    path = _without_metadata(save_single_file(plain_dir, tmp_path / "m.safetensors"), tmp_path / "bare.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert (f"{OPEN_CLIP_PREFIX}transformer.resblocks.0.attn.in_proj_weight" in f.keys()) == sd2
        assert not f.metadata() or not any(k.startswith("latentsd.") for k in f.metadata())
    bare = LatentDiffusionPipeline.from_single_file(path)
    for name in COMPONENTS:
        _assert_same_weights(getattr(bare, name), getattr(folder, name))
        got, want = _public(getattr(bare, name).config), _public(getattr(folder, name).config)
        assert {k: v for k, v in got.items() if k != "sample_size"} == \
            {k: v for k, v in want.items() if k != "sample_size"}, name
    native = 768 if sd2 else 512  # SD-2 v-prediction models are 768 px, SD-1 512 px
    assert bare.unet.config.sample_size * 8 == bare.vae.config.sample_size == native
    assert isinstance(bare.scheduler, DDIMScheduler)  # diffusers' offline default, with SD's betas
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset", "set_alpha_to_one",
                "timestep_spacing"):
        assert bare.scheduler.config[key] == sfu.SCHEDULER_DEFAULT_CONFIG[key], key
    assert bare.scheduler.config.prediction_type == ("v_prediction" if sd2 else "epsilon")  # diffusers' rule
    folder.scheduler = DDIMScheduler.from_config(bare.scheduler.config)
    np.testing.assert_allclose(_images(bare, height=64, width=64), _images(folder, height=64, width=64), atol=1e-4)
    eps = LatentDiffusionPipeline.from_single_file(path, prediction_type="epsilon")
    assert eps.scheduler.config.prediction_type == "epsilon"


def _ldm_yaml(heads: dict) -> dict:
    """An LDM YAML for ``plain_config``'s shapes (only the keys diffusers' and our readers use)."""
    return {"model": {"params": {
        "parameterization": "v", "linear_start": 0.001, "linear_end": 0.02, "timesteps": 500, "scale_factor": 0.5,
        "unet_config": {"params": {"model_channels": 32, "channel_mult": [1, 2], "in_channels": 4, "out_channels": 4,
                                   "num_res_blocks": 1, "context_dim": 64, "attention_resolutions": [1],
                                   "transformer_depth": 1, **heads}},
        "first_stage_config": {"params": {"ddconfig": {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                                       "z_channels": 4, "in_channels": 3, "out_ch": 3}}}}}}


@pytest.mark.parametrize("heads", [{"num_heads": 4}, {"num_head_channels": 16, "use_linear_in_transformer": True}],
                         ids=["num_heads", "num_head_channels"])
def test_original_config_yaml_supplies_heads_scale_and_parameterization(heads, plain_dir, tmp_path):
    path = _without_metadata(save_single_file(plain_dir, tmp_path / "m.safetensors"), tmp_path / "bare.safetensors")
    original = _ldm_yaml(heads)
    yaml_path = tmp_path / "inference.yaml"
    yaml_path.write_text(json.dumps(original))  # JSON is YAML
    pipe = LatentDiffusionPipeline.from_single_file(path, original_config=yaml_path)
    reference_unet = sfu.create_unet_diffusers_config_from_ldm(original, {})  # diffusers' reading of the YAML
    reference_vae = sfu.create_vae_diffusers_config_from_ldm(original, {})
    assert pipe.unet.config.attention_head_dim == reference_unet["attention_head_dim"]
    assert pipe.vae.config.scaling_factor == reference_vae["scaling_factor"] == 0.5
    sched = pipe.scheduler.config
    assert (sched.prediction_type, sched.beta_start, sched.beta_end, sched.num_train_timesteps) == \
        ("v_prediction", 0.001, 0.02, 500)  # LDM's parameterization "v", linear_start/end, timesteps
    _assert_same_weights(pipe.unet, LatentDiffusionPipeline.from_pretrained(plain_dir).unet)
    override = LatentDiffusionPipeline.from_single_file(path, original_config=original, prediction_type="epsilon")
    assert override.scheduler.config.prediction_type == "epsilon"  # the argument beats the YAML


def test_inpainting_unet_infers_nine_input_channels(tmp_path):
    parts = build_components(inpainting_config())
    path = save_single_file(parts, tmp_path / "inpaint.safetensors")
    state, _ = read_checkpoint(path)
    assert sfu.infer_diffusers_model_type(state) == "inpainting"
    bare = load_single_file(_without_metadata(path, tmp_path / "bare.safetensors"))
    assert bare.unet.config.in_channels == 9
    assert bare.scheduler.config.prediction_type == "epsilon"
    _assert_same_weights(bare.unet, parts.unet)


def test_export_dtype_and_metadata(tiny_model_dir, tmp_path):
    folder = LatentDiffusionPipeline.from_pretrained(tiny_model_dir)
    path = save_single_file(folder, tmp_path / "half.safetensors", dtype="fp16")
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert json.loads(f.metadata()["latentsd.scheduler"])["_class_name"] == "DDPMScheduler"
    half = LatentDiffusionPipeline.from_single_file(path)  # loads in fp32 by default, fp16-rounded weights
    for name in COMPONENTS:
        sa, sb = getattr(half, name).state_dict(), getattr(folder, name).state_dict()
        assert all(sa[k].dtype == torch.float32 and torch.equal(sa[k], sb[k].half().float()) for k in sb), name
    bf16 = LatentDiffusionPipeline.from_single_file(path, dtype=torch.bfloat16)
    assert {p.dtype for n in COMPONENTS for p in getattr(bf16, n).parameters()} == {torch.bfloat16}


def test_a_failed_write_keeps_the_old_file(tiny_model_dir, tmp_path, monkeypatch):
    import safetensors.torch

    path = save_single_file(tiny_model_dir, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_single_file(tiny_model_dir, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_lora_adapters_must_be_merged_before_export(tmp_path):
    from peft import LoraConfig

    parts = build_components("tiny")
    parts.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="fuse_lora"):
        save_single_file(parts, tmp_path / "m.safetensors")


# ---- pickles -------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_pickles_need_opt_in_and_load_weights_only(plain_dir, tmp_path):
    state, _ = read_checkpoint(save_single_file(plain_dir, tmp_path / "m.safetensors"))
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, ckpt)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_single_file(ckpt)
    pipe = load_single_file(ckpt, allow_pickle=True)
    _assert_same_weights(pipe.unet, LatentDiffusionPipeline.from_pretrained(plain_dir).unet)


def test_a_malicious_pickle_never_runs(plain_dir, tmp_path):
    state, _ = read_checkpoint(save_single_file(plain_dir, tmp_path / "m.safetensors"))
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "extra": _Payload(marker)}, evil)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_single_file(evil)
    with pytest.raises(ValueError, match="exec"):
        load_single_file(evil, allow_pickle=True)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: a plain unpickle runs it
    assert marker.exists()


# ---- bad input -----------------------------------------------------------------------------------------
def _corrupt(kind, good, tmp_path):
    data = good.read_bytes()
    if kind == "truncated":
        (tmp_path / "bad.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        (tmp_path / "bad.safetensors").write_bytes(bytes(range(256)) * 8)
    elif kind == "not_ldm":  # a diffusers UNet file: safetensors, but not an LDM checkpoint
        save_file({"conv_in.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    elif kind == "sdxl":
        save_file({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)},
                  str(tmp_path / "bad.safetensors"))
    elif kind == "bad_metadata":
        save_file(load_file(str(good)), str(tmp_path / "bad.safetensors"), metadata={"latentsd.unet": "{oops"})
    return tmp_path / "bad.safetensors"


@pytest.mark.parametrize("kind, message", [
    ("truncated", "not a readable .safetensors"), ("garbage", "not a readable .safetensors"),
    ("not_ldm", "not an SD-1.x/2.x LDM checkpoint"), ("sdxl", "SDXL"), ("bad_metadata", "not valid JSON")])
def test_a_broken_or_foreign_file_is_a_clear_error(kind, message, tiny_model_dir, tmp_path):
    good = save_single_file(tiny_model_dir, tmp_path / "good.safetensors")
    with pytest.raises(ValueError, match=message):
        load_single_file(_corrupt(kind, good, tmp_path))


def test_bad_arguments_are_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_single_file(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        save_single_file(tiny_model_dir, tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match="unknown dtype"):
        save_single_file(tiny_model_dir, tmp_path / "m.safetensors", dtype="fp8")
    for name, data in (("junk.ckpt", bytes(range(256)) * 8), ("cut.ckpt", None)):
        if data is None:  # a real torch.save zip, cut short
            torch.save({"w": torch.zeros(1000)}, tmp_path / name)
            data = (tmp_path / name).read_bytes()[:600]
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
            load_single_file(tmp_path / name, allow_pickle=True)
    path = save_single_file(tiny_model_dir, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="prediction_type"):
        load_single_file(path, prediction_type="v")


def test_a_missing_tokenizer_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cfg = load_model_config("tiny")
    cfg["text_encoder"]["vocab_size"] = 1000  # not the built-in tokenizer's: the file needs a real one
    parts = build_components(cfg)
    path = save_single_file(parts, tmp_path / "m.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="openai/clip-vit-large-patch14.*tokenizer=FOLDER"):
        load_single_file(path)
    with pytest.raises(ValueError, match="tokenizer=FOLDER"):
        load_single_file(path, tokenizer=tmp_path)  # a folder without tokenizer files
    assert load_single_file(path, tokenizer=parts.tokenizer).tokenizer is parts.tokenizer


# ---- command line --------------------------------------------------------------------------------------
def test_cli_export_then_generate_from_the_file_equals_the_folder(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    assert main(["export-single-file", "--model", str(tiny_model_dir), "--out", str(path)]) == 0
    assert str(path) in capsys.readouterr().out
    common = ["a red circle", "--steps", "3", "--guidance", "2", "--seed", "1"]
    assert main(["generate", *common, "--model", str(tiny_model_dir), "--out", str(tmp_path / "folder.png")]) == 0
    assert main(["generate", *common, "--model", str(path), "--out", str(tmp_path / "file.png")]) == 0
    folder_png, file_png = (np.asarray(PIL.Image.open(tmp_path / n)) for n in ("folder.png", "file.png"))
    assert np.array_equal(folder_png, file_png)

    assert main(["export-single-file", "--model", str(tiny_model_dir), "--out", str(tmp_path / "h.safetensors"),
                 "--dtype", "fp16"]) == 0
    assert {v.dtype for v in load_file(str(tmp_path / "h.safetensors")).values()} == {torch.float16}


def test_cli_pickles_need_allow_pickle(tiny_model_dir, tmp_path, capsys):
    state, _ = read_checkpoint(save_single_file(tiny_model_dir, tmp_path / "m.safetensors"))
    ckpt = tmp_path / "m.ckpt"
    torch.save(state, ckpt)  # no metadata in a pickle: the tiny model's 8 norm groups are not SD's 32
    args = ["generate", "a red circle", "--model", str(ckpt), "--steps", "2", "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "Traceback" not in err
    assert main([*args, "--allow-pickle"]) == 2
    assert "SD's conventions" in capsys.readouterr().err
    missing = ["export-single-file", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o.safetensors")]
    assert main(missing) == 2
    assert "missing' does not exist" in capsys.readouterr().err


def test_the_trainer_writes_the_export_as_a_single_file_too(tmp_path, tiny_model_dir):
    """export.single_file=true: model.safetensors beside model/, in export.dtype, giving the folder's images."""
    from latentsd.config import load_config
    from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
    from latentsd.training.trainer import train

    data = write_imagefolder(make_shapes_dataset(8, seed=0), tmp_path / "data")
    out = tmp_path / "run"
    train(load_config("tiny", [f"output_dir={out}", f"data.dataset={data}", f"model.pretrained={tiny_model_dir}",
                               "max_steps=2", "checkpoint_every=2", "optim.train_batch_size=2",
                               "export.single_file=true", "export.dtype=bf16"]))
    file = out / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    folder = LatentDiffusionPipeline.from_pretrained(out / "model")
    single = LatentDiffusionPipeline.from_single_file(file)
    for pipe in (folder, single):
        pipe.set_progress_bar_config(disable=True)
    _assert_same_weights(folder.unet, single.unet)
    np.testing.assert_allclose(_images(single), _images(folder), atol=1e-4)
