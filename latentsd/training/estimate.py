"""Peak GPU memory and disk use of a training run from its config alone: ``latentsd estimate`` (also logged at train
start on a GPU; the disk part is checked before every run by :mod:`latentsd.training.preflight`).

Nothing is loaded or allocated: the models are built on PyTorch's ``meta`` device (shapes only) from the model config,
or from the configs of the ``model.pretrained`` folder, and set up as the trainer sets them up (trained parts in fp32,
frozen parts in the compute dtype, LoRA adapters, gradient checkpointing). Then:

* **weights, gradients, optimizer states, EMA**: exact byte counts of those parameters. Optimizer states per fp32
  parameter (``STATE_BYTES``): AdamW two and a 4-byte step, Prodigy four, schedule-free AdamW two, Lion one, Adafactor
  a row and a column vector per matrix; 8-bit AdamW (bitsandbytes) one byte per state plus an fp32 scale per
  256-element block, tensors under 4096 elements staying fp32 (a formula: bitsandbytes needs CUDA, not checked here).
* **activations**: traced on meta at the config's batch and resolution, backward simulated
  (:mod:`latentsd.training.memory_trace`): activations, autocast weight copies, gradient checkpointing's
  recomputation and the gradients, at their highest during backward.
* **VAE encode** (frozen, no grad; none with ``cache.latents``): ``VAE_ENCODE_FACTOR`` x its largest activation.

The peak is what ``torch.cuda.max_memory_allocated`` reports: weights + optimizer + EMA + the larger of the VAE encode
and the backward peak (the VAE encodes before the forward). The CUDA context and the caching allocator's reserve
(~0.5-1 GiB) come on top in ``nvidia-smi``. tests/test_estimate.py checks the byte counts exactly against real modules
and optimizer states, and the activation part against the CPU allocator's peak (``torch.profiler``) for the tiny and
shapes models; GPU peaks were not measured yet (no GPU so far).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig, load_config
from ..errors import UserError
from .memory_trace import Trace, _cast, trace_step

GIB = 2**30
BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
VAE_ENCODE_FACTOR = 5  # live bytes of a no-grad VAE encode / its largest activation (CPU allocator: see the tests)
FITS = 0.9  # a setting fits a GPU when its estimated peak is at most this fraction of the memory
EXTRA_FILES = 2**20  # file headers, configs, tokenizer, RNG and LR-schedule states: under a MiB per checkpoint/export
VAE_ENCODE = "VAE encode, no grad (before the forward)"


@dataclass
class Estimate:
    """Bytes by what holds them: ``gpu`` rows, ``cpu`` rows, the disk sizes; ``peak`` combines the GPU rows."""

    what: str
    gpu: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)
    peak: int | None = None  # None: activations not traced
    backward: int = 0  # activations + gradients at their highest during backward (part of the peak)
    checkpoint_bytes: int = 0
    export_bytes: int = 0

    @property
    def disk_bytes(self) -> int:
        """What output_dir needs free for the first checkpoint and the export."""
        return self.checkpoint_bytes + self.export_bytes


# ---- the model, on the meta device, set up like the trainer's -------------------------------------------
def meta_components(cfg: TrainConfig) -> dict[str, torch.nn.Module]:
    """``{"unet", "text_encoder", "vae"}`` built on the meta device from the configs only (no weights read)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models import check_model_folder, check_vae_folder

    m = cfg.model
    # a missing local path is an error here, never a hub lookup
    src = check_model_folder(m.pretrained, allow_pickle=True) if m.pretrained else ""
    vae_src, vae_sub = check_vae_folder(m.vae, allow_pickle=True) if m.vae else ("", None)
    try:
        if m.pretrained:
            kw = {"revision": m.revision}
            unet_cfg = UNet2DConditionModel.load_config(src, subfolder="unet", **kw)
            vae_cfg = AutoencoderKL.load_config(src, subfolder="vae", **kw)
            te_cfg = CLIPTextConfig.from_pretrained(src, subfolder="text_encoder", **kw)
        else:
            unet_cfg, vae_cfg, te_cfg = _built_configs(m.config)
        if m.vae:
            vae_cfg = AutoencoderKL.load_config(vae_src, subfolder=vae_sub)
    except OSError as err:
        raise UserError(f"cannot read the model configs of {m.pretrained or m.vae!r} ({err}); for a hub id run online "
                        "once (or download it), or estimate the architecture: model.pretrained='' model.config=sd15")
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(unet_cfg), "vae": AutoencoderKL.from_config(vae_cfg),
                "text_encoder": CLIPTextModel(te_cfg)}


