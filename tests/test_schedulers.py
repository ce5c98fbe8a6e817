"""Schedulers: parity with diffusers' DDPM/DDIM, closed forms of Ho et al., configs, no host syncs."""

import itertools
import json
import random
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch

import latentsd.schedulers as ours_module
from latentsd.schedulers import (
    DDIMScheduler,
    DDPMScheduler,
    DDPMSchedulerOutput,
    extract,
    make_betas,
    rescale_zero_terminal_snr,
)

SHAPE = (2, 4, 8, 8)
TOL = dict(rtol=1e-5, atol=1e-5)
SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False)


def fake_model(sample, t, variance_type=None):
    """Deterministic stand-in for a UNet; learned variances get a second block of channels."""
    out = 0.1 * sample + t / 1000
    if variance_type == "learned":  # diffusers reads this half as the variance itself
        return torch.cat([out, 0.01 * torch.sigmoid(sample)], dim=1)
    if variance_type == "learned_range":  # ... and this one as an interpolation weight in [-1, 1]
        return torch.cat([out, torch.tanh(sample)], dim=1)
    return out


def initial_sample():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def assert_sampling_matches(ours, theirs, begin=0, as_int=False, **step_kwargs):
    """Step both schedulers along diffusers' trajectory with equally seeded generators.

    Compares every step's outputs and, at the end, the generators' states (same random draws).
    """
    assert torch.equal(ours.timesteps, theirs.timesteps)
    gen_ours, gen_theirs = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    variance_type = theirs.config.get("variance_type")
    sample = initial_sample()
    for t_ours, t_theirs in zip(ours.timesteps[begin:], theirs.timesteps[begin:]):
        model_output = fake_model(sample, int(t_theirs), variance_type)
        timestep = int(t_ours) if as_int else t_ours
        mine = ours.step(model_output, timestep, sample, generator=gen_ours, **step_kwargs)
        ref = theirs.step(model_output, t_theirs, sample, generator=gen_theirs, **step_kwargs)
        torch.testing.assert_close(mine.prev_sample, ref.prev_sample, **TOL)
        torch.testing.assert_close(mine.pred_original_sample, ref.pred_original_sample, **TOL)
        sample = ref.prev_sample
    assert torch.equal(gen_ours.get_state(), gen_theirs.get_state())


def grid(axes, size, keep=lambda c: True, seed=0):
    """A fixed pseudo-random subset of the product of `axes` (the full product is thousands of runs)."""
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    return random.Random(seed).sample([c for c in combos if keep(c)], size)


def finite_x0(c):
    # ε-prediction at ᾱ_T = 0 divides by zero (in diffusers too); only clipping makes it finite.
    return not (c["prediction_type"] == "epsilon" and c["rescale_betas_zero_snr"] and not c["clip_sample"])


COMMON_AXES = dict(
    beta_schedule=["linear", "scaled_linear", "squaredcos_cap_v2"],
    prediction_type=["epsilon", "v_prediction", "sample"],
    timestep_spacing=["leading", "trailing", "linspace"],
    steps_offset=[0, 1],
    clip_sample=[True, False],
    rescale_betas_zero_snr=[False, True],
    num_inference_steps=[10, 25],
)
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]  # fixed_large_log: below
DDPM_AXES = dict(COMMON_AXES, variance_type=VARIANCE_TYPES)
DDIM_AXES = dict(COMMON_AXES, set_alpha_to_one=[True, False], eta=[0.0, 0.8])
DDPM_GRID = grid(DDPM_AXES, 48, finite_x0)
DDIM_GRID = grid(DDIM_AXES, 48, finite_x0)


def split(case):
    """(config, num_inference_steps, step kwargs) from a grid row."""
    config = dict(case)
    steps = config.pop("num_inference_steps")
    eta = config.pop("eta", None)
    return config, steps, ({} if eta is None else {"eta": eta})


