"""Workarounds for torch.compile bugs that make a compiled training step wrong, applied by ``optim.compile``.

**Nearest upsampling's gradient (torch 2.13, inductor, CPU).** Traced for compilation, ``F.interpolate(mode="nearest")``
becomes an indexed gather whose gradient is a scatter-add (``index_put_(zeros, ..., accumulate=True)``). In the full
UNet graph inductor fuses the zero fill with the scatter's consumer and schedules that consumer before the scatter: the
gradient reaching every layer below an upsampler is zero. Measured: with the shapes model compiled, 84 of 326 UNet
weights got a zero gradient and 166 a wrong one; each block compiled alone, or the same graph without fusion, is right
(the same family as pytorch/pytorch#198270, index_put_ mutations fused with reads). Compiled training still "ran", and
faster, because part of the backward was missing.

The fix: while the graph is traced, nearest upsampling by a whole factor is expressed as a broadcast and a reshape,
the same function (out[i, j] = in[i // k, j // l], bit for bit) whose gradient is a sum over each k×l block: no
scatter. Other sizes keep torch's decomposition. Eager code is untouched: the Python kernels replaced here serve
only the tracer. Graphs compiled before the fix would still be read from inductor's caches, so inductor compiles get
:func:`compile_options`: a no-op graph pass keyed by this file's hash, which is part of every cache key.
"""

from __future__ import annotations

import torch
from torch._C import DispatchKey
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

_KEYS = (DispatchKey.Autograd, DispatchKey.CompositeImplicitAutograd)
_applied = False


def exact_nearest_upsampling() -> None:
    """Install the broadcast form of 2-D nearest upsampling for tracing (idempotent)."""
    global _applied
    if _applied:
        return
    aten = torch.ops.aten
    _replace(aten.upsample_nearest2d.default, lambda x, size, scale_h=None, scale_w=None: (size, (scale_h, scale_w)))
    _replace(aten.upsample_nearest2d.vec, lambda x, size, scales: (size, (None, None)) if size is not None else
             ([int(d * s) for d, s in zip(x.shape[-2:], scales)], tuple(scales)))
    _applied = True


def compile_options() -> dict:
    """inductor options for a compile that must not reuse graphs cached without this file's fixes."""
    return {"joint_custom_pre_pass": _CacheKey()}


class _CacheKey(CustomGraphPass):
    """Changes nothing in the graph; its uuid, this file's hash, keys the compiled graphs."""

    def __call__(self, graph) -> None:
        pass

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


def _replace(op, size_and_scales) -> None:
    for key in _KEYS:
        original = op.py_kernels.get(key)
        if original is None:  # another torch: its tracer does not decompose here (the gradient test checks it)
            continue

        def upsample(x, *args, _original=original):
            factors = _whole_factors(x, *size_and_scales(x, *args))
            if factors is None:
                return _original(x, *args)
            (b, c, h, w), (k, l) = x.shape, factors
            return x[:, :, :, None, :, None].expand(b, c, h, k, w, l).reshape(b, c, h * k, w * l)

        op.py_kernels[key] = upsample


def _whole_factors(x: torch.Tensor, size, scales) -> tuple[int, int] | None:
    """(k, l) when the output is exactly k×l times the input (and any given scale says the same), else None."""
    if x.dim() != 4 or size is None:
        return None
    factors = []
    for n, out, scale in zip(x.shape[-2:], size, scales):
        if n == 0 or out % n or scale is not None and scale != out // n:
            return None
        factors.append(out // n)
    return tuple(factors)
