"""Loss weightings and robust losses against closed forms: min-SNR for ε, v and x₀, debiased estimation combined
with it, pseudo-Huber / smooth-L1, the scheduled Huber c(t) of Khrapov et al. 2024; and their wiring in the trainer."""

import math
from pathlib import Path
from types import SimpleNamespace

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from latentsd.config import ConfigError, load_config
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.models import build_components
from latentsd.training.logs import read_metrics
from latentsd.training.losses import elementwise_loss, huber_c, snr_weights, weighted_loss
from latentsd.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["epsilon", "v_prediction", "sample"]


def _diffusers_snr(timesteps, zero_terminal_snr=False):
    """SNR from diffusers' own DDPM scheduler (SD's betas), float64."""
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    rescale_betas_zero_snr=zero_terminal_snr)
    a = sched.alphas_cumprod.double()[timesteps]
    return a / (1 - a), sched


@pytest.mark.parametrize("kind", KINDS)
def test_min_snr_weight_is_the_closed_form_for_each_target_including_zero_terminal_snr(kind):
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    snr, _ = _diffusers_snr(t, zero_terminal_snr=True)  # SNR(999) = 0 exactly
    gamma = 5.0
    capped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    expected = {"epsilon": torch.where(snr > 0, capped / snr, torch.ones_like(snr)),  # min(SNR, γ)/SNR → 1 at SNR 0
                "v_prediction": capped / (snr + 1), "sample": capped}[kind]
    got = snr_weights(snr.float(), kind, gamma, None)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


def test_debiased_estimation_is_one_over_root_snr_clamped_and_combines_with_min_snr():
    snr = torch.tensor([1e-5, 0.02, 1.0, 30.0, 5e3])
    clamped = snr.double().clamp(1e-3, 1e3)
    torch.testing.assert_close(snr_weights(snr, "epsilon", None, None, debiased=True).double(), clamped.rsqrt())
    both = torch.minimum(snr.double(), torch.tensor(5.0, dtype=torch.float64)) / snr.double() * clamped.rsqrt()
    torch.testing.assert_close(snr_weights(snr, "epsilon", 5.0, None, debiased=True).double(), both)
    # v-target: converted once, √SNR/(SNR + 1) for debiased alone (kohya's 1/(SNR + 1) converts twice)
    torch.testing.assert_close(snr_weights(snr, "v_prediction", None, None, debiased=True).double(),
                               clamped.rsqrt() * snr.double() / (snr.double() + 1))


@pytest.mark.parametrize("gamma,debiased", [(5.0, False), (None, True), (5.0, True)])
def test_weighted_v_and_x0_losses_equal_the_weighted_epsilon_loss_of_the_same_prediction(gamma, debiased):
    """One prediction error, expressed as ε̂, v̂ and x̂₀ through diffusers' own scheduler: each target's weight times
    its loss must equal the ε-weight times the ε-loss (what makes a weighting mean the same for every target)."""
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([5, 100, 400, 700, 990])
    snr, sched = _diffusers_snr(t)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(5, 4, 8, 8, generator=g,
                                                                                    dtype=torch.float64)
    a = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = sched.get_velocity(x0, eps, t)
    v_hat = v + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    eps_hat = a.sqrt() * v_hat + (1 - a).sqrt() * xt  # diffusers' v → ε and v → x₀ conversions
    x0_hat = a.sqrt() * xt - (1 - a).sqrt() * v_hat
    pairs = {"epsilon": (eps_hat, eps), "v_prediction": (v_hat, v), "sample": (x0_hat, x0)}
    losses = {k: ((p - q) ** 2).flatten(1).mean(1) * snr_weights(snr, k, gamma, None, debiased)
              for k, (p, q) in pairs.items()}
    torch.testing.assert_close(losses["v_prediction"], losses["epsilon"], rtol=1e-9, atol=0)
    torch.testing.assert_close(losses["sample"], losses["epsilon"], rtol=1e-9, atol=0)


