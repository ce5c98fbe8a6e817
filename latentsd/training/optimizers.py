"""The optimizers a run can use, each from the package that maintains it, built from ``optim.*``.

``optim.optimizer`` picks one (``optim.use_8bit_adam=true`` is the older name of ``adamw8bit``):

* ``adamw``: ``torch.optim.AdamW``, fused (when every parameter is on CUDA, or on the CPU);
* ``adamw8bit``: bitsandbytes' ``AdamW8bit`` (CUDA only);
* ``prodigy``: ``prodigyopt.Prodigy``, which estimates the step size itself (keep ``learning_rate`` at 1.0);
  ``safeguard_warmup`` is on when ``lr_warmup_steps`` > 0, as its authors advise; their other advice for long
  diffusion runs, ``use_bias_correction``, slows the first hundred steps a lot (``optimizer_args`` turns it on);
* ``schedulefree_adamw``: ``schedulefree.AdamWScheduleFree`` (Defazio et al. 2024): no LR schedule (its own linear
  warm-up takes ``lr_warmup_steps``); it trains at one point ``y`` and evaluates at the average ``x``, so validation
  and export run inside :class:`EvalWeights`;
* ``adafactor``: transformers' ``Adafactor`` with an explicit learning rate (relative steps and parameter scaling
  off), factored second moments and no first moment: the least optimizer memory;
* ``lion``: ``lion_pytorch.Lion`` (Chen et al. 2023): sign updates, one state tensor; typically a 3-10x smaller
  learning rate and larger weight decay than AdamW, and ``adam_beta2=0.99``.

``adam_beta1``/``adam_beta2``/``adam_epsilon``/``adam_weight_decay`` apply wherever the optimizer has that
parameter; ``optim.optimizer_args`` adds or overrides constructor keyword arguments (checked against the
constructor's signature).
"""

from __future__ import annotations

import importlib
import inspect
from contextlib import contextmanager

import torch

from ..config import OPTIMIZERS
from ..errors import UserError

# the optimizers whose own warm-up replaces the LR schedule's
SCHEDULE_FREE = ("schedulefree_adamw",)
PACKAGES = {"adamw8bit": ("bitsandbytes", "pip install bitsandbytes (CUDA only)"),
            "prodigy": ("prodigyopt", "pip install prodigyopt (or latentsd[optimizers])"),
            "schedulefree_adamw": ("schedulefree", "pip install schedulefree (or latentsd[optimizers])"),
            "lion": ("lion_pytorch", "pip install lion-pytorch (or latentsd[optimizers])")}


def optimizer_name(optim_cfg) -> str:
    """The optimizer ``optim.*`` asks for (``use_8bit_adam=true`` means ``adamw8bit``)."""
    return "adamw8bit" if optim_cfg.use_8bit_adam else optim_cfg.optimizer


def lr_schedule_warmup(optim_cfg) -> int:
    """Warm-up steps for the LR schedule: none when the optimizer warms up itself (schedule-free)."""
    return 0 if optimizer_name(optim_cfg) in SCHEDULE_FREE else optim_cfg.lr_warmup_steps


def build_optimizer(params, optim_cfg, lr: float | None = None, fsdp: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``optim_cfg`` names over ``params``, at ``lr`` (default ``optim_cfg.learning_rate``)."""
    name = optimizer_name(optim_cfg)
    params = list(params)
    cls, kwargs = _BUILDERS[name](params, optim_cfg, optim_cfg.learning_rate if lr is None else lr, fsdp)
    kwargs.update(_checked_args(name, cls, optim_cfg.optimizer_args))
    return cls(params, **kwargs)


def _package(name: str):
    module, how = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"optim.optimizer={name} needs the {module} package: {how}, or choose another "
                        f"optim.optimizer ({', '.join(OPTIMIZERS)})") from err


def _adam_kwargs(o, lr: float) -> dict:
    return dict(lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, weight_decay=o.adam_weight_decay)


def _adamw(params, o, lr, fsdp):
    # fused: one kernel for all tensors; on CPU 4.5x faster than torch's default per-tensor loop there (measured,
    # shapes UNet). Not for FSDP on CPU ranks (sharded parameters).
    fused = all(p.is_cuda for p in params) or (not fsdp and all(p.device.type == "cpu" for p in params))
    return torch.optim.AdamW, dict(_adam_kwargs(o, lr), fused=fused or None)


def _adamw8bit(params, o, lr, fsdp):
    return _package("adamw8bit").optim.AdamW8bit, _adam_kwargs(o, lr)


def _prodigy(params, o, lr, fsdp):
    # prodigyopt's README: "to avoid issues with warm-up, use option safeguard_warmup=True"
    return _package("prodigy").Prodigy, dict(_adam_kwargs(o, lr), safeguard_warmup=o.lr_warmup_steps > 0,
                                             fsdp_in_use=fsdp)


def _schedulefree(params, o, lr, fsdp):
    return _package("schedulefree_adamw").AdamWScheduleFree, dict(_adam_kwargs(o, lr), warmup_steps=o.lr_warmup_steps)


def _adafactor(params, o, lr, fsdp):
    from transformers.optimization import Adafactor

    return Adafactor, dict(lr=lr, weight_decay=o.adam_weight_decay, relative_step=False, scale_parameter=False,
                           warmup_init=False)


def _lion(params, o, lr, fsdp):
    return _package("lion").Lion, dict(lr=lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay)


_BUILDERS = {"adamw": _adamw, "adamw8bit": _adamw8bit, "prodigy": _prodigy, "schedulefree_adamw": _schedulefree,
             "adafactor": _adafactor, "lion": _lion}


def _checked_args(name: str, cls, extra: dict) -> dict:
    """``optim.optimizer_args``, refused (with the accepted names) when the constructor takes no such argument."""
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]
    unknown = sorted(set(extra) - set(accepted))
    if unknown:
        raise UserError(f"optim.optimizer_args: {cls.__name__} ({name}) takes no {', '.join(unknown)}; "
                        f"it takes: {', '.join(accepted)}")
    return dict(extra)


def has_weight_modes(optimizer) -> bool:
    """Whether the optimizer (under accelerate's wrapper) trains at other weights than it evaluates at: it has
    ``train()`` and ``eval()`` methods, as every schedule-free optimizer does."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


class EvalWeights:
    """Switches a schedule-free optimizer between its training weights and its evaluation (averaged) weights.

    Construction puts the optimizer in train mode (schedule-free optimizers start in eval mode and refuse to step).
    ``with eval_weights():`` puts the eval-mode weights in the model for validation and export, then restores the
    train-mode weights bit for bit from a copy (not by the optimizer's own inverse interpolation, which rounds), so
    validating or exporting never changes the training trajectory. Checkpoints are written in train mode: the
    model's weights ``y`` and the optimizer's ``z`` are what the next step needs (``x`` follows from both), so a
    resumed run equals an uninterrupted one. For other optimizers it does nothing.
    """

    def __init__(self, optimizer):
        self.optimizer, self.active, self._depth = optimizer, has_weight_modes(optimizer), 0
        if self.active:
            optimizer.train()

    @contextmanager
    def __call__(self):
        if not self.active or self._depth:
            yield
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved = [p.detach().clone() for p in params]
        self._depth += 1
        self.optimizer.eval()
        try:
            yield
        finally:
            self.optimizer.train()
            with torch.no_grad():
                for p, train_value in zip(params, saved):
                    p.copy_(train_value)
            self._depth -= 1
