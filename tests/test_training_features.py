"""EMA, loss options, validation, 8-bit Adam message, and the 2-process accelerate run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentsd.config import load_config
from latentsd.schedulers import DDPMScheduler
from latentsd.training.ema import EMA
from latentsd.training.losses import make_noise, perturb_input_noise, sample_timesteps, snr_weights
from latentsd.training.logs import read_metrics
from latentsd.training.rng import GlobalDraw
from latentsd.training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parent.parent


def _cfg(out, data, *extra):
    return load_config(ROOT / "configs/train/tiny.yaml", [
        f"output_dir={out}", f"data.dataset={data}", "max_steps=4", "checkpoint_every=2", "checkpoints_total_limit=0",
        "optim.train_batch_size=2", *extra])


def _full_and_resumed(tmp_path, data, *extra):
    """Train 4 steps, then again from the step-2 checkpoint of that run into another folder."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(_cfg(full, data, *extra))
    train(_cfg(resumed, data, *extra, f"resume={full}/checkpoints/step-0000002"))
    return full, resumed


# ---- EMA -----------------------------------------------------------------------------------------
def test_ema_follows_the_closed_form_with_warmup():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9, warmup=True)
    expected = torch.zeros(3)
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        p.data.fill_(value)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * value
        ema.update()
    torch.testing.assert_close(ema.shadow[0], expected)
    with ema.swapped_in():
        torch.testing.assert_close(p.data, expected)
    assert torch.equal(p.data, torch.full((3,), 4.0))  # restored


