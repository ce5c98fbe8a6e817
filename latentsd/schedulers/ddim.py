"""DDIM sampler (Song et al. 2021), matching diffusers' DDIMScheduler; shares DDPM's tables."""

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from .ddpm import DDPMSchedulerOutput, DiscreteScheduler


class DDIMScheduler(DiscreteScheduler):
    """Denoising diffusion implicit models: η = 0 is deterministic, η = 1 is DDPM-like ancestral sampling."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_schedule(set_alpha_to_one=set_alpha_to_one)

    def _timestep_pairs(self, schedule: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' DDIM always steps back by T // n (even where the spacing is uneven), from any t."""
        if self.custom_timesteps or self.num_inference_steps is None:
            return super()._timestep_pairs(schedule)
        cur = np.arange(self.config.num_train_timesteps, dtype=np.int64)
        return cur, cur - self.config.num_train_timesteps // self.num_inference_steps

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """One DDIM step x_t → x_{t'} (Song et al. Eq. 12), with σ_t = η·σ_DDPM (Eq. 16).

        `eta` is a Python float. `use_clipped_model_output` re-derives ε from the clipped x̂_0.
        `variance_noise` replaces the drawn z (e.g. CycleDiffusion); don't pass it with `generator`.
        `timestep`: Python int or 0-d/1-d tensor. Returns `DDPMSchedulerOutput` or a tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`: DDIM needs the number of inference steps.")
        if eta > 0 and generator is not None and variance_noise is not None:
            raise ValueError("Pass either `generator` or `variance_noise`, not both.")
        timestep = self._check_timestep(timestep)

        # 1. ᾱ_t and ᾱ_{t'} (ᾱ_{t'} = final_alpha_cumprod past the end).
        sqrt_alpha_prod = self._coef("sqrt_alpha_prod", timestep, sample)
        sqrt_one_minus_alpha_prod = self._coef("sqrt_one_minus_alpha_prod", timestep, sample)
        alpha_prod_prev = self._coef("alpha_prod_prev", timestep, sample)

        # 2. "Predicted x_0" and ε (Eq. 12, first term; Eq. 9 relates them).
        pred_original_sample = self._predict_original_sample(
            model_output, sample, sqrt_alpha_prod, sqrt_one_minus_alpha_prod
        )
        pred_epsilon = self._predict_epsilon(model_output, sample, pred_original_sample, sqrt_alpha_prod,
                                             sqrt_one_minus_alpha_prod)

        # 3. Clip or threshold x̂_0, optionally re-deriving ε from it.
        pred_original_sample = self._clip_original_sample(pred_original_sample)
        if use_clipped_model_output:
            pred_epsilon = (sample - sqrt_alpha_prod * pred_original_sample) / sqrt_one_minus_alpha_prod

        # 4. σ_t(η) = η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_{t'}) (Eq. 16).
        std_dev = eta * self._coef("variance", timestep, sample) ** 0.5

        # 5. x_{t'} = √ᾱ_{t'} x̂_0 + √(1−ᾱ_{t'}−σ_t²) ε + σ_t z (Eq. 12).
        direction = (1 - alpha_prod_prev - std_dev**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_prev**0.5 * pred_original_sample + direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + std_dev * variance_noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _predict_epsilon(self, model_output, sample, pred_original_sample, sqrt_alpha_prod, sqrt_one_minus_alpha_prod):
        """ε̂ from the network output, per `config.prediction_type` (inverse of the x̂_0 relations)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return sqrt_alpha_prod * model_output + sqrt_one_minus_alpha_prod * sample
        return (sample - sqrt_alpha_prod * pred_original_sample) / sqrt_one_minus_alpha_prod
