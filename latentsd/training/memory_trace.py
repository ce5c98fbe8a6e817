"""The activation memory of one training step, traced on the ``meta`` device (no storage, no compute).

One forward of the text encoder and the UNet runs on meta tensors while ``torch.autograd.graph.saved_tensors_hooks``
records, in order, every tensor autograd keeps for backward (parameters excluded) and, after each module, the bytes of
its parameters' gradients. Backward is then simulated on that timeline in reverse: each module's gradients appear and
its saved tensors are freed, which gives the peak of activations + gradients during backward. With gradient
checkpointing the trace holds only the checkpoints' inputs, and each checkpointed unit (a ResNet block, a transformer
block, a CLIP layer) is recomputed, whole, when backward reaches it: its bytes from a trace without checkpointing (plus
its largest tensor once more, for the gradient flowing through it) are added there. Under gradient accumulation every gradient is already allocated (from the second micro-batch on).

Two stand-ins, since meta tensors have neither: attention keeps what flash / memory-efficient attention keeps (q, k,
v, the output and an fp32 log-sum-exp per query; meta's math fallback would keep the L x L weights), and under
fp16/bf16 autocast the trace runs in that dtype, with autocast's half-precision copy of each trained weight kept for
backward as a saved tensor of its module.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

CHECKPOINTED_UNITS = {"ResnetBlock2D", "BasicTransformerBlock", "CLIPEncoderLayer"}
_SDPA = torch.nn.functional.scaled_dot_product_attention


@dataclass
class Trace:
    kept: int  # bytes autograd holds for backward when the forward ends (autocast copies included)
    autocast: int  # of which autocast's weight copies
    recompute: int  # the largest checkpointed unit's bytes (0 without gradient checkpointing)
    backward_peak: int  # activations + gradients (+ a recomputed unit) at their highest during backward


class _FlashAttentionMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - a trace runs forward only
        raise NotImplementedError("a memory trace only")


def _flash_like_attention(query, key, value, *args, **kwargs):
    return _FlashAttentionMemory.apply(query, key, value)


def trace_step(unet, text_encoder, text_encoder_trained: bool, batch: int, latent_side: int,
               autocast_dtype: torch.dtype | None, checkpointing: bool, accumulate: bool) -> Trace:
    """Trace one training forward of meta-device ``unet`` (and ``text_encoder``) set up for training, and simulate
    its backward (see the module doc). ``autocast_dtype``: the half dtype of mixed precision over fp32 trained
    weights, else None. The modules are left as they were."""
    run = lambda: _record(unet, text_encoder, text_encoder_trained, batch, latent_side, autocast_dtype)  # noqa: E731
    events = run()
    units = {}
    if checkpointing:
        switched = [m for module in (unet, text_encoder) for m in module.modules()
                    if getattr(m, "gradient_checkpointing", False) is True]
        for m in switched:
            m.gradient_checkpointing = False
        try:
            units = _unit_bytes(run())
        finally:
            for m in switched:
                m.gradient_checkpointing = True
    saved = sum(e[1] for e in events if e[0] == "saved")
    autocast = sum(e[1] for e in events if e[0] == "saved" and e[2] == "autocast")
    return Trace(saved, autocast, max(units.values(), default=0), _backward_peak(events, units, accumulate))


def _record(unet, text_encoder, te_trained, batch, side, autocast_dtype) -> list[tuple]:
    """Events in forward order: ("saved", bytes, unit-or-"autocast"), ("grad", bytes), ("enter"/"leave", unit id)."""
    events, seen, current, params = [], set(), [None], set()

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen.add(key)
            events.append(("saved", t.untyped_storage().nbytes(), current[-1]))
        return t

    hooks = []
    for module in (unet, text_encoder):
        for sub in module.modules():
            own = [p for p in sub.parameters(recurse=False) if p.requires_grad]
            if own:  # its gradients (fp32, like the trained weights) appear when backward reaches it
                grad = sum(p.numel() * 4 for p in own)
                copies = sum(p.numel() * autocast_dtype.itemsize for p in own) if autocast_dtype else 0
                hooks.append(sub.register_forward_hook(lambda *_, g=grad, c=copies: _leaf_done(events, g, c)))
            if type(sub).__name__ in CHECKPOINTED_UNITS:
                hooks.append(sub.register_forward_pre_hook(lambda m, _: _enter(events, current, id(m))))
                hooks.append(sub.register_forward_hook(lambda m, *_: _leave(events, current, id(m))))
    # autocast stand-in (full fine-tune only: each module then has one dtype, restored after)
    dtypes = {m: next(m.parameters()).dtype for m in (unet, text_encoder)} if autocast_dtype else {}
    try:
        torch.nn.functional.scaled_dot_product_attention = _flash_like_attention
        for m in dtypes:
            _cast(m, autocast_dtype)
        params.update(p.untyped_storage()._cdata for m in (unet, text_encoder) for p in m.parameters())
        with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ids = torch.zeros(batch, min(77, text_encoder.config.max_position_embeddings), dtype=torch.long)
            with torch.set_grad_enabled(te_trained):
                embeds = text_encoder(ids)[0]
            dtype = next(unet.parameters()).dtype
            latents = torch.zeros(batch, unet.config.in_channels, side, side, dtype=dtype)
            unet(latents, torch.zeros(batch, dtype=torch.long), encoder_hidden_states=embeds.to(dtype))
    finally:
        torch.nn.functional.scaled_dot_product_attention = _SDPA
        for h in hooks:
            h.remove()
        for m, dtype in dtypes.items():
            _cast(m, dtype)
    return events


def _leaf_done(events, grad: int, copies: int) -> None:
    if copies:
        events.append(("saved", copies, "autocast"))
    events.append(("grad", grad))


def _enter(events, current, unit: int) -> None:
    current.append(unit)
    events.append(("enter", unit))


def _leave(events, current, unit: int) -> None:
    current.pop()
    events.append(("leave", unit))


def _unit_bytes(events) -> dict[int, int]:
    """What recomputing each checkpointed unit in backward holds: the bytes saved inside it (autocast copies included;
    from a trace without checkpointing) plus its largest one again (the gradient flowing through it)."""
    total, largest, stack = defaultdict(int), defaultdict(int), []
    for e in events:
        if e[0] == "enter":
            stack.append(e[1])
        elif e[0] == "leave":
            stack.pop()
        elif e[0] == "saved" and stack:
            total[stack[-1]] += e[1]
            largest[stack[-1]] = max(largest[stack[-1]], e[1])
    return {unit: total[unit] + largest[unit] for unit in total}


def _backward_peak(events, units: dict[int, int], accumulate: bool) -> int:
    """Walk the forward timeline backwards: gradients appear, saved tensors go; a checkpointed unit is recomputed
    whole (``units[id]`` bytes) while its own gradients are computed."""
    unit_grads, stack = defaultdict(int), []
    for e in events:
        if e[0] == "enter":
            stack.append(e[1])
        elif e[0] == "leave":
            stack.pop()
        elif e[0] == "grad":
            for unit in stack:
                unit_grads[unit] += e[1]
    grads = sum(e[1] for e in events if e[0] == "grad")
    live = sum(e[1] for e in events if e[0] == "saved") + (grads if accumulate else 0)
    peak = live
    for e in reversed(events):
        if e[0] == "grad" and not accumulate:
            live += e[1]
        elif e[0] == "saved":
            live -= e[1]
        elif e[0] == "leave" and e[1] in units:
            peak = max(peak, live + units[e[1]] + (0 if accumulate else unit_grads[e[1]]))
        peak = max(peak, live)
    return peak


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` without diffusers' warning about modules to keep in fp32 (the trainer casts the same way)."""
    import logging

    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        module.to(dtype)
    finally:
        log.setLevel(level)