def _built_configs(name: str):
    from transformers import CLIPTextConfig

    from ..models import load_model_config
    from ..tokenizer import load_tokenizer

    sections = load_model_config(name)
    te = dict(sections["text_encoder"])
    if "vocab_size" not in te:  # as build_components: the tokenizer's size and special tokens
        tokenizer = load_tokenizer(sections.get("tokenizer", "builtin"))
        te = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, **te}
    return sections["unet"], sections["vae"], CLIPTextConfig(**te)


def optimizer_of(cfg: TrainConfig) -> str:
    """``optim.optimizer`` (``optim.use_8bit_adam=true`` is the older name of ``adamw8bit``)."""
    return "adamw8bit" if cfg.optim.use_8bit_adam else getattr(cfg.optim, "optimizer", "adamw")


def _adafactor(shape) -> int:  # factored second moment (rows, columns) for matrices, none first; an RMS scalar
    n = math.prod(shape)
    return 4 * (n // shape[-1] + n // shape[-2] if len(shape) >= 2 else n) + 4


# bytes of an optimizer's states for one fp32 parameter of ``shape``, as each package keeps them
STATE_BYTES = {
    "adamw": lambda shape: 8 * math.prod(shape) + 4,  # exp_avg, exp_avg_sq, a 4-byte step tensor
    "adamw8bit": lambda shape: (2 * math.prod(shape) + 8 * math.ceil(math.prod(shape) / 256) + 2 * 256 * 4
                                if math.prod(shape) >= 4096 else 8 * math.prod(shape)),  # formula: needs CUDA
    "prodigy": lambda shape: 16 * math.prod(shape),  # exp_avg, exp_avg_sq, s, p0 (a scalar for an all-zero tensor)
    "schedulefree_adamw": lambda shape: 8 * math.prod(shape),  # z, exp_avg_sq
    "lion": lambda shape: 4 * math.prod(shape),  # exp_avg
    "adafactor": _adafactor,
}


@dataclass
class MetaRun:
    """The parts as the trainer sets them up, on the meta device."""

    cfg: TrainConfig
    parts: dict[str, torch.nn.Module]
    base_counts: dict[str, int]  # parameters per component before LoRA
    trained: list[torch.nn.Parameter]
    prepared: list[torch.nn.Module]  # what accelerate checkpoints whole
    compute: torch.dtype

    @classmethod
    def build(cls, cfg: TrainConfig) -> MetaRun:
        from .setup import TORCH_DTYPES

        parts = meta_components(cfg)
        counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
        compute = TORCH_DTYPES[cfg.mixed_precision]
        te_trained = cfg.model.train_text_encoder or (cfg.lora.enabled and cfg.lora.text_encoder)
        prepared = [parts["unet"]] + ([parts["text_encoder"]] if te_trained else [])
        full = [] if cfg.lora.enabled else prepared
        for module in parts.values():
            module.requires_grad_(any(module is f for f in full)).train(any(module is p for p in prepared))
            _cast(module, torch.float32 if any(module is f for f in full) else compute)
        if cfg.lora.enabled:
            from .lora import add_lora, without_dropout_draws

            trained = add_lora(parts["unet"], parts["text_encoder"] if cfg.lora.text_encoder else None, cfg.lora)
            for module in parts.values():
                without_dropout_draws(module)  # LoHa/LoKr: no torch.rand(1) on the meta device
        else:
            trained = [p for module in prepared for p in module.parameters()]
        if cfg.model.gradient_checkpointing:
            for module in prepared:
                module.gradient_checkpointing_enable() if hasattr(module, "gradient_checkpointing_enable") \
                    else module.enable_gradient_checkpointing()
        return cls(cfg, parts, counts, trained, prepared, compute)

    # ---- exact byte counts ---------------------------------------------------------------------------
    def weights_by_dtype(self) -> dict[torch.dtype, int]:
        out = defaultdict(int)
        for module in self.parts.values():
            for p in module.parameters():
                out[p.dtype] += p.numel() * p.element_size()
        return dict(out)

    def gradient_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.trained)

    def optimizer_bytes(self) -> int:
        return sum(STATE_BYTES[optimizer_of(self.cfg)](p.shape) for p in self.trained)

    def ema_bytes(self) -> int:
        return 4 * sum(p.numel() for p in self.trained) if self.cfg.ema.enabled else 0

    def checkpoint_bytes(self) -> int:
        """accelerate's state (each prepared module whole, the optimizer) + EMA, + the export when every_checkpoint."""
        from ..adapter_formats import is_adapter_key  # a LoRA run's checkpoints hold the adapters only

        modules = sum(t.numel() * t.element_size() for m in self.prepared for k, t in m.state_dict().items()
                      if not self.cfg.lora.enabled or is_adapter_key(k))
        per_export = self.export_bytes() if self.cfg.export.every_checkpoint else 0
        return modules + self.optimizer_bytes() + self.ema_bytes() + EXTRA_FILES + per_export

    def export_bytes(self) -> int:
        """``model/`` in export.dtype (LoRA merged), plus both LoRA files and the single file when configured."""
        from .setup import TORCH_DTYPES

        size = BYTES[TORCH_DTYPES[self.cfg.export.dtype]]
        weights = size * (sum(self.base_counts.values()) + _extra_components(self.cfg))
        lora = 2 * size * sum(p.numel() for p in self.trained) if self.cfg.lora.enabled else 0
        single = weights if self.cfg.export.single_file else 0
        return weights + lora + single + EXTRA_FILES

    # ---- activations, traced ---------------------------------------------------------------------------
    def trace(self) -> Trace:
        """Activations of one micro-batch at ``data.resolution`` (:mod:`latentsd.training.memory_trace`)."""
        c = self.cfg
        side = c.data.resolution // 2 ** (len(self.parts["vae"].config.block_out_channels) - 1)
        autocast = self.compute if self.compute != torch.float32 and not c.lora.enabled else None
        return trace_step(self.parts["unet"], self.parts["text_encoder"], len(self.prepared) > 1,
                          c.optim.train_batch_size, side, autocast, c.model.gradient_checkpointing,
                          accumulate=c.optim.gradient_accumulation_steps > 1)

    def vae_encode_bytes(self) -> int:
        """The frozen VAE's encode of a batch (no grad; none when the latents are cached)."""
        from ..data.cache import cache_plan

        if cache_plan(self.cfg)["latents"][0]:  # cache.latents=auto resolves to false for e.g. random crops
            return 0
        vae, res = self.parts["vae"], self.cfg.data.resolution
        return (VAE_ENCODE_FACTOR * self.cfg.optim.train_batch_size * vae.config.block_out_channels[0] * res * res
                * BYTES[self.compute])