def public(config):
    """Config entries that mean something (drops _class_name, _diffusers_version, _use_default_values)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def case_id(case):
    return "-".join(str(v) for v in case.values())


@pytest.mark.parametrize("axes,rows", [(DDPM_AXES, DDPM_GRID), (DDIM_AXES, DDIM_GRID)], ids=["ddpm", "ddim"])
def test_grids_cover_every_option(axes, rows):
    for name, values in axes.items():
        assert {row[name] for row in rows} == set(values), name


# ------------------------------------------------------------------------------ parity with diffusers


@pytest.mark.parametrize("case", DDPM_GRID, ids=case_id)
def test_ddpm_sampling_matches_diffusers(case):
    config, steps, _ = split(case)
    ours, theirs = DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert_sampling_matches(ours, theirs)


@pytest.mark.parametrize(
    "config",
    [
        {},
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", rescale_betas_zero_snr=True,
             variance_type="fixed_large", timestep_spacing="trailing", clip_sample=False),
    ],
    ids=["default", "cosine-v-zero-snr"],
)
def test_ddpm_all_1000_steps_match_diffusers(config):
    ours, theirs = DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    ours.set_timesteps(1000)
    theirs.set_timesteps(1000)
    assert_sampling_matches(ours, theirs)


@pytest.mark.parametrize("case", DDIM_GRID, ids=case_id)
def test_ddim_sampling_matches_diffusers(case):
    config, steps, step_kwargs = split(case)
    ours, theirs = DDIMScheduler(**config), diffusers.DDIMScheduler(**config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert_sampling_matches(ours, theirs, **step_kwargs)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("steps", [1, 3, 7, 10, 25, 333, 999, 1000])
def test_timesteps_match_diffusers(cls, spacing, offset, steps):
    config = dict(timestep_spacing=spacing, steps_offset=offset)
    ours, theirs = getattr(ours_module, cls)(**config), getattr(diffusers, cls)(**config)
    theirs.set_timesteps(steps)
    if theirs.timesteps.max() >= 1000:  # diffusers accepts this schedule but fails indexing in `step`
        with pytest.raises(ValueError, match="out of range"):
            ours.set_timesteps(steps)
        return
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.num_inference_steps == steps


def test_ddpm_python_int_timesteps_match_diffusers():
    ours, theirs = DDPMScheduler(variance_type="fixed_large"), diffusers.DDPMScheduler(variance_type="fixed_large")
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    assert_sampling_matches(ours, theirs, as_int=True)


def test_ddpm_custom_timesteps_match_diffusers():
    custom = [999, 800, 650, 300, 120, 40, 3, 0]
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    ours.set_timesteps(timesteps=custom)
    theirs.set_timesteps(timesteps=custom)
    assert_sampling_matches(ours, theirs)
    assert [ours.previous_timestep(t) for t in custom] == custom[1:] + [-1]
    assert torch.equal(ours.previous_timestep(ours.timesteps), torch.tensor(custom[1:] + [-1]))


def test_ddim_custom_timesteps_step_to_the_next_one():
    """diffusers' DDIM has no custom timesteps; ours steps between consecutive ones, like DDPM."""
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    theirs.set_timesteps(10)  # leading spacing: t − T//n is the next timestep, so both rules agree
    ours.set_timesteps(timesteps=theirs.timesteps.tolist())
    assert_sampling_matches(ours, theirs, eta=0.5)


def test_ddpm_without_set_timesteps_steps_one_by_one():
    ours, theirs = DDPMScheduler(num_train_timesteps=50), diffusers.DDPMScheduler(num_train_timesteps=50)
    assert_sampling_matches(ours, theirs)
    assert ours.previous_timestep(7) == 6


def test_ddpm_begin_index_and_repeated_passes_match_diffusers():
    """img2img starts part-way (pipelines call set_begin_index); a second pass needs no set_timesteps.

    The schedule ends at t = 0, where no noise is drawn: the step counter must know when that is.
    """
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    ours.set_begin_index(4)
    assert_sampling_matches(ours, theirs, begin=4)
    assert ours.step_index is None
    assert_sampling_matches(ours, theirs, begin=4)


