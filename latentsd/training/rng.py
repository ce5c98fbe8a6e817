"""Randomness that depends only on (seed, step, sample index): exact resume, split-invariant batches."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """A permutation of ``indices`` per epoch drawn from (seed, epoch): independent of any RNG state."""

    def __init__(self, indices, seed: int, shuffle: bool = True):
        self.indices, self.seed, self.shuffle, self.epoch = list(indices), seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(self.indices)
        order = torch.randperm(len(self.indices), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        return iter([self.indices[i] for i in order.tolist()])

    def __len__(self) -> int:
        return len(self.indices)


class GlobalDraw:
    """Random numbers for the *global* batch of one micro-step, of which this rank keeps its slice.

    Drawing for all ranks and slicing makes the numbers independent of how the batch is split.
    """

    def __init__(self, seed: int, micro_step: int, rank: int, world: int, device):
        self.gen = torch.Generator(device).manual_seed(seed * 1_000_003 + micro_step + 1)
        self.rank, self.world, self.device = rank, world, device

    def _local(self, full: torch.Tensor) -> torch.Tensor:
        local = full.shape[0] // self.world
        return full[self.rank * local:(self.rank + 1) * local]

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self._local(torch.randn((shape[0] * self.world, *shape[1:]), generator=self.gen, device=self.device))

    def rand(self, n: int) -> torch.Tensor:
        return self._local(torch.rand(n * self.world, generator=self.gen, device=self.device))

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return self._local(torch.randint(low, high, (n * self.world,), generator=self.gen, device=self.device))
