"""Numerical guards of the training loop: a non-finite number never reaches the weights or a file.

* :class:`StepGuard` decides, once per optimizer step and identically on every rank, whether the update is
  applied. Its input is one gathered tensor, the loss of this step's micro-batches and the clipped gradient norm of
  every rank: the step's one host sync, which the logged loss needed anyway. A NaN/inf in either skips the update
  on every rank (no optimizer step, no LR-schedule step, no EMA update: what a GradScaler does with an fp16
  overflow), warns with the step and the batch's captions, and is counted (``skipped_steps``). The step counter
  still advances, so the data, noise and timesteps of every later step stay what they would have been, and a
  resume stays exact. ``optim.max_nonfinite_steps`` such steps in a row stop the run with :class:`NonFiniteError`
  naming the last good checkpoint.
* :meth:`StepGuard.check_weights` runs before every checkpoint and export: non-finite trained or EMA weights are
  never written (the update itself can overflow with finite losses and gradients).

Under fp16 a GradScaler sees every overflow first: a finite loss with a non-finite gradient norm is its loss-scale
calibration (the scale is lowered, the step skipped, as before). Such steps are counted as skipped but do not count
towards ``optim.max_nonfinite_steps``. Under DeepSpeed the engine steps inside ``backward``: the guard counts and
stops, DeepSpeed's own loss scaler is what skips.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .checkpoint import last_good_checkpoint

logger = logging.getLogger(__name__)


class NonFiniteError(ValueError):
    """Training produced NaN/inf it cannot go on from; the message names the last good checkpoint."""


@dataclass
class Verdict:
    """One optimizer step as every rank sees it."""

    loss: float  # mean over micro-batches and ranks (NaN when any is)
    grad_norm: float
    apply: bool  # False: the update is skipped
    reason: str = ""


class StepGuard:
    """Apply or skip each optimizer step (see the module docstring); counts live in the trainer's ``TrainState``."""

    def __init__(self, acc, cfg, state):
        self.acc, self.cfg, self.state = acc, cfg, state
        self.limit = cfg.optim.max_nonfinite_steps

    def check(self, losses: list[torch.Tensor], grad_norm, captions: list[str]) -> Verdict:
        """The step's one host sync: every rank's mean loss and the gradient norm, gathered and copied to the host."""
        acc, state = self.acc, self.state
        local = torch.stack([torch.stack(losses).mean().float(), _plain(grad_norm, acc.device).float()])
        rank_losses, norms = zip(*acc.gather(local[None]).tolist())  # the sync; plain Python from here on
        loss_ok, norm_ok = all(map(math.isfinite, rank_losses)), all(map(math.isfinite, norms))
        norm = next((n for n in norms if not math.isfinite(n)), norms[0])  # one value: DDP ranks share the norm
        verdict = Verdict(sum(rank_losses) / len(rank_losses), norm, loss_ok and norm_ok)
        if verdict.apply:
            state.nonfinite_in_a_row = 0
            return verdict
        overflow = loss_ok and acc.scaler is not None  # the GradScaler's calibration, not a divergence
        verdict.reason = ("fp16 gradient overflow (the GradScaler lowers its loss scale)" if overflow else
                          f"non-finite {'loss' if not loss_ok else 'gradient norm'} "
                          f"(loss {verdict.loss}, gradient norm {verdict.grad_norm})")
        state.skipped_steps += 1
        state.nonfinite_in_a_row += 0 if overflow else 1
        self._warn(verdict, math.isfinite(rank_losses[acc.process_index]), captions)
        return verdict

    def _warn(self, verdict: Verdict, own_loss_ok: bool, captions: list[str]) -> None:
        """The main process says what happened; every rank names its batch's captions (no extra sync)."""
        acc, s = self.acc, self.state
        where = f" on rank {acc.process_index}" if acc.num_processes > 1 else ""
        batch = f"the batch{where} ({'finite' if own_loss_ok else 'non-finite'} loss) had captions {captions!r}"
        if acc.is_main_process:
            limit = f" of optim.max_nonfinite_steps={self.limit}" if self.limit else ""
            logger.warning(f"step {s.step}: {verdict.reason}: update skipped on every rank (weights, optimizer "
                           f"state, LR schedule and EMA unchanged); {s.skipped_steps} skipped in all, "
                           f"{s.nonfinite_in_a_row} non-finite in a row{limit}; {batch}")
        else:
            logger.warning(f"step {s.step}: update skipped; {batch}")

    def skip_update(self) -> None:
        """A skipped step under a GradScaler: ``clip_grad_norm_`` unscaled the gradients, so the scaler must close
        the step (it lowers the scale when it found an inf, as its own skip does)."""
        if self.acc.scaler is not None:
            self.acc.scaler.update()

    def may_checkpoint(self) -> bool:
        """No checkpoint amid non-finite steps: it would hold the weights from before them under a later step and
        push older checkpoints out of ``checkpoints_total_limit``."""
        s = self.state
        if s.nonfinite_in_a_row and self.acc.is_main_process:
            logger.warning(f"step {s.step}: no checkpoint after {s.nonfinite_in_a_row} non-finite steps in a row; "
                           f"the newest stays {last_good_checkpoint(self.cfg.output_dir) or 'none'}")
        return not s.nonfinite_in_a_row

    def stop_if_diverging(self) -> None:
        """:class:`NonFiniteError` on every rank alike after ``optim.max_nonfinite_steps`` non-finite steps in a row."""
        s, o = self.state, self.cfg.optim
        if not self.limit or s.nonfinite_in_a_row < self.limit:
            return
        raise NonFiniteError(
            f"training stopped at step {s.step}: {s.nonfinite_in_a_row} optimizer steps in a row had a non-finite "
            f"loss or gradient norm (optim.max_nonfinite_steps={self.limit}), the run diverged. Their updates were "
            f"skipped, so no weight is NaN/inf. {self._last_good()}: resume from it with a lower "
            f"optim.learning_rate (now {o.learning_rate:g}) or optim.max_grad_norm (now {o.max_grad_norm:g})"
            + (", or mixed_precision=bf16 (fp16 overflows more easily)" if self.cfg.mixed_precision == "fp16" else ""))

    def check_weights(self, params, ema, what: str) -> None:
        """Refuse to write ``what`` (a checkpoint, an export) when a trained or EMA weight is NaN/inf on any rank."""
        counts = torch.stack([_count_nonfinite(params, self.acc.device),
                              _count_nonfinite(getattr(ema, "shadow", []), self.acc.device)])
        bad = self.acc.gather(counts[None]).max(0).values.tolist()  # any rank's (FSDP shards differ; DDP replicas not)
        if not any(bad):
            return
        parts = [f"{n} in the {name}" for n, name in zip(bad, ("trained weights", "EMA weights")) if n]
        raise NonFiniteError(
            f"step {self.state.step}: NaN/inf values ({', '.join(parts)}) although every applied step had a finite "
            f"loss and gradient norm: the update itself overflowed (optim.learning_rate="
            f"{self.cfg.optim.learning_rate:g} far too high?). Not writing {what}: non-finite weights are never "
            f"saved. {self._last_good()}")

    def _last_good(self) -> str:
        path = last_good_checkpoint(self.cfg.output_dir)
        return f"The last good checkpoint is {path}" if path else \
            f"No checkpoint was written yet (checkpoint_every={self.cfg.checkpoint_every}), none to resume from"


def _plain(grad_norm, device) -> torch.Tensor:
    """The norm ``clip_grad_norm_`` returned as a plain tensor (FSDP2: a DTensor; DeepSpeed without it: None)."""
    from torch.distributed.tensor import DTensor

    if grad_norm is None:
        return torch.zeros((), device=device)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    return torch.as_tensor(grad_norm, device=device).reshape(())


def _count_nonfinite(tensors, device) -> torch.Tensor:
    """Non-finite elements of this rank's part of ``tensors`` (parameters may be FSDP shards, EMA may be on CPU)."""
    from .ema import _local

    total = torch.zeros((), dtype=torch.long, device=device)
    for t in tensors:
        t = _local(t).detach()
        total += torch.count_nonzero(~torch.isfinite(t)).to(device)
    return total
