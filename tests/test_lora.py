"""LoRA: adapters train alone in fp32, and both exports reproduce the in-training model in our and diffusers' pipelines."""

import copy
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from safetensors import safe_open

from latentsd.config import LoRAConfig
from latentsd.models import build_components
from latentsd.loaders import load_lora_into_pipeline
from latentsd.pipeline import LatentDiffusionPipeline
from latentsd.training.lora import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    add_lora,
    export_lora,
    lora_parameters,
    lora_state_dicts,
    merged_copy,
    save_lora_kohya,
)

RANK, ALPHA = 4, 8.0  # alpha != rank: the exports must carry the scale alpha / rank = 2
ATOL = 1e-4


def _cfg(text_encoder=True, **kw):
    return LoRAConfig(enabled=True, rank=RANK, alpha=ALPHA, text_encoder=text_encoder, **kw)


def _randomize_lora_b(*models, seed=1, std=0.1):
    """peft starts lora_B at 0 (no effect); random B makes the adapter change the output."""
    torch.manual_seed(seed)
    for model in models:
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.data.normal_(0, std)


@pytest.fixture(scope="module")
def base():
    """Our own tiny components (the session `tiny` fixture must not be mutated): copy before changing."""
    return build_components("tiny", seed=0)


def _ours(parts):
    pipe = LatentDiffusionPipeline(**parts.as_dict())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(parts):
    pipe = diffusers.StableDiffusionPipeline(**parts.as_dict(), safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe):
    # 32x32 (4x4 latents) keeps every sampling call cheap on CPU
    return pipe("a red circle on the left", num_inference_steps=3, guidance_scale=2.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.fixture(scope="module")
def base_images(base):
    return _images(_ours(copy.deepcopy(base)))


@pytest.fixture(scope="module", params=["unet", "unet+text_encoder"])
def trained(request, base, tmp_path_factory):
    """An adapted model with non-zero adapters, its images, and both exports."""
    with_te = request.param == "unet+text_encoder"
    parts = copy.deepcopy(base)
    add_lora(parts.unet, parts.text_encoder, _cfg(text_encoder=with_te))
    _randomize_lora_b(parts.unet, parts.text_encoder)
    out = tmp_path_factory.mktemp("lora") / "lora"
    paths = export_lora(out, parts.unet, parts.text_encoder if with_te else None)
    return SimpleNamespace(parts=parts, with_te=with_te, images=_images(_ours(parts)), dir=out, **paths)


# ---- add_lora ----------------------------------------------------------------------------------------
def _adapted_linears(model, targets):
    return [m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def test_add_lora_trains_only_the_adapters(base):
    parts = copy.deepcopy(base)
    cfg = _cfg()
    n_base = sum(p.numel() for m in (parts.unet, parts.text_encoder) for p in m.parameters())
    expected = sum(RANK * (m.in_features + m.out_features) for model, targets in
                   ((parts.unet, cfg.target_modules), (parts.text_encoder, cfg.text_encoder_target_modules))
                   for m in _adapted_linears(model, targets))
    params = add_lora(parts.unet, parts.text_encoder, cfg)
    trainable = [p for m in (parts.unet, parts.text_encoder) for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert sum(p.numel() for p in params) == expected > 0
    assert len(params) == len(lora_parameters(parts.unet)) + len(lora_parameters(parts.text_encoder))
    frozen = sum(p.numel() for m in (parts.unet, parts.text_encoder) for p in m.parameters() if not p.requires_grad)
    assert frozen == n_base
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(parts.unet, parts.text_encoder, cfg)


def test_add_lora_unet_only_leaves_text_encoder_alone(base):
    parts = copy.deepcopy(base)
    params = add_lora(parts.unet, parts.text_encoder, _cfg(text_encoder=False))
    assert lora_parameters(parts.text_encoder) == [] and len(params) == len(lora_parameters(parts.unet))
    assert not getattr(parts.text_encoder, "_hf_peft_config_loaded", False)


def test_add_lora_bad_targets_is_a_clear_error(base):
    with pytest.raises(ValueError, match="no_such_module"):
        add_lora(copy.deepcopy(base.unet), None, _cfg(text_encoder=False, target_modules=["no_such_module"]))


def test_lora_params_stay_fp32_on_an_fp16_base_and_unscale(base):
    parts = copy.deepcopy(base)
    parts.unet.to(torch.float16)
    parts.text_encoder.to(torch.float16)
    params = add_lora(parts.unet, parts.text_encoder, _cfg())
    assert {p.dtype for p in params} == {torch.float32}
    for model in (parts.unet, parts.text_encoder):
        assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {torch.float16}
    # fp16 forward through adapted layers of both models (one UNet transformer block: CPU fp16 convs are slow)
    _randomize_lora_b(parts.unet, parts.text_encoder)
    embeds = parts.text_encoder(torch.randint(0, 100, (1, 8)))[0]
    block = parts.unet.mid_block.attentions[0].transformer_blocks[0]
    hidden = torch.randn(1, 16, block.attn1.to_q.in_features, dtype=torch.float16)
    loss = block(hidden, encoder_hidden_states=embeds).float().pow(2).mean()
    scaler = torch.amp.GradScaler("cpu")
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients" for fp16 trainable params
    touched = [p for p in params if p.grad is not None]
    assert touched and all(p.grad.dtype == torch.float32 for p in touched)
    assert any(p.grad.abs().sum() > 0 for p in lora_parameters(parts.text_encoder))
    before = [p.detach().clone() for p in touched]
    scaler.step(optimizer)
    assert any(not torch.equal(b, p) for b, p in zip(before, touched))


# ---- exports reproduce the in-training model ---------------------------------------------------------
def test_adapter_changes_the_images(trained, base_images):
    assert np.abs(trained.images - base_images).max() > 1e-2


def test_our_pipeline_loads_the_diffusers_export(trained, base):
    pipe = _ours(copy.deepcopy(base))
    load_lora_into_pipeline(pipe, trained.dir)
    np.testing.assert_allclose(_images(pipe), trained.images, atol=ATOL, rtol=0)
    pipe.fuse_lora()
    np.testing.assert_allclose(_images(pipe), trained.images, atol=ATOL, rtol=0)


def test_our_pipeline_loads_the_kohya_file(trained, base):
    pipe = _ours(copy.deepcopy(base))
    pipe.load_lora_weights(str(trained.kohya))  # diffusers' kohya/A1111 converter
    assert ("text_encoder" in pipe.get_list_adapters()) == trained.with_te
    np.testing.assert_allclose(_images(pipe), trained.images, atol=ATOL, rtol=0)


def test_diffusers_pipeline_loads_both_exports(trained, base):
    for path, fuse in ((trained.dir, False), (trained.kohya, True)):
        pipe = _diffusers(copy.deepcopy(base))
        if fuse:
            load_lora_into_pipeline(pipe, path, fuse=True)
        else:
            pipe.load_lora_weights(str(path))
        np.testing.assert_allclose(_images(pipe), trained.images, atol=ATOL, rtol=0)


def test_scale_zero_gives_the_base_model(trained, base, base_images):
    pipe = _ours(copy.deepcopy(base))
    load_lora_into_pipeline(pipe, trained.kohya, scale=0.0)
    np.testing.assert_allclose(_images(pipe), base_images, atol=ATOL, rtol=0)


def test_merged_copy_saves_a_plain_model(trained, base, tmp_path):
    """A full-model export of a LoRA run: merged weights, plain names, loads in diffusers as an ordinary model."""
    parts = copy.copy(trained.parts)  # shallow: swap in merged models, share the rest
    parts.unet = merged_copy(trained.parts.unet)
    parts.text_encoder = merged_copy(trained.parts.text_encoder) if trained.with_te else trained.parts.text_encoder
    assert lora_parameters(trained.parts.unet)  # the trained model keeps its adapters
    for name in ("unet", "text_encoder"):
        assert getattr(parts, name).state_dict().keys() == getattr(base, name).state_dict().keys()
    _ours(parts).save_pretrained(tmp_path)
    assert not list(tmp_path.rglob("adapter_*"))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = trained.parts.scheduler
    assert not lora_parameters(pipe.unet) and not lora_parameters(pipe.text_encoder)
    np.testing.assert_allclose(_images(pipe), trained.images, atol=ATOL, rtol=0)


# ---- file formats ------------------------------------------------------------------------------------
def test_kohya_file_format(trained):
    with safe_open(str(trained.kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == "8"
    assert meta["ss_network_module"] == "networks.lora"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert len(keys) == 3 * len(modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in modules
    te = sorted(m for m in modules if m.startswith("lora_te_"))
    if trained.with_te:
        n_layers = trained.parts.text_encoder.config.num_hidden_layers
        assert te == sorted(f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}_proj"
                            for i in range(n_layers) for p in ("q", "k", "v", "out"))
    else:
        assert te == []
    for m in modules:
        down, up, alpha = (tensors[f"{m}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape[0] == RANK and up.shape[1] == RANK and alpha.numel() == 1 and alpha.item() == ALPHA


def test_diffusers_file_format(trained):
    assert sorted(p.name for p in trained.dir.iterdir()) == sorted([DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME])
    with safe_open(str(trained.dir / DIFFUSERS_WEIGHT_NAME), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)
    assert any(k.endswith("attn1.to_q.lora.down.weight") for k in keys)
    te = [k for k in keys if k.startswith("text_encoder.")]
    assert bool(te) == trained.with_te
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te)
    assert '"unet.lora_alpha": 8.0' in meta["lora_adapter_metadata"]


def test_every_target_kind_round_trips(base, tmp_path):
    """Non-attention targets (proj_in, feed-forward, resnet convs, time embedding, text MLP) load fully from both files."""
    parts = copy.deepcopy(base)
    cfg = _cfg(target_modules=["to_q", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                               "time_emb_proj", "conv_shortcut"],
               text_encoder_target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    add_lora(parts.unet, parts.text_encoder, cfg)
    _randomize_lora_b(parts.unet, parts.text_encoder)
    paths = export_lora(tmp_path, parts.unet, parts.text_encoder)
    want = lora_state_dicts(parts.unet, parts.text_encoder)
    for path in paths.values():
        pipe = _ours(copy.deepcopy(base))
        name = load_lora_into_pipeline(pipe, path)
        got = lora_state_dicts(pipe.unet, pipe.text_encoder, adapter_name=name)
        for w, g in zip(want, got):
            assert sorted(w) == sorted(g)
            assert all(torch.equal(w[k], g[k]) for k in w)
        for model, loaded in ((parts.unet, pipe.unet), (parts.text_encoder, pipe.text_encoder)):
            assert _scalings(model, "default") == _scalings(loaded, name)


def test_kohya_text_encoder_without_out_proj_warns(base, tmp_path, caplog):
    """diffusers' kohya converter cannot load q/k/v-only text-encoder LoRA; the diffusers export can."""
    parts = copy.deepcopy(base)
    add_lora(parts.unet, parts.text_encoder, _cfg(text_encoder_target_modules=["q_proj", "v_proj"]))
    with caplog.at_level("WARNING", logger="latentsd.training.lora"):
        paths = export_lora(tmp_path, parts.unet, parts.text_encoder)
    assert "out_proj" in caplog.text
    pipe = _ours(copy.deepcopy(base))
    load_lora_into_pipeline(pipe, paths["diffusers"].parent)
    assert len(lora_parameters(pipe.text_encoder)) == len(lora_parameters(parts.text_encoder)) == 8


def _scalings(model, name):
    return {n: m.scaling[name] for n, m in model.named_modules() if hasattr(m, "scaling") and name in m.scaling}


def test_export_overwrites_atomically(base, tmp_path):
    parts = copy.deepcopy(base)
    add_lora(parts.unet, None, _cfg(text_encoder=False))
    export_lora(tmp_path, parts.unet)
    _randomize_lora_b(parts.unet)
    paths = export_lora(tmp_path, parts.unet)  # second export replaces the files, leaves no temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME])
    with safe_open(str(paths["kohya"]), "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]  # noqa: SIM118 (not a dict)
    assert any(u.abs().sum() > 0 for u in ups)


# ---- errors ------------------------------------------------------------------------------------------
def test_load_errors(base, tmp_path):
    pipe = _ours(copy.deepcopy(base))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_lora_into_pipeline(pipe, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=DIFFUSERS_WEIGHT_NAME):
        load_lora_into_pipeline(pipe, tmp_path)  # an empty folder
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a LoRA file"):
        load_lora_into_pipeline(pipe, tmp_path / "notes.txt")


def test_export_without_adapters_is_a_clear_error(base, tmp_path):
    with pytest.raises(ValueError, match="add_lora"):
        save_lora_kohya(tmp_path / "x.safetensors", copy.deepcopy(base.unet))
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_lora_kohya(tmp_path / "x.pt", copy.deepcopy(base.unet))
