"""Fine-tuning folders laid out like the real SD-1.5 and SD-2 repos (tiny weights, the same files and configs).

SD-1.5 ships a PNDM sampler, a safety checker and a feature extractor; SD-2 (768-v) a v-prediction DDIM.
Training noises with our DDPM on the folder's betas; the export keeps what the folder shipped.
"""

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import yaml
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPImageProcessor

from latentsd import LatentDiffusionPipeline
from latentsd.config import load_config
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.models import build_components, model_config_path
from latentsd.schedulers import DDPMScheduler
from latentsd.training.rng import GlobalDraw
from latentsd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on the left"

# The files of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2 (768-v), as published
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}
SD2_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
MODELS = {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
          "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
          "feature_extractor": ["transformers", "CLIPImageProcessor"]}
SD15_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0", **MODELS,
              "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "scheduler": ["diffusers", "PNDMScheduler"], "requires_safety_checker": True}
SD2_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.8.0", **MODELS,
             "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
             "requires_safety_checker": False}


def _feature_extractor():
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _safety_checker():
    """A real StableDiffusionSafetyChecker, tiny; its concept thresholds flag nothing, so images stay comparable."""
    torch.manual_seed(0)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    return StableDiffusionSafetyChecker(config).eval()


def _write_folder(path: Path, parts, scheduler_config: dict, index: dict, **extra) -> Path:
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    diffusers.StableDiffusionPipeline(**{**parts.as_dict(), "scheduler": scheduler}, feature_extractor=_feature_extractor(),
                                      requires_safety_checker=index["requires_safety_checker"], **extra).save_pretrained(path)
    (path / "scheduler/scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("sd15"), build_components("tiny", seed=0), SD15_SCHEDULER, SD15_INDEX,
                         safety_checker=_safety_checker())


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory):
    """SD-2-style: linear attention projections, upcast attention, GELU text encoder, v-prediction DDIM.

    SD-2's 768 px is unet.sample_size 96 (768 / 8); the tiny UNet at 96 x 96 latents takes 3 s per forward on
    one core (9216-token self-attention), so this folder keeps the ratio at 1/8: sample_size 12, a 96 px
    default resolution; the same code path, and a resolution no other test model has.
    """
    cfg = yaml.safe_load(model_config_path("tiny").read_text())
    cfg["unet"].update(sample_size=12, use_linear_projection=True, upcast_attention=True)
    cfg["text_encoder"]["hidden_act"] = "gelu"
    return _write_folder(tmp_path_factory.mktemp("sd2"), build_components(cfg, seed=0), SD2_SCHEDULER, SD2_INDEX,
                         safety_checker=None)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_imagefolder(make_shapes_dataset(8, seed=0), tmp_path_factory.mktemp("shapes"))


def _cfg(out, data, pretrained, *extra):
    return load_config(ROOT / "configs/train/tiny.yaml", [
        f"output_dir={out}", f"data.dataset={data}", f"model.pretrained={pretrained}", "max_steps=2",
        "checkpoint_every=100", "optim.train_batch_size=2", *extra])


def _generate(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
               output_type="np", **kwargs)
    return out


def _scheduler(folder: Path):
    """(class name in the file, the config as diffusers reads it: defaults filled in)."""
    name = json.loads((folder / "scheduler/scheduler_config.json").read_text())["_class_name"]
    config = getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler").config
    return name, {k: v for k, v in config.items() if not k.startswith("_")}