def test_ema_resume_is_bit_identical_and_the_export_holds_the_ema_weights(tmp_path, shapes_dir):
    from latentsd.models import build_components

    full, resumed = _full_and_resumed(tmp_path, shapes_dir, "ema.enabled=true", "ema.decay=0.5")
    a = load_file(full / "model/unet/diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "model/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    shadow = load_file(full / "checkpoints/step-0000004/ema.safetensors")
    assert int(shadow["updates"]) == 4
    # the EMA computed here from the raw weights of every step: a run without EMA (the EMA never feeds back into
    # training) checkpointed at every step, starting from the same initial weights
    raw = tmp_path / "raw"
    train(_cfg(raw, shapes_dir, "checkpoint_every=1"))
    weights = [load_file(raw / f"checkpoints/step-{n:07d}/model.safetensors") for n in range(1, 5)]
    ema = {k: v.float() for k, v in build_components("tiny", seed=0).unet.state_dict().items()}
    for n, w in enumerate(weights):  # n updates so far; warmup caps the decay at (1 + n) / (10 + n)
        decay = min(0.5, (1 + n) / (10 + n))
        ema = {k: decay * ema[k] + (1 - decay) * w[k] for k in ema}
    assert a.keys() == ema.keys()
    for k in a:
        torch.testing.assert_close(a[k], ema[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a[k], weights[-1][k]) for k in a)  # not the raw weights


# ---- loss options --------------------------------------------------------------------------------
def _draw(world=1, rank=0):
    return GlobalDraw(seed=3, micro_step=0, rank=rank, world=world, device="cpu")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_the_paper(kind):
    snr = torch.tensor([0.01, 0.5, 5.0, 100.0])
    w = snr_weights(snr, kind, snr_gamma=5.0, inverse_snr_max=None)
    expected = {"epsilon": torch.minimum(snr, torch.tensor(5.0)) / snr,
                "v_prediction": torch.minimum(snr, torch.tensor(5.0)) / (snr + 1),
                "sample": torch.minimum(snr, torch.tensor(5.0))}[kind]
    torch.testing.assert_close(w, expected)
    w2 = snr_weights(snr, kind, snr_gamma=5.0, inverse_snr_max=20.0)
    torch.testing.assert_close(w2, expected * (1 / snr).clamp(1, 20))
    assert torch.equal(snr_weights(snr, kind, None, None), torch.ones(4))


def test_timestep_range_and_high_noise_fraction():
    class L:
        timestep_min, timestep_max, high_noise_fraction, high_noise_start = 100, 900, 0.5, 600
    t = sample_timesteps(_draw(), 4000, 1000, L)
    assert t.min() >= 100 and t.max() < 900
    high = (t >= 600).float().mean().item()  # 0.5 + 0.5 * 300/800 expected
    assert abs(high - (0.5 + 0.5 * 300 / 800)) < 0.03


def test_draws_do_not_depend_on_how_the_batch_is_split():
    whole = _draw(world=1).randn((4, 2))
    halves = torch.cat([_draw(world=2, rank=r).randn((2, 2)) for r in range(2)])
    assert torch.equal(whole, halves)


def test_noise_offset_and_input_perturbation():
    noise = make_noise(_draw(), (64, 4, 8, 8), noise_offset=0.5)
    per_channel = noise.mean(dim=(2, 3))
    assert per_channel.std() > 0.3  # a per-channel shift on top of unit noise
    assert torch.equal(make_noise(_draw(), (2, 4, 8, 8), 0.0), _draw().randn((2, 4, 8, 8)))
    base = torch.zeros(2, 4, 8, 8)
    assert torch.equal(perturb_input_noise(_draw(), base, 0.0), base)
    assert perturb_input_noise(_draw(), base, 0.1).abs().mean() > 0.05


def test_zero_terminal_snr_with_v_prediction_trains_and_exports_that_scheduler(tmp_path, shapes_dir):
    out = tmp_path / "ztsnr"
    train(_cfg(out, shapes_dir, "max_steps=2", "loss.zero_terminal_snr=true", "model.prediction_type=v_prediction",
               "loss.snr_gamma=5", "loss.noise_offset=0.05", "loss.input_perturbation=0.1",
               "loss.timestep_min=10", "loss.high_noise_fraction=0.25"))
    sched = DDPMScheduler.from_pretrained(out / "model", subfolder="scheduler")
    assert sched.config.rescale_betas_zero_snr and sched.config.prediction_type == "v_prediction"
    assert float(sched.alphas_cumprod[-1]) < 1e-6
    assert all(np.isfinite(m["loss"]) for m in read_metrics(out).values())


# ---- validation ----------------------------------------------------------------------------------
def test_validation_grids_and_a_deterministic_held_out_loss(tmp_path, shapes_dir):
    out = tmp_path / "val"
    extra = ["validation.every=2", "validation.prompts=[a red circle on the left, a blue square]",
             "validation.num_images_per_prompt=2", "validation.steps=2", "validation.holdout=4"]
    trainer = Trainer(_cfg(out, shapes_dir, *extra))
    trainer.run()
    grids = sorted((out / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-0000002.png", "step-0000004.png"]
    meta = json.loads(grids[0].with_suffix(".json").read_text())
    assert meta["prompts"] == ["a red circle on the left"] * 2 + ["a blue square"] * 2
    logged = read_metrics(out)
    assert "val_loss" in logged[2] and "val_loss" in logged[4]
    expected = _held_out_loss_with_diffusers(out / "model", trainer.holdout, trainer.cfg.validation)
    assert logged[4]["val_loss"] == pytest.approx(expected, rel=1e-5)  # step 4's weights are the exported ones
    assert trainer.validate()["val_loss"] == pytest.approx(expected, rel=1e-5)
    held_out = {int(i) for batch in trainer.holdout for i in batch["index"]}
    assert held_out == {0, 1, 2, 3} and not held_out & set(trainer.loader.batch_sampler.sampler.indices)


@torch.no_grad()
def _held_out_loss_with_diffusers(model_dir, batches, v) -> float:
    """The validation loss as specified, computed with diffusers' own pipeline and scheduler from the exported folder:
    mean ε-MSE over the held-out samples at each of ``v.loss_timesteps``, latents = posterior mode x scaling factor,
    noise seeded by (validation seed, timestep, sample index)."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    sched = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    losses = []
    for batch in batches:
        latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.mode() * pipe.vae.config.scaling_factor
        embeds = pipe.encode_prompt(batch["caption"], "cpu", 1, False)[0]
        for t in v.loss_timesteps:
            noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
                v.seed * 1_000_003 + t * 10_007 + int(i))) for i in batch["index"]])
            steps = torch.full((len(latents),), t)
            pred = pipe.unet(sched.add_noise(latents, noise, steps), steps, encoder_hidden_states=embeds).sample
            losses += ((pred - noise) ** 2).mean(dim=(1, 2, 3)).tolist()
    return sum(losses) / len(losses)


def test_8bit_adam_without_bitsandbytes_says_what_to_do(tmp_path, shapes_dir):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        Trainer(_cfg(tmp_path / "b", shapes_dir, "optim.use_8bit_adam=true"))


# ---- many processes ------------------------------------------------------------------------------
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path, shapes_dir):
    def run(out, procs, batch):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "configs/accelerate/2cpu.yaml"), "--num_processes", str(procs)] if procs > 1 else \
                 [sys.executable]
        cmd = [*launch, str(ROOT / "train_scripts/train.py"), "--config", str(ROOT / "configs/train/tiny.yaml"),
               f"output_dir={out}", f"data.dataset={shapes_dir}", "max_steps=3", "checkpoint_every=2",
               f"optim.train_batch_size={batch}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return read_metrics(out)

    one, two = run(tmp_path / "one", 1, 4), run(tmp_path / "two", 2, 2)
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        assert abs(one[step]["loss"] - two[step]["loss"]) < 1e-4
    assert (tmp_path / "two/checkpoints/step-0000002/random_states_1.pkl").is_file()  # both ranks checkpointed
    assert (tmp_path / "two/model/model_index.json").is_file()


# ---- aspect-ratio buckets ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_aspect_dir(tmp_path_factory):
    import PIL.Image

    root = tmp_path_factory.mktemp("mixed")
    lines = []
    for i, (w, h) in enumerate([(128, 64), (64, 128), (96, 96), (120, 60)] * 4):
        PIL.Image.new("RGB", (w, h), (40 * i % 255, 90, 200)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_bucketed_training_resumes_exactly(tmp_path, mixed_aspect_dir):
    full, resumed = _full_and_resumed(tmp_path, mixed_aspect_dir, "data.buckets=true", "data.bucket_step=16")
    a, b = read_metrics(full), read_metrics(resumed)
    assert all(a[s]["loss"] == b[s]["loss"] for s in (3, 4))


# ---- caches --------------------------------------------------------------------------------------
def test_training_from_the_cache_gives_the_same_losses(tmp_path, shapes_dir):
    common = ["data.random_flip=true", "data.caption_dropout=0.3", "max_steps=3"]
    plain = tmp_path / "plain"
    train(_cfg(plain, shapes_dir, *common))
    cached = tmp_path / "cached"
    train(_cfg(cached, shapes_dir, *common, "cache.latents=true", "cache.text=true", "cache.shard_size=8"))
    a, b = read_metrics(plain), read_metrics(cached)
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5
    shards = sorted((cached / "cache").rglob("*.safetensors"))
    assert shards and len(shards) < 16 + 8  # sharded, not a file per image


# ---- LoRA ----------------------------------------------------------------------------------------
def test_lora_finetune_exports_load_in_diffusers_and_match_the_trained_model(tmp_path, shapes_dir, tiny_model_dir):
    import diffusers

    from latentsd import LatentDiffusionPipeline

    out = tmp_path / "lora"
    trainer = Trainer(_cfg(out, shapes_dir, f"model.pretrained={tiny_model_dir}", "lora.enabled=true",
                           "lora.rank=4", "lora.alpha=8", "lora.text_encoder=true", "optim.learning_rate=1e-2",
                           "max_steps=3"))
    trainer.run()
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert all(not p.requires_grad for n, p in trainer.parts.vae.named_parameters())

    def images(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red circle", num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    trained = images(trainer.pipeline())
    base = images(LatentDiffusionPipeline.from_pretrained(tiny_model_dir))
    assert np.abs(trained - base).max() > 1e-3  # the adapters really change generation
    for lora in (out / "lora", out / "lora/lora_kohya.safetensors"):
        for cls in (LatentDiffusionPipeline, diffusers.StableDiffusionPipeline):
            pipe = cls.from_pretrained(tiny_model_dir)
            pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora),
                                   weight_name=lora.name if lora.is_file() else None)
            np.testing.assert_allclose(images(pipe), trained, atol=1e-4)
    merged = images(LatentDiffusionPipeline.from_pretrained(out / "model"))  # the full model, LoRA merged in
    np.testing.assert_allclose(merged, trained, atol=1e-4)


def test_lora_under_fp16_keeps_trainable_weights_fp32(tmp_path, shapes_dir):
    trainer = Trainer(_cfg(tmp_path / "fp16", shapes_dir, "lora.enabled=true", "mixed_precision=fp16",
                           "max_steps=2", "checkpoint_every=10"))
    trainer.run()
    assert trainer.parts.unet.dtype == torch.float16  # frozen base in fp16
    assert trainer.params and all(p.dtype == torch.float32 for p in trainer.params)
    assert all(np.isfinite(m["loss"]) for m in read_metrics(tmp_path / "fp16").values())
