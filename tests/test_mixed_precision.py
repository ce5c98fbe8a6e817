"""bf16 end to end on CPU (the stand-in for GPU mixed precision): train → export fp32 and bf16 → load → generate.

The frozen parts compute in bf16 and the trained ones stay fp32, yet each export is one dtype throughout and
loads, without ``torch_dtype``, in latentsd and in diffusers' own pipeline.
"""

import copy
import dataclasses
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from latentsd import LatentDiffusionPipeline
from latentsd.config import load_config
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.training.lora import ADAPTER
from latentsd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
NAMES = {"fp32": "F32", "bf16": "BF16"}
LIBRARIES = (LatentDiffusionPipeline, diffusers.StableDiffusionPipeline)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_imagefolder(make_shapes_dataset(8, seed=0), tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module", params=["full", "lora"])
def run(request, tmp_path_factory, shapes_dir, tiny_model_dir):
    """3 bf16 steps (UNet + text encoder, fully or as LoRA), exported in fp32 (the run's) and again in bf16."""
    out = tmp_path_factory.mktemp(request.param)
    trained = ["model.train_text_encoder=true"] if request.param == "full" else \
        ["lora.enabled=true", "lora.text_encoder=true", "lora.rank=4", "lora.alpha=8", "optim.learning_rate=5e-2"]
    cfg = load_config(ROOT / "configs/train/tiny.yaml", [
        f"output_dir={out}", f"data.dataset={shapes_dir}", f"model.pretrained={tiny_model_dir}", "max_steps=3",
        "checkpoint_every=100", "optim.train_batch_size=2", "mixed_precision=bf16", "export.dtype=fp32", *trained])
    trainer = Trainer(cfg)
    trainer.run()
    assert trainer.parts.vae.dtype == torch.bfloat16  # the frozen parts really computed in bf16
    trainer.cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, dtype="bf16"))
    trainer.export(out / "bf16" / "model")
    return trainer, {"fp32": out / "model", "bf16": out / "bf16" / "model"}


def _stored(folder: Path) -> dict[str, set[str]]:
    """{file: dtypes of its tensors} for every safetensors file under ``folder``."""
    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out[str(file.relative_to(folder))] = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    return out


def _generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on the left", num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def _modules(pipe):
    return (pipe.unet, pipe.vae, pipe.text_encoder)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_tensor_of_the_export_is_in_export_dtype(run, dtype):
    _, folders = run
    stored = _stored(folders[dtype])
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= set(stored)
    assert all(kinds == {NAMES[dtype]} for kinds in stored.values()), stored
    if (folders[dtype].parent / "lora").is_dir():  # the adapters too
        lora = _stored(folders[dtype].parent / "lora")
        assert len(lora) == 2 and all(kinds == {NAMES[dtype]} for kinds in lora.values()), lora


def test_the_bf16_export_is_the_fp32_export_rounded(run):
    """Both exports hold the same weights: cast once from what was trained (never cast twice, never re-merged)."""
    _, folders = run
    pairs = [(folders["fp32"], folders["bf16"]), (folders["fp32"].parent / "lora", folders["bf16"].parent / "lora")]
    for a_dir, b_dir in pairs:
        if not a_dir.is_dir():
            continue
        files = sorted(p.relative_to(a_dir) for p in a_dir.rglob("*.safetensors"))
        assert files and files == sorted(p.relative_to(b_dir) for p in b_dir.rglob("*.safetensors"))
        for rel in files:
            a, b = load_file(a_dir / rel), load_file(b_dir / rel)
            assert a.keys() == b.keys() and all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a), rel