def test_sd15_folder_trains_on_its_betas_and_exports_its_pndm_and_safety_checker(tmp_path, sd15_dir, shapes_dir):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(out, shapes_dir, sd15_dir))
    shipped = diffusers.PNDMScheduler.from_pretrained(sd15_dir, subfolder="scheduler")
    assert isinstance(trainer.scheduler, DDPMScheduler)  # ours, for add_noise / SNR / v targets
    assert torch.equal(trainer.scheduler.betas, shipped.betas)
    assert torch.equal(trainer.scheduler.alphas_cumprod, shipped.alphas_cumprod)
    trainer.run()
    export = out / "model"

    index = json.loads((export / "model_index.json").read_text())
    for key in ("scheduler", "safety_checker", "feature_extractor", "requires_safety_checker"):
        assert index[key] == SD15_INDEX[key], key
    assert _scheduler(export) == _scheduler(sd15_dir) and _scheduler(export)[0] == "PNDMScheduler"
    source_checker = load_file(sd15_dir / "safety_checker/model.safetensors")
    exported_checker = load_file(export / "safety_checker/model.safetensors")
    assert source_checker.keys() == exported_checker.keys()
    assert all(torch.equal(source_checker[k], exported_checker[k]) for k in source_checker)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert any(not torch.equal(a, load_file(export / unet)[k]) for k, a in load_file(sd15_dir / unet).items())

    ref = diffusers.StableDiffusionPipeline.from_pretrained(export)
    assert isinstance(ref.scheduler, diffusers.PNDMScheduler)
    assert isinstance(ref.safety_checker, StableDiffusionSafetyChecker)
    checked = _generate(ref)
    assert checked.nsfw_content_detected == [False]  # the safety checker ran (and flagged nothing)
    ours = LatentDiffusionPipeline.from_pretrained(export)
    assert isinstance(ours.scheduler, diffusers.PNDMScheduler)
    np.testing.assert_allclose(_generate(ours).images, checked.images, atol=1e-4)


def test_sd2_v_prediction_folder_trains_on_v_and_samples_like_diffusers(tmp_path, sd2_dir, shapes_dir):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(out, shapes_dir, sd2_dir, "data.resolution=96"))
    assert trainer.prediction_type == "v_prediction"
    reference = diffusers.DDIMScheduler.from_pretrained(sd2_dir, subfolder="scheduler")

    # one micro-batch: the loss is the MSE between the UNet's output and v = √ᾱ·ε − √(1−ᾱ)·x₀
    seen = {}
    hook = trainer.parts.unet.register_forward_hook(
        lambda module, args, output: seen.update(noisy=args[0], t=args[1], pred=output[0]))
    batch = next(iter(trainer.loader))
    loss = trainer.compute_loss(batch, micro_step=0).item()
    hook.remove()
    draw = GlobalDraw(trainer.cfg.seed, 0, 0, 1, "cpu")  # the trainer's draws, in its order: posterior, then noise
    x0 = trainer.latents_of(batch, draw)
    eps = draw.randn(tuple(x0.shape))
    abar = reference.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["noisy"], abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(v, reference.get_velocity(x0, eps, seen["t"]))
    pred = seen["pred"].detach().float()
    assert loss == pytest.approx(torch.nn.functional.mse_loss(pred, v).item(), rel=1e-5)
    assert loss != pytest.approx(torch.nn.functional.mse_loss(pred, eps).item(), rel=1e-2)  # not an ε target

    trainer.run()
    export = out / "model"
    assert _scheduler(export) == _scheduler(sd2_dir) and _scheduler(export)[0] == "DDIMScheduler"
    assert json.loads((export / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    ours, ref = LatentDiffusionPipeline.from_pretrained(export), diffusers.StableDiffusionPipeline.from_pretrained(export)
    assert ours.scheduler.config.prediction_type == ref.scheduler.config.prediction_type == "v_prediction"
    a, b = _generate(ours).images, _generate(ref).images  # no height/width: the folder's own resolution
    assert a.shape == (1, 96, 96, 3)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_zero_terminal_snr_on_a_pndm_folder_exports_the_training_scheduler(tmp_path, sd15_dir, shapes_dir, caplog):
    """PNDM cannot take rescaled betas: the export ships the DDPM the model was trained with, and says so."""
    out = tmp_path / "ztsnr"
    with caplog.at_level("WARNING", logger="latentsd.training.checkpoint"):
        Trainer(_cfg(out, shapes_dir, sd15_dir, "max_steps=1", "loss.zero_terminal_snr=true",
                     "model.prediction_type=v_prediction")).run()
    assert "PNDMScheduler has no ['rescale_betas_zero_snr']" in caplog.text
    exported = json.loads((out / "model/scheduler/scheduler_config.json").read_text())
    assert exported["_class_name"] == "DDPMScheduler" and exported["rescale_betas_zero_snr"] is True
    assert exported["prediction_type"] == "v_prediction" and exported["timestep_spacing"] == "trailing"