def test_pseudo_huber_and_smooth_l1_against_hand_computed_values():
    pred, target = torch.tensor([[0.3, -2.0, 1e-4]]), torch.tensor([[0.0, 0.0, 0.0]])
    c = torch.tensor([0.1])
    # r = 0.3: 2·0.1·(√(0.09 + 0.01) − 0.1) = 0.2·(0.316227766 − 0.1) = 0.0432455532
    huber = elementwise_loss(pred, target, "huber", c)
    assert huber[0, 0].item() == pytest.approx(0.0432455532, rel=1e-6)
    expected = [2 * 0.1 * (math.sqrt(r * r + 0.01) - 0.1) for r in (0.3, -2.0, 1e-4)]
    torch.testing.assert_close(huber[0].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(elementwise_loss(pred, target, "smooth_l1", c)[0].double(),
                               torch.tensor(expected, dtype=torch.float64) / 0.1, rtol=1e-5, atol=0)
    # the limits: MSE for |r| ≪ c (no cancellation to 0 in fp32), 2c|r| − 2c² for |r| ≫ c
    assert huber[0, 2].item() == pytest.approx(1e-8, rel=1e-4)
    assert huber[0, 1].item() == pytest.approx(2 * 0.1 * 2.0 - 2 * 0.01, rel=2e-3)
    assert torch.equal(elementwise_loss(pred, target, "mse"), (pred - target) ** 2)


def test_weighted_loss_uses_each_samples_own_c_and_weight():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    c, w = torch.tensor([0.05, 0.5, 1.0]), torch.tensor([1.0, 0.5, 2.0])
    r = (pred - target).double()
    per = [(2 * c[i].double() * ((r[i] ** 2 + c[i].double() ** 2).sqrt() - c[i].double())).mean() for i in range(3)]
    expected = sum(p * wi for p, wi in zip(per, w.double())) / 3
    assert weighted_loss(pred, target, w, "huber", c).item() == pytest.approx(expected.item(), rel=1e-5)


def test_scheduled_huber_c_closed_forms():
    cfg = SimpleNamespace(huber_c=0.1, huber_schedule="exponential")
    t = torch.tensor([0, 500, 1000])
    snr, _ = _diffusers_snr(torch.tensor([0, 500, 999]))
    # exponential (kohya: exp(−α t), α = −ln(huber_c)/T): 1 at t = 0, √huber_c halfway, huber_c at T
    torch.testing.assert_close(huber_c(cfg, t, snr.float(), 1000).double(),
                               torch.tensor([1.0, math.sqrt(0.1), 0.1], dtype=torch.float64), rtol=1e-6, atol=0)
    cfg.huber_schedule = "snr"  # (1 − c)/(1 + σ)² + c with σ = √((1 − ᾱ)/ᾱ) from diffusers' ᾱ
    ts = torch.tensor([0, 300, 999])
    snr, sched = _diffusers_snr(ts)
    a = sched.alphas_cumprod.double()[ts]
    sigma = ((1 - a) / a).sqrt()
    torch.testing.assert_close(huber_c(cfg, ts, snr.float(), 1000).double(), (1 - 0.1) / (1 + sigma) ** 2 + 0.1,
                               rtol=1e-6, atol=0)
    zero_snr, _ = _diffusers_snr(torch.tensor([999]), zero_terminal_snr=True)
    assert huber_c(cfg, torch.tensor([999]), zero_snr.float(), 1000).item() == pytest.approx(0.1)  # σ = ∞
    cfg.huber_schedule = "constant"
    assert torch.equal(huber_c(cfg, ts, snr.float(), 1000), torch.full((3,), 0.1))


def test_bad_huber_c_is_a_clear_config_error():
    with pytest.raises(ConfigError, match=r"loss.huber_c: must be in \(0, 1\] \(the schedule falls from 1 to huber_c"):
        load_config(ROOT / "configs/train/tiny.yaml", ["loss.type=huber", "loss.huber_c=2"])
    with pytest.raises(ConfigError, match="loss.huber_c: must be > 0"):
        load_config(ROOT / "configs/train/tiny.yaml", ["loss.huber_schedule=constant", "loss.huber_c=0"])
    with pytest.raises(ConfigError, match="loss.type: must be one of 'mse', 'huber', 'smooth_l1'"):
        load_config(ROOT / "configs/train/tiny.yaml", ["loss.type=l1"])


# ---- wiring: the first step's loss of a run (same draws, same initial weights) against the plain MSE run --------
@pytest.fixture(scope="module")
def first_losses(tmp_path_factory):
    data = write_imagefolder(make_shapes_dataset(8, seed=2), tmp_path_factory.mktemp("shapes"))
    out = tmp_path_factory.mktemp("runs")

    def first_loss(name, *extra):
        train(load_config(ROOT / "configs/train/tiny.yaml", [
            f"output_dir={out / name}", f"data.dataset={data}", "max_steps=1", "optim.train_batch_size=4",
            "loss.timestep_min=999", *extra]))  # every sample at t = 999: one known SNR
        return read_metrics(out / name)[1]["loss"]

    return first_loss


def test_the_trainer_applies_loss_type_and_debiased_weight(first_losses):
    mse = first_losses("mse")
    # c = 1000 ≫ every error: pseudo-Huber equals MSE, smooth-L1 equals MSE / c (to the r²/c² term)
    assert first_losses("huber", "loss.type=huber", "loss.huber_schedule=constant", "loss.huber_c=1000") == \
        pytest.approx(mse, rel=1e-4)
    assert first_losses("smooth", "loss.type=smooth_l1", "loss.huber_schedule=constant", "loss.huber_c=1000") == \
        pytest.approx(mse / 1000, rel=1e-4)
    snr = build_components("tiny", seed=0).scheduler.snr(torch.tensor([999])).clamp(1e-3, 1e3)
    assert first_losses("debiased", "loss.debiased_estimation=true") == \
        pytest.approx(mse * snr.rsqrt().item(), rel=1e-5)


def test_resume_is_bit_identical_with_scheduled_huber_and_debiased_min_snr(tmp_path):
    data = write_imagefolder(make_shapes_dataset(8, seed=3), tmp_path / "shapes")
    on = ["loss.type=huber", "loss.huber_schedule=snr", "loss.debiased_estimation=true", "loss.snr_gamma=5",
          "model.prediction_type=v_prediction"]

    def run(out, *extra):
        train(load_config(ROOT / "configs/train/tiny.yaml", [
            f"output_dir={out}", f"data.dataset={data}", "max_steps=4", "checkpoint_every=2",
            "checkpoints_total_limit=0", "optim.train_batch_size=2", "log_every=1", *on, *extra]))
        return read_metrics(out)

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", f"resume={tmp_path}/full/checkpoints/step-0000002")
    assert sorted(resumed) == [3, 4] and all(full[s]["loss"] == resumed[s]["loss"] for s in resumed)
    unet = "model/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "full" / unet), load_file(tmp_path / "resumed" / unet)
    assert all(torch.equal(a[k], b[k]) for k in a)