def test_ddpm_per_sample_timesteps():
    """A 1-d timestep tensor steps every sample at its own t (t = 0 rows get no noise)."""
    sched = DDPMScheduler()
    sched.set_timesteps(10)
    timesteps = torch.tensor([sched.timesteps[2].item(), 0])
    sample = initial_sample()
    model_output = fake_model(sample, 0.5)
    batched = sched.step(model_output, timesteps, sample, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(timesteps.tolist()):
        single = sched.step(model_output, t, sample, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(batched.prev_sample[i], single.prev_sample[i], rtol=0, atol=0)
        torch.testing.assert_close(batched.pred_original_sample[i], single.pred_original_sample[i], rtol=0, atol=0)


def test_ddpm_fixed_large_log_is_fixed_large():
    """diffusers' fixed_large_log takes the square root of log β (NaN); ours uses exp(½ log β) = √β."""
    results = []
    for variance_type in ("fixed_large", "fixed_large_log"):
        sched = DDPMScheduler(variance_type=variance_type)
        sched.set_timesteps(10)
        sample, generator = initial_sample(), torch.Generator().manual_seed(0)
        results.append(sched.step(fake_model(sample, 0.3), sched.timesteps[3], sample, generator=generator).prev_sample)
    torch.testing.assert_close(results[0], results[1], **TOL)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_thresholding_matches_diffusers(cls):
    config = dict(thresholding=True, sample_max_value=2.5, dynamic_thresholding_ratio=0.9, prediction_type="sample")
    ours = getattr(ours_module, cls)(**config)
    theirs = getattr(diffusers, cls)(**config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert_sampling_matches(ours, theirs)


def test_ddim_clipped_model_output_and_variance_noise_match_diffusers():
    ours, theirs = DDIMScheduler(**SD_CONFIG), diffusers.DDIMScheduler(**SD_CONFIG)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert_sampling_matches(ours, theirs, eta=0.5, use_clipped_model_output=True)
    sample, noise = initial_sample(), torch.randn(SHAPE)
    t = ours.timesteps[5]
    mine = ours.step(fake_model(sample, 0.2), t, sample, eta=1.0, variance_noise=noise, return_dict=False)
    ref = theirs.step(fake_model(sample, 0.2), t, sample, eta=1.0, variance_noise=noise, return_dict=False)
    assert isinstance(mine, tuple)
    torch.testing.assert_close(mine[0], ref[0], **TOL)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_tables_add_noise_velocity_match_diffusers(schedule, zero_snr):
    config = dict(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    ours, theirs = DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    torch.testing.assert_close(ours.betas, theirs.betas, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-6, atol=0)
    x0, noise = initial_sample(), torch.randn(SHAPE)
    timesteps = torch.tensor([0, 999])
    for method in ("add_noise", "get_velocity"):
        mine, ref = getattr(ours, method)(x0, noise, timesteps), getattr(theirs, method)(x0, noise, timesteps)
        torch.testing.assert_close(mine, ref, **TOL)


# ------------------------------------------------------------------------------------- closed forms


def numpy_schedule(sched):
    """ᾱ_t, ᾱ_{t−1}, β_t in float64, computed from the float32 betas independently of the scheduler."""
    betas = sched.betas.double().numpy()
    alpha_bar = np.cumprod(1 - betas)
    return alpha_bar, np.append(1.0, alpha_bar[:-1]), betas


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_posterior_tables_follow_eq7(schedule):
    sched = DDPMScheduler(beta_schedule=schedule)
    alpha_bar, alpha_bar_prev, betas = numpy_schedule(sched)
    coef1 = betas * np.sqrt(alpha_bar_prev) / (1 - alpha_bar)
    coef2 = (1 - alpha_bar_prev) * np.sqrt(1 - betas) / (1 - alpha_bar)
    variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
    close = dict(rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(sched.posterior_mean_coef1.numpy(), coef1, **close)
    np.testing.assert_allclose(sched.posterior_mean_coef2.numpy(), coef2, **close)
    np.testing.assert_allclose(sched.posterior_variance.numpy(), variance, **close)
    np.testing.assert_allclose(
        sched.posterior_log_variance_clipped.numpy(), np.log(np.append(variance[1], variance[1:])), rtol=1e-6
    )
    np.testing.assert_allclose(sched.alphas_cumprod_prev.numpy(), alpha_bar_prev, rtol=1e-5)
    np.testing.assert_allclose(sched.sqrt_recip_alphas_cumprod.numpy(), np.sqrt(1 / alpha_bar), rtol=1e-6)
    np.testing.assert_allclose(sched.sqrt_recipm1_alphas_cumprod.numpy(), np.sqrt(1 / alpha_bar - 1), rtol=1e-6)


def test_add_noise_velocity_snr_closed_forms():
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    alpha_bar = numpy_schedule(sched)[0]
    timesteps = torch.tensor([3, 777])
    x0, noise = initial_sample(), torch.randn(SHAPE)
    a = alpha_bar[timesteps.numpy()].reshape(-1, 1, 1, 1)
    x0_64, noise_64 = x0.double().numpy(), noise.double().numpy()
    noisy = np.sqrt(a) * x0_64 + np.sqrt(1 - a) * noise_64  # Ho et al. Eq. 4
    velocity = np.sqrt(a) * noise_64 - np.sqrt(1 - a) * x0_64
    np.testing.assert_allclose(sched.add_noise(x0, noise, timesteps).numpy(), noisy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sched.get_velocity(x0, noise, timesteps).numpy(), velocity, rtol=1e-5, atol=1e-5)
    snr = sched.snr(timesteps)
    assert snr.shape == (2,)
    np.testing.assert_allclose(snr.numpy(), alpha_bar[[3, 777]] / (1 - alpha_bar[[3, 777]]), rtol=1e-4)


def test_zero_terminal_snr():
    sched = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert sched.snr(torch.tensor([999])).item() == pytest.approx(0.0, abs=1e-12)
    plain = make_betas(1000, 0.0001, 0.02, "scaled_linear")
    rescaled = rescale_zero_terminal_snr(plain)
    # Algorithm 1 keeps ᾱ_0 (√ᾱ_0 is the fixed point of the affine map).
    assert torch.cumprod(1 - rescaled, 0)[0].item() == pytest.approx(torch.cumprod(1 - plain, 0)[0].item(), rel=1e-6)
    torch.testing.assert_close(sched.betas, rescaled)


def test_trained_betas_are_used_as_given(tmp_path):
    betas = np.linspace(0.001, 0.03, 20)
    sched = DDPMScheduler(num_train_timesteps=20, trained_betas=betas.tolist(), beta_schedule="unused-name")
    torch.testing.assert_close(sched.betas, torch.tensor(betas, dtype=torch.float32))
    sched.save_pretrained(tmp_path)
    torch.testing.assert_close(DDPMScheduler.from_pretrained(tmp_path).betas, sched.betas)


def test_extract_broadcasts_on_sample_device_and_dtype():
    table = torch.arange(10, dtype=torch.float32)
    sample = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    gathered = extract(table, torch.tensor([1, 5, 9]), sample)
    assert gathered.shape == (3, 1, 1, 1) and gathered.dtype == torch.float64
    assert gathered.flatten().tolist() == [1, 5, 9]
    assert extract(table, torch.tensor(4), sample).shape == (1, 1, 1, 1)
    assert extract(table, 7, sample).flatten().tolist() == [7]


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "cls,extra", [(DDPMScheduler, dict(variance_type="fixed_large")), (DDIMScheduler, dict(set_alpha_to_one=False))]
)
def test_save_and_load_round_trip(tmp_path, cls, extra):
    sched = cls(**SD_CONFIG, prediction_type="v_prediction", timestep_spacing="trailing", **extra)
    sched.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == cls.__name__
    loaded = cls.from_pretrained(tmp_path)
    assert public(loaded.config) == public(sched.config)
    torch.testing.assert_close(loaded.alphas_cumprod, sched.alphas_cumprod)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_from_config_both_ways_with_diffusers(name):
    ours_cls = getattr(ours_module, name)
    ours = ours_cls(**SD_CONFIG, prediction_type="v_prediction")
    theirs = getattr(diffusers, name).from_config(ours.config)
    assert public(theirs.config) == public(ours.config)
    back = ours_cls.from_config(theirs.config)
    assert isinstance(back, ours_cls) and public(back.config) == public(ours.config)
    back.set_timesteps(10)
    theirs.set_timesteps(10)
    assert_sampling_matches(back, theirs)


def test_from_config_of_other_schedulers():
    # Stable Diffusion v1's scheduler_config.json (a PNDM config with keys PNDM itself ignores).
    sd_v1 = dict(
        _class_name="PNDMScheduler", _diffusers_version="0.6.0", beta_end=0.012, beta_schedule="scaled_linear",
        beta_start=0.00085, clip_sample=False, num_train_timesteps=1000, set_alpha_to_one=False,
        skip_prk_steps=True, steps_offset=1, trained_betas=None,
    )
    configs = [sd_v1, diffusers.PNDMScheduler.from_config(sd_v1).config, DDIMScheduler().config, DDPMScheduler().config]
    for config, name in itertools.product(configs, ["DDPMScheduler", "DDIMScheduler"]):
        ours = getattr(ours_module, name).from_config(config)  # foreign keys are kept, unused, like diffusers does
        assert public(ours.config) == public(getattr(diffusers, name).from_config(config).config)
    ddim = DDIMScheduler.from_config(sd_v1)
    assert ddim.config.steps_offset == 1 and ddim.config.set_alpha_to_one is False
    assert ddim.final_alpha_cumprod.item() == pytest.approx(ddim.alphas_cumprod[0].item())
    assert diffusers.DDIMScheduler in ddim.compatibles


def test_stable_diffusion_pipeline_runs_our_schedulers():
    """Our schedulers in diffusers' StableDiffusionPipeline give diffusers' latents (tiny UNet, no VAE/CLIP)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()
    embeds = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0))

    def generate(scheduler, eta):
        pipe = diffusers.StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompt_embeds=embeds, height=32, width=32, num_inference_steps=3, guidance_scale=1.0, eta=eta,
            output_type="latent", generator=torch.Generator().manual_seed(0),
        ).images

    for name, eta in (("DDPMScheduler", 0.0), ("DDIMScheduler", 0.7)):
        ours = getattr(ours_module, name)(**SD_CONFIG)
        torch.testing.assert_close(generate(ours, eta), generate(getattr(diffusers, name)(**SD_CONFIG), eta), **TOL)


def test_pipeline_passes_eta_and_generator_only_where_accepted():
    prepare = diffusers.StableDiffusionPipeline.prepare_extra_step_kwargs
    generator = torch.Generator()
    assert prepare(SimpleNamespace(scheduler=DDPMScheduler()), generator, 0.5) == {"generator": generator}
    assert prepare(SimpleNamespace(scheduler=DDIMScheduler()), generator, 0.5) == {"eta": 0.5, "generator": generator}


# -------------------------------------------------------------------------------------- host syncs

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize(
    "sched,step_kwargs",
    [
        (DDPMScheduler(variance_type="learned_range"), {}),
        (DDPMScheduler(thresholding=True, sample_max_value=2.0, prediction_type="v_prediction"), {}),
        (DDPMScheduler(variance_type="fixed_small_log", timestep_spacing="trailing"), {}),
        (DDIMScheduler(set_alpha_to_one=False, steps_offset=1), {"eta": 0.5, "use_clipped_model_output": True}),
    ],
    ids=["ddpm-learned-range", "ddpm-threshold", "ddpm-trailing", "ddim-eta"],
)
def test_step_never_reads_tensors_on_the_host(monkeypatch, sched, step_kwargs):
    """Converting a tensor to a Python value (what forces a GPU sync) inside `step` raises."""
    sched.set_timesteps(10)
    reference = diffusers.DDPMScheduler if isinstance(sched, DDPMScheduler) else diffusers.DDIMScheduler
    theirs = reference.from_config(sched.config)
    theirs.set_timesteps(10)
    variance_type = sched.config.get("variance_type")
    sample, ref_sample = initial_sample(), initial_sample()
    gen, ref_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        model_output = fake_model(sample, t, variance_type)
        with monkeypatch.context() as patch:
            for name in HOST_READS:
                patch.setattr(torch.Tensor, name, _forbidden(name))
            with pytest.raises(AssertionError):
                bool(t)  # the patch is live
            sample = sched.step(model_output, t, sample, generator=gen, **step_kwargs).prev_sample
        ref_output = fake_model(ref_sample, t, variance_type)
        ref_sample = theirs.step(ref_output, t, ref_sample, generator=ref_gen, **step_kwargs).prev_sample
    torch.testing.assert_close(sample, ref_sample, **TOL)


def _forbidden(name):
    def read(*args, **kwargs):
        raise AssertionError(f"Tensor.{name} called inside step (host sync)")

    return read


@pytest.mark.gpu
@pytest.mark.parametrize("cls,step_kwargs", [(DDPMScheduler, {}), (DDIMScheduler, {"eta": 0.5})])
def test_step_never_syncs_on_cuda(cls, step_kwargs):
    sched = cls(variance_type="learned_range") if cls is DDPMScheduler else cls()
    sched.set_timesteps(10, device="cuda")
    generator = torch.Generator("cuda").manual_seed(0)
    sample = initial_sample().cuda()
    variance_type = sched.config.get("variance_type")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in sched.timesteps:
            model_output = fake_model(sample, t, variance_type)
            sample = sched.step(model_output, t, sample, generator=generator, **step_kwargs).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(sample).all()


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_bad_config_values_raise_clear_errors(cls):
    with pytest.raises(ValueError, match="linear, scaled_linear, squaredcos_cap_v2"):
        cls(beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type 'noise'.*epsilon"):
        cls(prediction_type="noise")
    with pytest.raises(ValueError, match="timestep_spacing"):
        cls(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="trained_betas"):
        cls(num_train_timesteps=10, trained_betas=[0.1] * 9)
    with pytest.raises(ValueError, match="Unknown beta_schedule"):
        make_betas(10, beta_schedule="quadratic")


def test_bad_variance_type_and_learned_output_shape():
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="learned_large")
    sched = DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="8 channels"):
        sched.step(initial_sample(), 999, initial_sample())


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_bad_set_timesteps_arguments(cls):
    sched = cls()
    with pytest.raises(ValueError, match="cannot|between 1 and"):
        sched.set_timesteps(1001)
    with pytest.raises(ValueError, match="between 1 and"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps(10, timesteps=[5, 1])
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="descending"):
        sched.set_timesteps(timesteps=[1, 5])
    with pytest.raises(ValueError, match="must lie in"):
        sched.set_timesteps(timesteps=[1000, 5])


def test_step_errors():
    ddpm = DDPMScheduler()
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match="not part of the current schedule"):
        ddpm.step(initial_sample(), 901, initial_sample())
    ddim = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(initial_sample(), 999, initial_sample())
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="not both"):
        sample = initial_sample()
        ddim.step(sample, 900, sample, eta=1.0, generator=torch.Generator(), variance_noise=torch.randn(SHAPE))


def test_interface_basics():
    for sched in (DDPMScheduler(), DDIMScheduler()):
        assert len(sched) == 1000 and sched.order == 1 and sched.init_noise_sigma == 1.0
        sample = initial_sample()
        assert sched.scale_model_input(sample, 5) is sample
        sched.set_timesteps(10)
        out = sched.step(fake_model(sample, 0), sched.timesteps[-1], sample)
        assert isinstance(out, DDPMSchedulerOutput) and out.prev_sample.shape == SHAPE


# ------------------------------------------------------------------------------ training, then sampling


def train_then_sample(cls, device, steps=10):
    """Use a scheduler for training on `device` (add_noise, get_velocity, snr), then sample on that device."""
    sched = cls(**SD_CONFIG)
    x0, noise = initial_sample().to(device), torch.randn(SHAPE).to(device)
    timesteps = torch.tensor([3, 777], device=device)
    for method in ("add_noise", "get_velocity"):
        assert getattr(sched, method)(x0, noise, timesteps).device == x0.device
    assert sched.snr(timesteps).device == x0.device
    sched.set_timesteps(steps, device=device)
    sample, generator = x0, None if x0.is_meta else torch.Generator(device).manual_seed(0)
    for t in sched.timesteps:
        sample = sched.step(fake_model(sample, t), t, sample, generator=generator).prev_sample
    assert sample.shape == SHAPE and sample.device == x0.device
    return sched, sample


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_training_tables_on_a_device_then_set_timesteps_there_and_on_cpu(cls):
    """`meta` stands in for an accelerator: shapes and devices only, no values."""
    sched, _ = train_then_sample(cls, "meta")
    assert sched.alphas_cumprod.device.type == "cpu"  # the public tables stay put
    sched.set_timesteps(10)  # back to the CPU: every step table is on the CPU again, numbers as diffusers'
    theirs = getattr(diffusers, cls.__name__)(**SD_CONFIG)
    theirs.set_timesteps(10)
    assert_sampling_matches(sched, theirs)
    torch.testing.assert_close(sched.add_noise(initial_sample(), initial_sample(), torch.tensor([5, 500])),
                               theirs.add_noise(initial_sample(), initial_sample(), torch.tensor([5, 500])),
                               rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_training_on_cuda_then_sampling_on_cuda_equals_a_fresh_scheduler(cls):
    _, on_cuda = train_then_sample(cls, "cuda")
    fresh = cls(**SD_CONFIG)
    fresh.set_timesteps(10, device="cuda")
    sample, generator = initial_sample().cuda(), torch.Generator("cuda").manual_seed(0)
    for t in fresh.timesteps:
        sample = fresh.step(fake_model(sample, t), t, sample, generator=generator).prev_sample
    torch.testing.assert_close(on_cuda, sample, rtol=0, atol=0)
