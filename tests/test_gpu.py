"""On CUDA: train the tiny model in fp16 and bf16 (full and LoRA), fused AdamW, xformers when installed;
export, reload in both libraries, generate. Skipped (conftest) where there is no CUDA device."""

import importlib.util
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors import safe_open

from latentsd import LatentDiffusionPipeline
from latentsd.config import load_config
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.training.logs import read_metrics
from latentsd.training.trainer import TORCH_DTYPES, Trainer

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"
SAFETENSORS_NAMES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
ATTENTION = ["sdpa"] + (["xformers"] if importlib.util.find_spec("xformers") else [])


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_imagefolder(make_shapes_dataset(8, seed=0), tmp_path_factory.mktemp("shapes"))


def _generate(pipe):
    pipe.to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on the left", num_inference_steps=3, guidance_scale=2.0,
                generator=torch.Generator(DEVICE).manual_seed(0), output_type="np").images


def _stored_dtypes(folder: Path) -> dict[str, set[str]]:
    out = {}
    for file in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out[str(file.relative_to(folder))] = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    return out


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_exports_reloads_and_generates(tmp_path, shapes_dir, tiny_model_dir, precision,
                                                               mode, attention):
    out = tmp_path / "run"
    trained = ["model.train_text_encoder=true"] if mode == "full" else \
        ["lora.enabled=true", "lora.text_encoder=true", "lora.rank=4", "optim.learning_rate=1e-2"]
    trainer = Trainer(load_config(ROOT / "configs/train/tiny.yaml", [
        f"output_dir={out}", f"data.dataset={shapes_dir}", f"model.pretrained={tiny_model_dir}", "max_steps=3",
        "checkpoint_every=100", "optim.train_batch_size=2", f"mixed_precision={precision}",
        f"export.dtype={precision}", f"model.attention={attention}", *trained]))
    compute = TORCH_DTYPES[precision]
    assert trainer.acc.device.type == DEVICE
    assert trainer.optimizer.optimizer.defaults["fused"] is True  # fused AdamW on CUDA
    assert trainer.params and all(p.is_cuda and p.dtype == torch.float32 for p in trainer.params)
    assert trainer.parts.vae.dtype == compute  # frozen parts compute in the mixed-precision dtype
    if attention == "xformers":
        from diffusers.models.attention_processor import XFormersAttnProcessor

        assert all(isinstance(p, XFormersAttnProcessor) for p in trainer.parts.unet.attn_processors.values())
    trainer.run()
    assert all(np.isfinite(m["loss"]) for m in read_metrics(out).values())

    stored = _stored_dtypes(out / "model")
    if mode == "lora":
        stored.update({f"lora/{k}": v for k, v in _stored_dtypes(out / "lora").items()})
    assert len(stored) == 3 + 2 * (mode == "lora")
    assert all(kinds == {SAFETENSORS_NAMES[precision]} for kinds in stored.values()), stored

    images = {}
    for cls in (LatentDiffusionPipeline, diffusers.StableDiffusionPipeline):
        for dtype in (None, compute):  # default load (fp32 throughout) and the export's own dtype
            pipe = cls.from_pretrained(out / "model", torch_dtype=dtype)
            assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {dtype or torch.float32}
            images[cls, dtype] = _generate(pipe)
            assert images[cls, dtype].shape == (1, 64, 64, 3) and np.isfinite(images[cls, dtype]).all()
    np.testing.assert_allclose(images[LatentDiffusionPipeline, None], images[diffusers.StableDiffusionPipeline, None],
                               atol=1e-3)
