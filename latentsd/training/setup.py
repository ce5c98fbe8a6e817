"""What a run is built from: the model to train, the accelerator, the optimizer and its LR schedule."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

from ..config import TrainConfig
from ..models import Components, build_components, load_components


# mixed_precision and export.dtype names → torch dtypes ("no" mixed precision computes in fp32)
TORCH_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(cfg: TrainConfig) -> Components:
    """Components to train, with our DDPM scheduler configured for training (prediction type, zero SNR)."""
    from ..models import load_vae
    from ..schedulers import DDPMScheduler

    m = cfg.model
    parts = load_components(m.pretrained, revision=m.revision, variant=m.variant) if m.pretrained \
        else build_components(m.config, seed=cfg.seed)
    if m.vae:
        parts.vae = load_vae(m.vae)
    # whatever sampler a folder ships (SD-1.5: PNDM), training noises with DDPM on the same betas
    parts.scheduler = DDPMScheduler.from_config(parts.scheduler.config, **scheduler_changes(cfg))
    return parts


def scheduler_changes(cfg: TrainConfig) -> dict:
    """What the config changes in the folder's noise schedule: the prediction type, zero terminal SNR."""
    changes = {"prediction_type": cfg.model.prediction_type} if cfg.model.prediction_type else {}
    if cfg.loss.zero_terminal_snr:  # sampling must then start at t = T: trailing spacing
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return changes


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    from accelerate.state import AcceleratorState

    # A second run in the same process (the demo, tests) may ask for another precision; keep the
    # process group (PartialState), forget the previous run's settings.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Several processes but no GPU (`accelerate launch --multi_gpu` on a CPU box): gloo CPU ranks.
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu_ranks,
        mixed_precision=cfg.mixed_precision,
        # sync_with_dataloader=False: accumulation runs across epoch ends, so step k is always
        # micro-batches [k·accum, (k+1)·accum) and a resume knows exactly where it is.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.optim.gradient_accumulation_steps, sync_with_dataloader=False),
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
        # each rank reads its own batches (also for streams: batches hold caption strings)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False, dispatch_batches=False),
    )


def make_optimizer(params, cfg: TrainConfig, num_processes: int):
    """AdamW (fused when on CUDA; 8-bit with bitsandbytes when asked) and a diffusers LR schedule."""
    from diffusers.optimization import get_scheduler

    o = cfg.optim
    lr = o.learning_rate * (o.train_batch_size * o.gradient_accumulation_steps * num_processes if o.scale_lr else 1)
    kwargs = dict(lr=lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay, eps=o.adam_epsilon)
    params = list(params)
    if o.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ValueError("optim.use_8bit_adam=true needs bitsandbytes: pip install bitsandbytes "
                             "(CUDA only), or set optim.use_8bit_adam=false") from err
        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        fused = all(p.is_cuda for p in params)
        optimizer = torch.optim.AdamW(params, fused=fused or None, **kwargs)
    # accelerate steps the schedule once per process per optimizer step (like diffusers' scripts)
    schedule = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps * num_processes,
                             num_training_steps=cfg.max_steps * num_processes)
    return optimizer, schedule
