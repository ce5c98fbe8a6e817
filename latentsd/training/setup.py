"""What a run is built from: the model to train, the accelerator, the optimizer and its LR schedule."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration

from ..config import TrainConfig
from ..errors import UserError
from ..models import Components, build_components, load_components


# mixed_precision and export.dtype names → torch dtypes ("no" mixed precision computes in fp32)
TORCH_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(cfg: TrainConfig) -> Components:
    """Components to train, with our DDPM scheduler configured for training (prediction type, zero SNR)."""
    from ..models import load_vae
    from ..schedulers import DDPMScheduler

    m = cfg.model
    parts = load_components(m.pretrained, revision=m.revision, variant=m.variant, allow_pickle=m.allow_pickle) \
        if m.pretrained else build_components(m.config, seed=cfg.seed)
    if m.vae:
        parts.vae = load_vae(m.vae, allow_pickle=m.allow_pickle)
    # whatever sampler a folder ships (SD-1.5: PNDM), training noises with DDPM on the same betas
    parts.scheduler = DDPMScheduler.from_config(parts.scheduler.config, **scheduler_changes(cfg))
    return parts


def scheduler_changes(cfg: TrainConfig) -> dict:
    """What the config changes in the folder's noise schedule: the prediction type, zero terminal SNR."""
    changes = {"prediction_type": cfg.model.prediction_type} if cfg.model.prediction_type else {}
    if cfg.loss.zero_terminal_snr:  # sampling must then start at t = T: trailing spacing
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return changes


def set_attention(unet: torch.nn.Module, attention: str) -> None:
    """``model.attention``: torch's SDPA (diffusers' default), xformers, or ``math`` (diffusers' ``AttnProcessor``:
    scores by ``baddbmm``, a softmax, ``bmm``). On a CPU under bf16 autocast SDPA's flash kernel is slow for small
    heads (shapes model, 4-8 channels per head: the bf16 step 1.5x slower than with ``math``), and
    ``optim.compile`` fuses the math softmax into its neighbours."""
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "math":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())


def speed_up(unet: torch.nn.Module, optim_cfg) -> None:
    """``optim.channels_last`` and ``optim.compile``, applied to the UNet in place: its class, weights and state-dict
    keys stay the same, so checkpoints, resumes and exports do not depend on either setting."""
    if optim_cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    if optim_cfg.compile:
        from torch._dynamo.exc import InvalidBackend

        from .compile_fixes import compile_options, exact_nearest_upsampling

        exact_nearest_upsampling()  # inductor on the CPU: without it, no gradient below the UNet's upsamplers

        try:
            options = compile_options() if optim_cfg.compile_backend == "inductor" else None
            unet.compile(backend=optim_cfg.compile_backend, options=options)
        except InvalidBackend as err:
            from torch._dynamo import list_backends

            raise UserError(f"optim.compile_backend={optim_cfg.compile_backend!r} is not a torch.compile backend: use "
                            f"one of {', '.join(list_backends())} (or aot_eager, eager for debugging)") from err


def align_optimizer_state(optimizer) -> None:
    """Optimizer state in the memory layout of its parameter, after a resume. torch's fused AdamW reads the state
    and the parameter as flat buffers: a channels-last state for a contiguous parameter (a checkpoint of an
    ``optim.channels_last`` run resumed without it, or the reverse) would silently mix up their elements."""
    from torch.distributed.tensor import DTensor

    optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    for p, state in optimizer.state.items():
        if isinstance(p, DTensor):  # FSDP shards: laid out by FSDP, never channels-last
            continue
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


@contextmanager
def uncompiled():
    """Compiled modules run eagerly inside (validation, its sampling and the held-out loss: other shapes and no
    gradients would otherwise compile new graphs, minutes each on a CPU)."""
    with torch.compiler.set_stance("force_eager"):
        yield


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
    """The optimizer ``optim.optimizer`` names (:mod:`.optimizers`) and a diffusers LR schedule."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    from diffusers.optimization import get_scheduler

    from .optimizers import build_optimizer, lr_schedule_warmup

    o = cfg.optim
    lr = o.learning_rate * (o.train_batch_size * o.gradient_accumulation_steps * num_processes if o.scale_lr else 1)
    fsdp = AcceleratorState().distributed_type == DistributedType.FSDP  # Prodigy then sums its statistics over ranks
    optimizer = build_optimizer(params, o, lr, fsdp=fsdp)
    # accelerate steps the schedule once per process per optimizer step (like diffusers' scripts)
    schedule = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=lr_schedule_warmup(o) * num_processes,
                             num_training_steps=cfg.max_steps * num_processes)
    return optimizer, schedule
