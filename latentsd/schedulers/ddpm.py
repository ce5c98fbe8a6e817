"""DDPM ancestral sampler (Ho et al. 2020), written from the paper and matching diffusers' DDPMScheduler.

`DiscreteScheduler` holds everything DDPM and DDIM share: the β/ᾱ tables, timestep spacing, the
per-step coefficient tables built by `set_timesteps`, x_0 prediction and clipping, `add_noise`.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .schedules import extract, make_betas, posterior_coefficients, rescale_zero_terminal_snr

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    """Result of one `step`: x_{t'} (`prev_sample`) and the model's x_0 estimate (`pred_original_sample`)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(allowed)}.")


class DiscreteScheduler(SchedulerMixin, ConfigMixin):
    """Base for discrete-time DDPM-family schedulers; subclasses define `__init__` and `step`.

    Sampling coefficients live in tables indexed by *training* timestep (NaN where a timestep is not
    part of the current schedule), so `step` is a handful of on-device gathers: no host sync.
    """

    config_name = "scheduler_config.json"
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    def _init_schedule(self, set_alpha_to_one: bool) -> None:
        """Build the training tables from the registered config and install the full T-step schedule."""
        cfg = self.config
        _check_choice("prediction_type", cfg.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        betas = make_betas(
            cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule, cfg.trained_betas
        )
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self._set_training_tables(betas)
        # ᾱ used after the last step (t' < 0): 1 means "fully denoised" (DDPM always, DDIM by default).
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._set_schedule(np.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=np.int64), device=None)

    def _set_training_tables(self, betas: torch.Tensor) -> None:
        """Precompute the one-step (t → t−1) float32 tables, named as in improved-diffusion."""
        # ᾱ and its square roots in float32 exactly as diffusers computes them (add_noise/step parity).
        self._device_tables = {}  # (name, device) → (table, its copy on device), see _training_table
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # The rest subtract nearly equal numbers where ᾱ ≈ 1 (1/ᾱ − 1, 1 − ᾱ_t/ᾱ_{t−1}), losing about three
        # digits in float32: compute them in float64 from the exact β_t, then store float32.
        betas64 = betas.double()
        alphas_cumprod64 = torch.cumprod(1 - betas64, dim=0)
        alphas_cumprod_prev64 = torch.cat([alphas_cumprod64.new_ones(1), alphas_cumprod64[:-1]])
        self.sqrt_recip_alphas_cumprod = (1 / alphas_cumprod64).sqrt().float()
        self.sqrt_recipm1_alphas_cumprod = (1 / alphas_cumprod64 - 1).sqrt().float()
        _, variance, coef1, coef2 = posterior_coefficients(alphas_cumprod64, alphas_cumprod_prev64, beta=betas64)
        self.posterior_variance = variance.float()
        # β̃_0 = 0, so its log is replaced by log β̃_1 (as improved-diffusion does).
        self.posterior_log_variance_clipped = torch.log(torch.cat([variance[1:2], variance[1:]])).float()
        self.posterior_mean_coef1 = coef1.float()
        self.posterior_mean_coef2 = coef2.float()

    # ----------------------------------------------------------------------------------- timesteps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the sampling timesteps (descending) and precompute every per-step table on `device`.

        Pass either `num_inference_steps` (spaced per `config.timestep_spacing`) or a strictly
        descending list of custom `timesteps`.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` or `timesteps`.")
        if timesteps is not None:
            schedule = self._custom_timesteps(timesteps)
        else:
            schedule = self._spaced_timesteps(num_inference_steps)
        num_train = self.config.num_train_timesteps
        if schedule.max() >= num_train:
            raise ValueError(
                f"Timestep {schedule.max()} is out of range for num_train_timesteps={num_train} "
                f"(steps_offset={self.config.steps_offset} with 'leading' spacing pushes it past the end)."
            )
        self.custom_timesteps = timesteps is not None
        self.num_inference_steps = len(schedule) if self.custom_timesteps else num_inference_steps
        self._set_schedule(schedule, device)

    def _custom_timesteps(self, timesteps) -> np.ndarray:
        schedule = np.asarray(timesteps, dtype=np.int64)
        if schedule.ndim != 1 or len(schedule) == 0 or np.any(np.diff(schedule) >= 0):
            raise ValueError("Custom `timesteps` must be a non-empty, strictly descending list.")
        if schedule[0] >= self.config.num_train_timesteps or schedule[-1] < 0:
            raise ValueError(f"Custom `timesteps` must lie in [0, {self.config.num_train_timesteps}).")
        return schedule

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Timestep spacing of Lin et al. 2023, Table 2 (steps_offset only shifts "leading")."""
        num_train = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= num_train:
            raise ValueError(
                f"`num_inference_steps` ({num_inference_steps}) must be between 1 and num_train_timesteps "
                f"({num_train}): the model was trained on {num_train} timesteps only."
            )
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            return np.linspace(0, num_train - 1, num_inference_steps).round()[::-1].astype(np.int64)
        if spacing == "leading":
            step = num_train // num_inference_steps
            return np.arange(num_inference_steps - 1, -1, -1, dtype=np.int64) * step + self.config.steps_offset
        return np.round(np.arange(num_train, 0, -num_train / num_inference_steps)).astype(np.int64) - 1

    def _timestep_pairs(self, schedule: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(t, t') pairs a step jumps between: each timestep to the next one of the schedule, the last to −1."""
        return schedule, np.append(schedule[1:], -1)

    def _set_schedule(self, schedule: np.ndarray, device) -> None:
        """Install `schedule` and build the per-timestep coefficient tables `step` gathers from."""
        num_train = self.config.num_train_timesteps
        cur, prev = (torch.from_numpy(np.ascontiguousarray(a)) for a in self._timestep_pairs(schedule))
        alpha_prod = self.alphas_cumprod[cur]
        alpha_prod_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], self.final_alpha_cumprod)
        beta, variance, coef_x0, coef_xt = posterior_coefficients(alpha_prod, alpha_prod_prev)

        def by_timestep(values: torch.Tensor, fill) -> torch.Tensor:
            table = torch.full((num_train,), fill, dtype=values.dtype)
            table[cur] = values
            return table.to(device)

        nan = float("nan")  # marks training timesteps the schedule never visits
        self._step_tables = {
            "sqrt_alpha_prod": self.sqrt_alphas_cumprod.to(device),
            "sqrt_one_minus_alpha_prod": self.sqrt_one_minus_alphas_cumprod.to(device),
            "alpha_prod_prev": by_timestep(alpha_prod_prev, nan),
            "beta": by_timestep(beta, nan),
            "variance": by_timestep(variance, nan),
            "coef_x0": by_timestep(coef_x0, nan),
            "coef_xt": by_timestep(coef_xt, nan),
        }
        self._prev_table = by_timestep(prev, -1)
        self._prev_of = dict(zip(cur.tolist(), prev.tolist()))  # host copy, for Python-int timesteps
        self._timestep_list = schedule.tolist()
        self.timesteps = torch.from_numpy(schedule.copy()).to(device)

    def _check_timestep(self, timestep):
        """Validate a host-side timestep; tensors pass through unread (reading one would sync)."""
        if isinstance(timestep, torch.Tensor):
            return timestep
        timestep = int(timestep)
        if timestep not in self._prev_of:
            raise ValueError(f"Timestep {timestep} is not part of the current schedule; see `timesteps`.")
        return timestep

    def previous_timestep(self, timestep):
        """The timestep a step from `timestep` lands on (−1 after the last step); int in, int out."""
        if isinstance(timestep, torch.Tensor):
            prev = self._prev_table.to(timestep.device)[timestep.reshape(-1)]
            return prev.reshape(timestep.shape)
        return self._prev_of[self._check_timestep(timestep)]

    # --------------------------------------------------------------------------------- step pieces

    def _coef(self, name: str, timestep, sample: torch.Tensor) -> torch.Tensor:
        return extract(self._step_tables[name], timestep, sample)

    def _predict_original_sample(self, model_output, sample, sqrt_alpha_prod, sqrt_one_minus_alpha_prod):
        """x̂_0 from the network output, per `config.prediction_type`."""
        kind = self.config.prediction_type
        if kind == "epsilon":  # Ho et al. Eq. 15 solved for x_0: x_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
            return (sample - sqrt_one_minus_alpha_prod * model_output) / sqrt_alpha_prod
        if kind == "v_prediction":  # v = √ᾱ ε − √(1−ᾱ) x_0 ⇒ x_0 = √ᾱ x_t − √(1−ᾱ) v (Salimans & Ho 2022)
            return sqrt_alpha_prod * sample - sqrt_one_minus_alpha_prod * model_output
        return model_output

    def _clip_original_sample(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        if self.config.thresholding:
            return self._dynamic_threshold(pred_original_sample)
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            return pred_original_sample.clamp(-limit, limit)
        return pred_original_sample

    def _dynamic_threshold(self, sample: torch.Tensor) -> torch.Tensor:
        """Imagen dynamic thresholding (Saharia et al. 2022): clamp to the per-sample percentile s ≥ 1, divide by s."""
        flat = sample.reshape(sample.shape[0], -1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32+
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (flat.clamp(-s, s) / s).reshape(sample.shape).to(sample.dtype)

    # ------------------------------------------------------------------------------ training side

    def _training_table(self, name: str, device: torch.device) -> torch.Tensor:
        """A copy of table `name` on `device`, made once and kept (training calls this every step).

        The tables themselves stay on the CPU, so a later `set_timesteps(device=...)` builds its
        per-step tables from them wherever training ran. A table replaced by the user is re-copied.
        """
        source = getattr(self, name)
        cached = self._device_tables.get((name, device))
        if cached is None or cached[0] is not source:
            cached = self._device_tables[(name, device)] = (source, source.to(device))
        return cached[1]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Sample q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (Ho et al. Eq. 4); `timesteps` per sample."""
        device = original_samples.device
        sqrt_alpha_prod = extract(self._training_table("sqrt_alphas_cumprod", device), timesteps, original_samples)
        sqrt_one_minus = extract(
            self._training_table("sqrt_one_minus_alphas_cumprod", device), timesteps, original_samples
        )
        return sqrt_alpha_prod * original_samples + sqrt_one_minus * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v-prediction target v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022); `sample` is x_0."""
        device = sample.device
        sqrt_alpha_prod = extract(self._training_table("sqrt_alphas_cumprod", device), timesteps, sample)
        sqrt_one_minus = extract(self._training_table("sqrt_one_minus_alphas_cumprod", device), timesteps, sample)
        return sqrt_alpha_prod * noise - sqrt_one_minus * sample

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) per timestep, shape [B] (for loss weighting)."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        alpha_prod = self._training_table("alphas_cumprod", timesteps.device)[timesteps]
        return alpha_prod / (1 - alpha_prod)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: DDPM-family models take x_t unscaled (kept for the diffusers interface)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class DDPMScheduler(DiscreteScheduler):
    """Ancestral DDPM sampling (Ho et al. 2020) with diffusers' DDPMScheduler config and numerics.

    With fewer inference than training steps each step jumps t → t' (the next scheduled timestep)
    using the posterior of the jump, exactly as diffusers does.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self._init_schedule(set_alpha_to_one=True)

    def _set_schedule(self, schedule: np.ndarray, device) -> None:
        super()._set_schedule(schedule, device)
        self._step_index, self._begin_index = None, 0

    @property
    def step_index(self) -> int | None:
        """Position in `timesteps` of the next `step` call (None before the first one of a pass)."""
        return self._step_index

    @property
    def begin_index(self) -> int:
        """Position in `timesteps` the sampling loop starts at (img2img starts part-way)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Tell the scheduler the loop starts at `timesteps[begin_index]` (called by diffusers' img2img pipelines)."""
        self._begin_index = begin_index

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """One ancestral step x_t → x_{t'} ~ p_θ(x_{t'} | x_t).

        `timestep` is a Python int, a 0-d tensor (an element of `timesteps`, as pipelines pass it)
        or a 1-d tensor with one timestep per sample. Returns `DDPMSchedulerOutput`, or
        `(prev_sample, pred_original_sample)` when `return_dict=False`.
        """
        timestep = self._check_timestep(timestep)
        model_output, predicted_variance = self._split_variance(model_output, sample)

        # 1. ᾱ_t and the jump's posterior coefficients (precomputed for the (t, t') pair).
        sqrt_alpha_prod = self._coef("sqrt_alpha_prod", timestep, sample)
        sqrt_one_minus_alpha_prod = self._coef("sqrt_one_minus_alpha_prod", timestep, sample)

        # 2. x̂_0 from the model output (Eq. 15 for ε; Salimans & Ho for v).
        pred_original_sample = self._predict_original_sample(
            model_output, sample, sqrt_alpha_prod, sqrt_one_minus_alpha_prod
        )

        # 3. Clip or dynamically threshold x̂_0.
        pred_original_sample = self._clip_original_sample(pred_original_sample)

        # 4. Posterior mean μ̃_t(x_t, x̂_0) (Eq. 7).
        prev_sample = (
            self._coef("coef_x0", timestep, sample) * pred_original_sample
            + self._coef("coef_xt", timestep, sample) * sample
        )

        # 5. Add σ_t z for t > 0 (Eq. 6 / Algorithm 2, line 4).
        if self._draws_noise(timestep):
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            scaled_noise = self._noise_std(timestep, sample, predicted_variance) * noise
            if isinstance(timestep, torch.Tensor):  # masks t = 0 entries on device
                keep = (timestep.to(sample.device) > 0).reshape(-1, *([1] * (sample.ndim - 1)))
                scaled_noise = torch.where(keep, scaled_noise, 0.0)
            prev_sample = prev_sample + scaled_noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _split_variance(self, model_output: torch.Tensor, sample: torch.Tensor):
        """Split (ε, v) for learned variances: the model then outputs twice the sample's channels."""
        if self.config.variance_type not in ("learned", "learned_range"):
            return model_output, None
        channels = sample.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"variance_type={self.config.variance_type!r} needs a model output with {2 * channels} channels "
                f"(prediction and variance), got {model_output.shape[1]}."
            )
        return torch.split(model_output, channels, dim=1)

    def _draws_noise(self, timestep) -> bool:
        """Whether this step draws z; decided on the host so the generator advances exactly as in diffusers.

        diffusers draws only when t > 0, so whether the last step consumes random numbers depends
        on a timestep value. Reading a device tensor would sync, so for a one-element tensor we
        trust a Python step counter (reset by set_timesteps, starting at `begin_index`) and look the
        timestep up in the host copy of the schedule. Python ints are checked directly; per-sample
        timesteps always draw. Step 5 also masks t = 0 on device, so values never depend on the counter.
        """
        index = self._begin_index if self._step_index is None else self._step_index
        self._step_index = index + 1 if index + 1 < len(self._timestep_list) else None  # a new pass restarts
        if not isinstance(timestep, torch.Tensor):
            return timestep > 0
        if timestep.numel() != 1:
            return True
        return self._timestep_list[index] > 0

    def _noise_std(self, timestep, sample: torch.Tensor, predicted_variance: torch.Tensor | None) -> torch.Tensor:
        """σ_t for `config.variance_type` (fixed: Ho et al. Sec. 3.2; learned_range: Nichol & Dhariwal Eq. 15)."""
        kind = self.config.variance_type
        if kind == "learned":  # as diffusers: the second half of the output is the variance itself
            return predicted_variance**0.5
        small = self._coef("variance", timestep, sample).clamp(min=1e-20)  # β̃_t
        large = self._coef("beta", timestep, sample)  # β_t
        if kind == "fixed_small":
            return small**0.5
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(small))
        if kind == "fixed_large":
            return large**0.5
        if kind == "fixed_large_log":
            return torch.exp(0.5 * torch.log(large))
        frac = (predicted_variance + 1) / 2  # learned_range: interpolate log β̃_t .. log β_t
        return torch.exp(0.5 * (frac * torch.log(large) + (1 - frac) * torch.log(small)))
