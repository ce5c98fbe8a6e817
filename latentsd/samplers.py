"""Samplers by their A1111 names: ``make_scheduler("DPM++ 2M Karras", pipe.scheduler.config)``.

Each name maps to a scheduler class and a few config flags, following diffusers' table (docs, "Schedulers"
overview: A1111/k-diffusion → diffusers); DDPM and DDIM are ours. A scheduler is built with
``cls.from_config(model_config, **flags)``, so it keeps the model's betas, prediction_type, timestep_spacing,
steps_offset... and changes only what the name says. Names are matched ignoring case, spaces, ``_`` and ``-``
(``"dpm++ 2m karras"``, ``"DPM++_2M_Karras"``, ``"euler_a"`` and ``"euler-a"`` all work).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import diffusers

from .schedulers import DDIMScheduler, DDPMScheduler

KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}


@dataclass(frozen=True)
class Sampler:
    """A scheduler class, the config flags the name adds, and the packages it needs beyond ours."""

    cls: type
    flags: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()


SAMPLERS: dict[str, Sampler] = {
    "Euler": Sampler(diffusers.EulerDiscreteScheduler),
    "Euler a": Sampler(diffusers.EulerAncestralDiscreteScheduler),
    "Heun": Sampler(diffusers.HeunDiscreteScheduler),
    "LMS": Sampler(diffusers.LMSDiscreteScheduler, requires=("scipy",)),
    "LMS Karras": Sampler(diffusers.LMSDiscreteScheduler, KARRAS, requires=("scipy",)),
    "DPM2": Sampler(diffusers.KDPM2DiscreteScheduler),
    "DPM2 Karras": Sampler(diffusers.KDPM2DiscreteScheduler, KARRAS),
    "DPM2 a": Sampler(diffusers.KDPM2AncestralDiscreteScheduler),
    "DPM2 a Karras": Sampler(diffusers.KDPM2AncestralDiscreteScheduler, KARRAS),
    "DPM++ 2M": Sampler(diffusers.DPMSolverMultistepScheduler),
    "DPM++ 2M Karras": Sampler(diffusers.DPMSolverMultistepScheduler, KARRAS),
    "DPM++ 2M SDE": Sampler(diffusers.DPMSolverMultistepScheduler, SDE),
    "DPM++ 2M SDE Karras": Sampler(diffusers.DPMSolverMultistepScheduler, {**SDE, **KARRAS}),
    # A1111's DPM++ SDE is stochastic: diffusers' singlestep solver in its SDE variant (no torchsde needed)
    "DPM++ SDE": Sampler(diffusers.DPMSolverSinglestepScheduler, SDE),
    "DPM++ SDE Karras": Sampler(diffusers.DPMSolverSinglestepScheduler, {**SDE, **KARRAS}),
    "UniPC": Sampler(diffusers.UniPCMultistepScheduler),
    "DEIS": Sampler(diffusers.DEISMultistepScheduler),
    "DDIM": Sampler(DDIMScheduler),
    "DDPM": Sampler(DDPMScheduler),
    "PNDM": Sampler(diffusers.PNDMScheduler),
    "PLMS": Sampler(diffusers.PNDMScheduler, {"skip_prk_steps": True}),
}


def normalize(name: str) -> str:
    """The lookup key of a name: lower case, with runs of spaces, ``_`` and ``-`` read as one space."""
    return re.sub(r"[\s_-]+", " ", name).strip().lower()


_BY_KEY = {normalize(name): name for name in SAMPLERS}


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def canonical_name(name: str) -> str:
    """The table's spelling of ``name`` (``"euler_a"`` → ``"Euler a"``); ValueError listing the known names."""
    if not isinstance(name, str) or normalize(name) not in _BY_KEY:
        raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(repr(n) for n in SAMPLERS)} "
                         "(case, spaces, '_' and '-' do not matter)")
    return _BY_KEY[normalize(name)]


def check_requirements(name: str) -> None:
    """ImportError naming the missing package (and the pip command) when sampler ``name`` needs one."""
    missing = [pkg for pkg in SAMPLERS[canonical_name(name)].requires if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ImportError(f"sampler {canonical_name(name)!r} needs {', '.join(missing)}: "
                          f"pip install {' '.join(missing)}")


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A new scheduler for sampler ``name`` built from a model's scheduler ``config`` plus the name's flags."""
    sampler = SAMPLERS[canonical_name(name)]
    check_requirements(name)
    return sampler.cls.from_config(dict(config), **sampler.flags)


def check_steps(scheduler, steps: int) -> None:
    """ValueError for a step count the scheduler cannot run: PNDM's Runge-Kutta warm-up needs at least 4."""
    config = scheduler.config
    if isinstance(scheduler, diffusers.PNDMScheduler) and not config.get("skip_prk_steps", False) and steps < 4:
        raise ValueError(f"PNDM with Runge-Kutta warm-up steps (skip_prk_steps=False) needs at least 4 steps, "
                         f"got {steps}: use 4 or more, or the PLMS sampler")
