"""Exponential moving average of trained weights: one small object the loop updates and checkpoints."""

from __future__ import annotations

from contextlib import contextmanager

import torch


class EMA:
    """EMA of ``params`` (fp32 copies, optionally in CPU memory), with Karras-style warmup of the decay.

    Checkpoints hold it as a flat dict of tensors (``state_dict``), written as safetensors.
    """

    def __init__(self, params, decay: float = 0.9999, warmup: bool = True, offload_to_cpu: bool = False,
                 update_every: int = 1):
        self.params = [p for p in params]
        device = "cpu" if offload_to_cpu else None
        # FSDP-sharded parameters (DTensors): average this rank's shard; checkpoints hold full tensors
        self.shadow = [_local(p).detach().to(device=device or _local(p).device, dtype=torch.float32, copy=True)
                       for p in self.params]
        self.decay, self.warmup, self.update_every, self.updates = decay, warmup, update_every, 0

    def current_decay(self) -> float:
        """Early on, average over the few updates there are: (1 + n) / (10 + n) caps the decay."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        decay = self.current_decay()
        sources = [_local(p).detach() for p in self.params]
        if sources and _same_place(self.shadow, sources):  # one multi-tensor kernel on CUDA, not one per tensor
            torch._foreach_lerp_(self.shadow, sources, 1.0 - decay)
        else:  # offloaded to the CPU, or parameters not in fp32: copy each one over first
            for ema, p in zip(self.shadow, sources):
                ema.lerp_(p.to(ema.device, torch.float32), 1.0 - decay)
        self.updates += 1

    def maybe_update(self, step: int) -> None:
        if step % self.update_every == 0:
            self.update()

    @contextmanager
    def swapped_in(self):
        """Temporarily load the EMA weights into the model (validation, export), then restore."""
        backup = [_local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for p, ema in zip(self.params, self.shadow):
                _local(p).copy_(ema)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in zip(self.params, backup):
                    _local(p).copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors (under FSDP gathered from the shards: every rank must call it)."""
        state = {f"shadow.{i}": _full(t, p).contiguous() for i, (t, p) in enumerate(zip(self.shadow, self.params))}
        return {**state, "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) - 1 != len(self.shadow):
            raise ValueError(f"EMA state has {len(state) - 1} tensors, the model {len(self.shadow)}: "
                             "the checkpoint belongs to a different model or LoRA setting")
        for i, (ema, p) in enumerate(zip(self.shadow, self.params)):
            ema.copy_(_shard(state[f"shadow.{i}"], p))
        self.updates = int(state["updates"])

    def load(self, path) -> None:
        """Restore from a checkpoint's ``ema.safetensors``."""
        from safetensors.torch import load_file

        self.load_state_dict(load_file(str(path)))


def _same_place(shadow: list[torch.Tensor], sources: list[torch.Tensor]) -> bool:
    """Whether every EMA tensor has its parameter's device and dtype (fp32), as ``torch._foreach_lerp_`` needs."""
    return all(e.device == p.device and e.dtype == p.dtype for e, p in zip(shadow, sources))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly FSDP-sharded) tensor; in-place writes reach the parameter."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _full(shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor of which ``shard`` is this rank's part, sharded as ``like`` (a collective under FSDP)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        return shard
    local = shard.to(_local(like).device)
    return DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor().to(shard.device)


def _shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full``, sharded as ``like`` (no communication: every rank holds ``full``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(_local(like).device), like.device_mesh, like.placements,
                             src_data_rank=None).to_local()


class NoEMA:
    """Stands in when EMA is off, so the loop calls the same methods either way."""

    def maybe_update(self, step: int) -> None:
        pass

    @contextmanager
    def swapped_in(self):
        yield

    def state_dict(self) -> dict:
        return {}

    def load(self, path) -> None:
        pass


def make_ema(params, ema_cfg) -> EMA | NoEMA:
    """An :class:`EMA` of ``params`` configured by the ``ema`` config section, or :class:`NoEMA`."""
    if not ema_cfg.enabled:
        return NoEMA()
    return EMA(params, ema_cfg.decay, ema_cfg.warmup, ema_cfg.offload_to_cpu, ema_cfg.update_every)