def _extra_components(cfg: TrainConfig) -> int:
    """Parameters of what a source folder ships beyond the five parts (SD-1.5's safety checker), from its safetensors
    headers: the export keeps them."""
    from safetensors import safe_open

    root = Path(cfg.model.pretrained) if cfg.model.pretrained else None
    if root is None or not root.is_dir():
        return 0
    total = 0
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in
                      ("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
        for file in sub.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (not a dict)
    return total


# ---- the estimate --------------------------------------------------------------------------------------
def estimate(cfg: TrainConfig, trace: bool = True, processes: int = 1) -> Estimate:
    """Bytes of a run of ``cfg`` (see the module doc); ``trace=False`` skips the activations (disk sizes only);
    ``processes`` > 1 adds DDP's gradient buckets."""
    run = MetaRun.build(cfg)
    est = Estimate(what=_describe(cfg, run), checkpoint_bytes=run.checkpoint_bytes(), export_bytes=run.export_bytes())
    for dtype, n in sorted(run.weights_by_dtype().items(), key=lambda kv: -kv[1]):
        est.gpu[f"weights {_name(dtype)}"] = n
    est.gpu[f"optimizer states ({optimizer_of(cfg)})"] = run.optimizer_bytes()
    (est.cpu if cfg.ema.offload_to_cpu else est.gpu)["EMA (fp32)"] = run.ema_bytes()
    if processes > 1:
        est.gpu["DDP gradient buckets"] = run.gradient_bytes()
    static = sum(est.gpu.values())
    if not trace:
        return est
    t = run.trace()
    est.gpu.update({"activations kept for backward": t.kept - t.autocast, "autocast weight copies": t.autocast,
                    "recomputed unit (gradient checkpointing)": t.recompute, "gradients (fp32)": run.gradient_bytes(),
                    VAE_ENCODE: run.vae_encode_bytes()})
    est.backward = t.backward_peak
    est.peak = static + max(est.gpu[VAE_ENCODE], t.backward_peak)
    return est


def _describe(cfg: TrainConfig, run: MetaRun) -> str:
    counts = ", ".join(f"{name} {n / 1e6:.1f} M" for name, n in run.base_counts.items())
    ema = ("on CPU" if cfg.ema.offload_to_cpu else "on GPU") if cfg.ema.enabled else "off"
    return (f"{counts} parameters; batch {cfg.optim.train_batch_size} x {cfg.data.resolution}² px"
            f" (accumulation {cfg.optim.gradient_accumulation_steps}), mixed_precision {cfg.mixed_precision}, "
            f"gradient checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}, "
            f"optimizer {optimizer_of(cfg)}, "
            f"{'LoRA rank ' + str(cfg.lora.rank) if cfg.lora.enabled else 'full fine-tune'}, EMA {ema}")


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


# ---- what would fit ---------------------------------------------------------------------------------------
def candidate_changes(cfg: TrainConfig) -> list[list[str]]:
    """Single changes that lower the peak, cheapest first (each a list of overrides)."""
    out = []
    if not cfg.model.gradient_checkpointing:
        out.append(["model.gradient_checkpointing=true"])
    if optimizer_of(cfg) == "adamw":
        out.append(["optim.use_8bit_adam=true"])
    if cfg.ema.enabled and not cfg.ema.offload_to_cpu:
        out.append(["ema.offload_to_cpu=true"])
    if cfg.mixed_precision == "no":
        out.append(["mixed_precision=bf16"])
    batch, accum = cfg.optim.train_batch_size, cfg.optim.gradient_accumulation_steps
    while batch > 1:  # the same global batch in more, smaller micro-batches (halved, or 1 from an odd batch)
        smaller = batch // 2 if batch % 2 == 0 else 1
        batch, accum = smaller, accum * (batch // smaller)
        out.append([f"optim.train_batch_size={batch}", f"optim.gradient_accumulation_steps={accum}"])
    if not cfg.lora.enabled:
        out.append(["lora.enabled=true"])
    return out


def suggest(cfg: TrainConfig, memory: int, processes: int = 1) -> list[tuple[list[str], int]]:
    """Settings that fit ``memory`` bytes (peak ≤ FITS x memory), as (overrides, peak): each single change that fits
    alone; else the first cumulative combination (in :func:`candidate_changes` order, batch halvings replacing each
    other) that fits. Empty when nothing does."""
    singles = [(ch, estimate(load_config(cfg, ch), processes=processes).peak) for ch in candidate_changes(cfg)]
    fitting = [(ch, peak) for ch, peak in singles if peak <= FITS * memory]
    if fitting:
        return fitting[:4]
    combined = []
    for change in candidate_changes(cfg):
        keys = {o.split("=")[0] for o in change}
        combined = [o for o in combined if o.split("=")[0] not in keys] + change
        peak = estimate(load_config(cfg, combined), processes=processes).peak
        if peak <= FITS * memory:
            return [(combined, peak)]
    return []


# ---- reading and printing -----------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``24GiB``, ``80GB``, ``16g``, ``1.5TiB`` or a byte count → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(f"cannot read the memory size {text!r}: write a positive number with a unit, e.g. 24GiB, "
                        "80GB or 16G (GiB = 2^30 bytes, GB = 10^9)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def human(n: int) -> str:
    """Bytes as MiB below a GiB, else GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def format_estimate(est: Estimate, memory: int | None = None, suggestions=None) -> str:
    """The table ``latentsd estimate`` prints (rows of 0 bytes left out), then the verdict for ``memory``."""
    lines = [est.what, "", "| GPU memory | size |", "| --- | ---: |"]
    lines += [f"| {k} | {human(v)} |" for k, v in est.gpu.items() if v]
    if est.peak is not None:
        lines.append(f"| backward at its highest: activations freed as gradients fill (simulated) | "
                     f"{human(est.backward)} |")
        lines.append(f"| **peak** = weights + optimizer + EMA + max(VAE encode, backward); torch.cuda."
                     f"max_memory_allocated (nvidia-smi shows ~0.5-1 GiB more) | **{human(est.peak)}** |")
    lines += [""] + [f"CPU memory: {k} {human(v)}" for k, v in est.cpu.items() if v]
    lines.append(f"Disk: one checkpoint ~{human(est.checkpoint_bytes)}, the export ~{human(est.export_bytes)} "
                 f"(output_dir needs {human(est.disk_bytes)} free; checkpoints_total_limit + 1 checkpoints at once)")
    if memory is not None and est.peak is not None:
        lines.append("")
        if est.peak <= FITS * memory:
            lines.append(f"Fits in {human(memory)} (peak at most {FITS:.0%} of it).")
        elif suggestions:
            lines.append(f"Does not fit in {human(memory)}. Settings that fit (estimated peak):")
            lines += [f"  {' '.join(ch)}  ({human(peak)})" for ch, peak in suggestions]
        else:
            lines.append(f"Does not fit in {human(memory)}, even with gradient checkpointing, 8-bit AdamW, bf16, "
                         "batch 1 with accumulation and LoRA: use a larger GPU, shard across GPUs (FSDP, DeepSpeed) "
                         "or lower data.resolution.")
    return "\n".join(lines)


def run_estimate(cfg: TrainConfig, memory: str | None = None, processes: int = 1) -> str:
    """What ``latentsd estimate`` prints."""
    limit = parse_size(memory) if memory is not None else None
    est = estimate(cfg, processes=processes)
    tips = suggest(cfg, limit, processes) if limit is not None and est.peak > FITS * limit else None
    return format_estimate(est, limit, tips)


