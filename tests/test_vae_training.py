"""The VAE trainer on the tiny model config: runs and saves a loadable VAE with its measured scaling factor,
resumes bit-identically, rejects unknown keys, and its loss really weights foreground pixels."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from latentsd.config import ConfigError, save_config
from latentsd.data.shapes import all_specs, make_shapes_dataset
from latentsd.training.checkpoint import list_checkpoints
from latentsd.training.vae import (
    StepBatches,
    foreground_weights,
    load_vae_config,
    train_vae,
    weighted_recon_loss,
)

ROOT = Path(__file__).resolve().parent.parent


def _cfg(out, *extra):
    # tiny VAE at 32 px on 1 thread: on a shared 2-core machine a second torch thread mostly spin-waits
    base = [f"output_dir={out}", "model_config=tiny", "dataset=shapes:16", "resolution=32", "batch_size=4",
            "max_steps=5", "checkpoint_every=5", "log_every=1", "scale_samples=8", "eval_samples=0", "num_threads=1"]
    return load_vae_config(ROOT / "configs/train/shapes_vae.yaml", base + list(extra))


def _weights(out):
    return load_file(Path(out) / "vae/diffusion_pytorch_model.safetensors")


def test_short_run_saves_a_loadable_vae_with_the_measured_scaling_factor(tmp_path):
    out = tmp_path / "run"
    path = train_vae(_cfg(out, "max_steps=6", "scale_samples=16"))  # every training image
    assert path == out / "vae"
    vae = AutoencoderKL.from_pretrained(path)
    # 1/std of the latents the UNet trainer samples, from the saved VAE's posteriors of the 16 training images
    # (generated here): for z ~ N(mu, sigma²) elementwise, Var z = mean(mu² + sigma²) - mean(mu)²
    images = make_shapes_dataset(16, seed=0, size=32, specs=all_specs(shapes=_cfg(out).shapes))["image"]
    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for im in images])
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    mu, var = posterior.mean, posterior.var
    std = ((mu.square() + var).mean() - mu.mean().square()).sqrt().item()
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=0.08)  # 1024 sampled latents: ~2 % noise
    assert vae.config.scaling_factor != 0.18215  # the tiny config's placeholder was replaced
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (out / "config.yaml").is_file() and [p.name for p in list_checkpoints(out)] == ["step-0000005", "step-0000006"]
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))


def test_resume_gives_bit_identical_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # the stand-in interruption is a shorter run, so the LR must not depend on max_steps: constant here
    const = "lr_min_ratio=1.0"
    train_vae(_cfg(a, "max_steps=6", "checkpoint_every=3", const))
    train_vae(_cfg(b, "max_steps=4", "checkpoint_every=3", const))  # "interrupted" at step 4; resume from step 3
    train_vae(_cfg(b, "max_steps=6", "checkpoint_every=3", const, f"resume={b / 'checkpoints/step-0000003'}"))
    logged = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (AutoencoderKL.load_config(p / "vae")["scaling_factor"] for p in (a, b))
    assert sa == sb
    # resume=latest of a finished run: nothing to train; vae/ is rewritten (atomically) with the same weights
    train_vae(_cfg(b, "max_steps=6", const, "resume=latest"))
    wc = _weights(b)
    assert all(torch.equal(wa[k], wc[k]) for k in wa) and not list(b.glob(".old-*"))


def test_unknown_key_and_bad_values_fail_naming_the_key():
    with pytest.raises(ConfigError, match="unknown key 'kl_weigth'.*did you mean 'kl_weight'"):
        load_vae_config(ROOT / "configs/train/shapes_vae.yaml", ["kl_weigth=1e-6"])
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_vae_config({"bogus": 1})
    with pytest.raises(ConfigError, match="dataset: expected shapes:N"):
        load_vae_config(None, ["dataset=shapes:lots"])
    with pytest.raises(ConfigError, match="resolution"):
        load_vae_config(None, ["resolution=60"])


def test_recipe_file_loads_round_trips_and_has_the_measured_recipe(tmp_path):
    cfg = load_vae_config(ROOT / "configs/train/shapes_vae.yaml")
    assert load_vae_config(save_config(cfg, tmp_path / "c.yaml")) == cfg
    assert (cfg.model_config, cfg.max_steps, cfg.batch_size, cfg.learning_rate) == ("shapes", 1200, 16, 1e-3)
    assert (cfg.lr_min_ratio, cfg.max_grad_norm, "star" in cfg.shapes) == (0.05, 1.0, True)
    assert (cfg.kl_weight, cfg.foreground_weight) == (1e-5, 10.0)


def test_foreground_pixels_are_weighted():
    target = torch.ones(1, 3, 4, 4)  # white
    target[0, 0, 1, 1] = 0.5  # one reddish (non-white) pixel
    w = foreground_weights(target, 10.0)
    assert w.shape == (1, 1, 4, 4) and w[0, 0, 1, 1] == 10 and (w.sum() - 10) == 15
    assert torch.equal(foreground_weights(target, 1.0), torch.ones(1, 1, 4, 4))
    # the same error costs 10x more on the shape pixel than on a background pixel
    err_fg, err_bg = target.clone(), target.clone()
    err_fg[0, :, 1, 1] -= 0.1
    err_bg[0, :, 2, 2] -= 0.1
    (l1_fg, mse_fg), (l1_bg, mse_bg) = (weighted_recon_loss(e, target, w) for e in (err_fg, err_bg))
    assert l1_fg == pytest.approx(10 * l1_bg) and mse_fg == pytest.approx(10 * mse_bg)
    # a 1-level rounding difference from white is still background
    assert foreground_weights(torch.full((1, 3, 2, 2), 1 - 1 / 127.5), 10.0).eq(1).all()


def test_batches_are_a_pure_function_of_seed_and_step():
    full = list(StepBatches(10, 4, seed=3, start=0, max_steps=6))
    assert list(StepBatches(10, 4, seed=3, start=4, max_steps=6)) == full[4:]
    seen = [i for b in full[:5] for i in b]  # 20 positions = two epochs, each a permutation
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_cosine_lr_runs_from_peak_to_the_floor():
    from latentsd.training.vae import cosine_lr

    assert cosine_lr(1e-3, 0.05, 1, 100) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 0.05, 100, 100) == pytest.approx(5e-5)
    assert cosine_lr(1e-3, 1.0, 50, 100) == pytest.approx(1e-3)  # ratio 1 = constant
    lrs = [cosine_lr(1e-3, 0.05, s, 100) for s in range(1, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
