"""Start-up checks and helpers for many processes: shared output_dir, DeepSpeed settings, FSDP.

The trainer calls :func:`check_start` right after creating its ``Accelerator`` (before any model is
loaded), so a setup that cannot work fails on every rank, at once, with the reason and the fix:

* **shared output_dir** (several processes): checkpoints are written by the main process and read by all on
  resume, so every node must see the same folder (and the same ``cache.dir``, whose shards every rank reads). Rank 0 writes ``output_dir/.latentsd-shared-<nonce>``
  (the nonce broadcast to all ranks), everyone waits, every rank looks for it; if any rank does not see
  it, every rank raises :class:`SharedDirError`.
* **DeepSpeed**: clipping and accumulation follow the training config (``optim.max_grad_norm``,
  ``optim.gradient_accumulation_steps``), written into accelerate's DeepSpeed config before ``prepare``
  (accelerate would otherwise clip at 1.0 whatever the config says); a trained text encoder (two models)
  is refused: accelerate wraps exactly one model per DeepSpeed engine.
* **FSDP**: accelerate 1.15 turns FSDP on only for GPU-type process groups; on CPU ranks it silently trains
  plain DDP, so asking for FSDP there is an error, as are FSDP1, LoRA and a trained text encoder (accelerate's
  FSDP2 prepares one model only) under FSDP.

Under FSDP2 ``prepare`` replaces the parameters by sharded ``DTensor`` s: :func:`trained_parameters` gives
the prepared ones (for clipping and EMA), :func:`full_weight_module` a plain full-weight copy (for
sampling and export), and :func:`even_shares` splits held-out samples so every rank runs the same number
of forward passes (FSDP gathers parameters on each forward, DDP may sync buffers).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import torch

MARKER_PREFIX = ".latentsd-shared-"


class SharedDirError(ValueError):
    """Some rank does not see what rank 0 wrote in output_dir: the nodes do not share a filesystem."""


def check_start(acc, cfg) -> None:
    """Everything that must hold before training starts on several processes (see the module docstring)."""
    from accelerate.utils import DistributedType

    text_encoder_trained = cfg.text_encoder_trained()  # fully, LoRA or textual-inversion vectors
    check_fsdp(acc, cfg, text_encoder_trained)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(acc.state.deepspeed_plugin, cfg, text_encoder_trained)
    require_shared_dir(acc, Path(cfg.output_dir), "output_dir")
    if (cfg.cache.latents or cfg.cache.text) and cfg.cache.dir.strip():  # every rank reads the others' shards
        require_shared_dir(acc, Path(cfg.cache.dir).expanduser(), "cache.dir")


# ---- shared output_dir ---------------------------------------------------------------------------------
def require_shared_dir(acc, path: Path, what: str = "output_dir", wait_s: float = 5.0) -> None:
    """Raise :class:`SharedDirError` on every rank unless every rank sees the marker file rank 0 wrote in ``path``."""
    from accelerate.utils import broadcast_object_list, gather_object

    if acc.num_processes == 1:
        return
    nonce = broadcast_object_list([secrets.token_hex(8) if acc.is_main_process else None])[0]
    marker = Path(path) / f"{MARKER_PREFIX}{nonce}"
    if acc.is_main_process:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(nonce)
    acc.wait_for_everyone()
    seen = _wait_for_marker(marker, nonce, wait_s)
    views = gather_object([(acc.process_index, socket.gethostname(), str(Path(path).absolute()), seen)])
    if acc.is_main_process:  # gather_object synchronised everyone: all ranks have looked
        marker.unlink(missing_ok=True)
    blind = [v for v in views if not v[3]]
    if blind:
        where = "; ".join(f"rank {r} on {host} looked in {p}" for r, host, p, _ in blind)
        raise SharedDirError(
            f"{what} {path} is not shared by all processes: the marker file rank 0 wrote there is missing on "
            f"{len(blind)} of {len(views)} ranks ({where}). Checkpoints are written by the main process and read by "
            f"every process on resume, so all nodes need {what} on a shared filesystem (NFS, Lustre, ...) mounted "
            "at the same path: use an absolute path on such a filesystem")


def _wait_for_marker(marker: Path, nonce: str, wait_s: float) -> bool:
    """A network filesystem may show a new file a moment late: look again for up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if marker.read_text() == nonce:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