def test_the_fp32_export_holds_the_trained_weights_on_the_source_model(run, tiny_model_dir):
    """Trained parts exactly; frozen parts the source's, not their bf16 compute copies; LoRA merged into the
    source base in fp32: W_source + (alpha / r)·B·A."""
    trainer, folders = run
    unet = load_file(folders["fp32"] / "unet/diffusion_pytorch_model.safetensors")
    for part in ("vae/diffusion_pytorch_model.safetensors",) + (("unet/diffusion_pytorch_model.safetensors",)
                                                                 if trainer.cfg.lora.enabled else ()):
        exported, source = load_file(folders["fp32"] / part), load_file(tiny_model_dir / part)
        rounded = [k for k in source if not torch.equal(source[k], source[k].to(torch.bfloat16).float())]
        assert rounded  # the source has more precision than bf16 keeps: the check below can tell them apart
        if part.startswith("vae"):
            assert all(torch.equal(exported[k], source[k]) for k in source)
    if not trainer.cfg.lora.enabled:
        assert all(torch.equal(unet[k], v) for k, v in trainer.parts.unet.state_dict().items())
        return
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layer = trainer.parts.unet.get_submodule(name)
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_B[ADAPTER].weight.abs().max() > 0
    delta = (layer.scaling[ADAPTER] * layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight).detach()
    source = load_file(tiny_model_dir / "unet/diffusion_pytorch_model.safetensors")[f"{name}.weight"]
    torch.testing.assert_close(unet[f"{name}.weight"], source + delta, rtol=0, atol=1e-6)
    untouched = "down_blocks.0.resnets.0.conv1.weight"  # not a LoRA target: the source weight itself
    assert torch.equal(unet[untouched], load_file(tiny_model_dir / "unet/diffusion_pytorch_model.safetensors")[untouched])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_each_export_loads_without_torch_dtype_and_generates_in_both_libraries(run, dtype):
    _, folders = run
    images = []
    for cls in LIBRARIES:
        pipe = cls.from_pretrained(folders[dtype])
        assert {m.dtype for m in _modules(pipe)} == {torch.float32}  # one dtype: no fp32 UNet with a bf16 encoder
        images.append(_generate(pipe))
        assert images[-1].shape == (1, 32, 32, 3) and np.isfinite(images[-1]).all()
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)


def test_the_bf16_export_loads_in_bf16_in_both_libraries(run):
    _, folders = run
    for cls in LIBRARIES:
        pipe = cls.from_pretrained(folders["bf16"], torch_dtype=torch.bfloat16)
        assert {m.dtype for m in _modules(pipe)} == {torch.bfloat16}
        images = _generate(pipe)
        assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("run", ["lora"], indirect=True)
def test_the_adapter_files_load_into_the_fp32_base_in_both_libraries(run, tiny_model_dir):
    """fp32 adapters reproduce the fp32 merged export; the bf16 ones (rounded adapters) come close."""
    _, folders = run
    merged = _generate(LatentDiffusionPipeline.from_pretrained(folders["fp32"]))
    for dtype, atol in (("fp32", 1e-4), ("bf16", 1e-2)):  # bf16 keeps 8 bits of each adapter weight (measured 3e-3)
        for cls in LIBRARIES:
            pipe = cls.from_pretrained(tiny_model_dir)
            pipe.load_lora_weights(str(folders[dtype].parent / "lora"))
            images = _generate(pipe)
            assert np.isfinite(images).all()
            np.testing.assert_allclose(images, merged, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merges_in_fp32_on_the_cpu_and_leaves_the_trained_model_alone(dtype):
    """A small update on a bf16 base: merging into bf16 would round most of it away; fp32 keeps it exactly.
    An fp32 CPU base: the copy must not share storage with the trained model."""
    from latentsd.config import LoRAConfig
    from latentsd.models import build_components
    from latentsd.training.lora import add_lora, merge_into, merged_copy

    source = build_components("tiny", seed=0).unet
    unet = copy.deepcopy(source).to(dtype)
    add_lora(unet, None, LoRAConfig(enabled=True, rank=4, alpha=8, text_encoder=False))
    torch.manual_seed(0)
    for name, p in unet.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0, 1e-5)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    name = "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    layer = unet.get_submodule(name)
    delta = (layer.scaling[ADAPTER] * layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight).detach()
    base = layer.base_layer.weight.detach().float()

    merged = merged_copy(unet)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())  # the trained model is untouched
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert {p.device.type for p in merged.parameters()} == {"cpu"}
    weight = merged.get_submodule(name).weight
    torch.testing.assert_close(weight, base + delta, rtol=0, atol=1e-7)
    if dtype == torch.bfloat16:
        in_bf16 = (base + delta).to(torch.bfloat16).float()
        assert (in_bf16 == base).float().mean() > 0.5  # most of the update is below bf16's resolution of the base

    into = merge_into(copy.deepcopy(source), unet)
    torch.testing.assert_close(into.get_submodule(name).weight, source.get_submodule(name).weight + delta,
                               rtol=0, atol=1e-7)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    with pytest.raises(ValueError, match="no LoRA adapter"):
        merge_into(copy.deepcopy(source), source)