# ---- DeepSpeed -----------------------------------------------------------------------------------------
def configure_deepspeed(plugin, cfg, text_encoder_trained: bool) -> dict:
    """Write the training config's clipping, accumulation and micro-batch into accelerate's DeepSpeed config.

    Values left ``auto`` (or missing) are set; an explicit value that differs from the training config is an
    error naming both (accelerate would silently keep DeepSpeed's). Returns the updated config dict.
    """
    if text_encoder_trained:
        raise ValueError("DeepSpeed cannot train the text encoder together with the UNet: accelerate wraps "
                         "exactly one model per DeepSpeed engine (it refuses two in prepare). Set "
                         "model.train_text_encoder=false (and lora.text_encoder=false), or train both with DDP "
                         "(configs/accelerate/multi_gpu.yaml)")
    o = cfg.optim
    wanted = {"gradient_clipping": float(o.max_grad_norm),
              "gradient_accumulation_steps": int(o.gradient_accumulation_steps),
              "train_micro_batch_size_per_gpu": int(o.train_batch_size)}
    config = plugin.deepspeed_config
    names = {"gradient_clipping": "optim.max_grad_norm",
             "gradient_accumulation_steps": "optim.gradient_accumulation_steps",
             "train_micro_batch_size_per_gpu": "optim.train_batch_size"}
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current != "auto" and float(current) != float(value):
            raise ValueError(f"the DeepSpeed config sets {key}={current} but the training config has "
                             f"{names[key]}={value}: set {key} to 'auto' in the DeepSpeed config (latentsd fills "
                             f"it in) or make the two agree")
        config[key] = value  # prepare() fills only what is still "auto" (gradient_clipping: 1.0)
    return config


# ---- FSDP ----------------------------------------------------------------------------------------------
def fsdp_requested() -> bool:
    """``accelerate launch`` with an FSDP config (distributed_type: FSDP) sets ACCELERATE_USE_FSDP."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_fsdp(acc, cfg, text_encoder_trained: bool) -> None:
    from accelerate.utils import DistributedType

    if not fsdp_requested():
        return
    if acc.distributed_type != DistributedType.FSDP:
        raise ValueError(
            f"the accelerate config asks for FSDP, but accelerate set up {acc.distributed_type.value} on "
            f"{acc.device.type}: accelerate turns FSDP on only for GPU (CUDA/XPU/NPU...) process groups, and on "
            "CPU ranks it would silently train unsharded DDP. Run FSDP on GPUs, or use "
            "configs/accelerate/2cpu.yaml on CPUs")
    if acc.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError("latentsd supports FSDP2 only: set fsdp_version: 2 in the accelerate config "
                         "(see configs/accelerate/fsdp.yaml)")
    if text_encoder_trained:
        raise ValueError("FSDP cannot train the text encoder together with the UNet: accelerate's FSDP2 prepares "
                         "exactly one model. Set model.train_text_encoder=false, or train both with DDP "
                         "(configs/accelerate/multi_gpu.yaml)")
    if cfg.lora.enabled:
        raise ValueError("LoRA under FSDP is not supported: LoRA trains a few million parameters, whose optimizer "
                         "state fits every GPU; use DDP (configs/accelerate/multi_gpu.yaml) with lora.enabled=true")


def is_sharded(module: torch.nn.Module) -> bool:
    """Prepared by FSDP2 (its parameters are DTensor shards, except while a forward left them gathered)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(module: torch.nn.Module) -> None:
    """Free the gathered full parameters FSDP2 keeps after a forward of its root module (it expects a backward).

    After a no-grad forward (validation) they would stay registered: writes to the shards (EMA swap, restore)
    would not reach the next forward, which would skip the all-gather and compute with stale weights.
    """
    if is_sharded(module):
        module.reshard()


def trained_parameters(prepared_modules) -> list[torch.nn.Parameter]:
    """The trainable parameters of the modules *after* ``accelerator.prepare`` (FSDP2 swaps in sharded
    DTensors), in module order: what clipping, the optimizer and the EMA must see."""
    return [p for m in prepared_modules for p in m.parameters() if p.requires_grad]


def full_weight_module(acc, module: torch.nn.Module) -> torch.nn.Module:
    """A module with full weights for sampling and export: the unwrapped module itself, or under FSDP2 a
    plain copy (same class and config) holding the gathered full weights, on every rank.

    Under FSDP every rank must call this together (the weights are all-gathered).
    """
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    module = acc.unwrap_model(module)
    if not is_sharded(module):
        return module
    reshard(module)  # state_dict of the current shards (an EMA swap may have just written them)
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))  # all ranks, no offload
    cls = next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule))  # FSDP2's subclass → original
    with init_empty_weights():  # parameters on meta: no init compute, no RNG draws; the gathered ones are assigned
        copy = cls.from_config(module.config)  # a diffusers model (the UNet: FSDP trains nothing else)
    copy.load_state_dict(full, assign=True)
    return copy.to(acc.device).eval().requires_grad_(False)


# ---- equal work on every rank ----------------------------------------------------------------------------
def even_shares(n: int, rank: int, world: int, batch_size: int) -> list[tuple[list[int], list[bool]]]:
    """This rank's batches of sample indices ``0..n-1``, the same number and sizes on every rank.

    Round k covers global positions [k·B·world, (k+1)·B·world); a short last round gets ceil(left / world)
    per rank. Positions past ``n`` repeat sample ``n - 1`` with ``real=False`` (to be masked out of sums).
    Returns ``[(indices, real), ...]``.
    """
    out = []
    for start in range(0, n, batch_size * world):
        width = min(batch_size, -(-(n - start) // world))
        positions = [start + rank * width + j for j in range(width)]
        out.append(([min(p, n - 1) for p in positions], [p < n for p in positions]))
    return out
