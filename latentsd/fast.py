"""Fast generation: ``LatentDiffusionPipeline.optimize()`` and ``latentsd generate --fast``.

What it applies, chosen for the device at hand (:func:`plan_for`, from measurements in ``benchmarks/RESULTS.md``)
and overridable one by one (:class:`FastPlan`):

* **the denoising step as one compiled graph**: ``torch.compile`` (inductor, static shapes) of the pipeline's
  ``denoise_step``: UNet, guidance combine and our DDIM step together; the sampling loop, callbacks and hooks stay
  as they are. Schedulers that keep Python state (diffusers' Euler, DPM++, ...: a step index; our DDPM and DDIM with
  ``eta > 0``: random draws) keep their eager step and get the UNet compiled, so no step recompiles.
* on CUDA: **CUDA graphs** for the step (inductor's ``reduce-overhead``), **channels_last**, **fused QKV**
  projections (diffusers' ``fuse_qkv_projections``) and the **compiled VAE decoder**. On CPU these, inductor's
  weight ``freezing`` and bf16 gained nothing measurable on the shapes model, so the CPU plan compiles the step only.
* **compile artefacts cached between processes**: inductor's own on-disk caches, plus this process' artefacts
  (``torch.compiler.save_cache_artifacts``) in ``$LATENTSD_COMPILE_CACHE`` (default ``~/.cache/latentsd/compile``),
  loaded by the next process' ``optimize()``. A second process still traces the Python code (dynamo).

Compiling happens at the first call of each new shape (batch, image size) or guidance scale. The compiled code reads
the modules' weights at every call (nothing is frozen unless ``freezing=True``), so LoRA, embeddings and weight
changes after ``optimize()`` take effect (a changed module structure recompiles). Images equal the default mode's
within float rounding (``tests/test_fast.py``).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import UserError
from .io import write_bytes_atomically
from .schedulers import DDIMScheduler

__all__ = ["FastPlan", "optimize", "plan_for", "cache_dir", "is_optimized"]
CACHE_ENV = "LATENTSD_COMPILE_CACHE"
PROCESS = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"  # this process' artefact file
logger = logging.getLogger(__name__)
BACKENDS = ("inductor", "aot_eager", "eager")  # the last two: structure checks without inductor's compile cost


@dataclass(frozen=True)
class FastPlan:
    """What ``optimize()`` applies. ``None`` in ``optimize()``'s arguments means ``plan_for(device)``'s choice."""

    compile: bool = True  # False: only the module changes below
    backend: str = "inductor"  # "eager" / "aot_eager": dynamo's tracing without inductor (tests, debugging)
    cuda_graphs: bool = False  # CUDA only: replay the compiled step as a CUDA graph
    channels_last: bool = False
    fuse_qkv: bool = False
    compile_vae: bool = False  # also compile the VAE decoder
    freezing: bool = False  # inductor may constant-fold the weights: later weight changes may go unseen
    fullgraph: bool = False  # a graph break is an error (tests: proves the step has no host sync)

    def compile_kwargs(self) -> dict:
        kw: dict = {"backend": self.backend, "dynamic": False, "fullgraph": self.fullgraph}
        options = {"triton.cudagraphs": self.cuda_graphs, "freezing": self.freezing}  # reduce-overhead = cudagraphs
        if self.backend == "inductor" and any(options.values()):
            kw["options"] = {k: v for k, v in options.items() if v}
        return kw


def plan_for(device: torch.device | str, **overrides) -> FastPlan:
    """The plan that pays on ``device`` (measured on the shapes model, ``benchmarks/RESULTS.md``), with
    ``overrides`` (``None`` values are ignored)."""
    cuda = torch.device(device).type == "cuda"
    plan = FastPlan(cuda_graphs=cuda, channels_last=cuda, fuse_qkv=cuda, compile_vae=cuda)
    unknown = set(overrides) - set(FastPlan.__dataclass_fields__)
    if unknown:
        raise UserError(f"optimize() got unknown option(s) {sorted(unknown)}: use some of "
                        f"{sorted(FastPlan.__dataclass_fields__)}")
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if plan.backend not in BACKENDS:
        raise UserError(f"backend {plan.backend!r} unknown: use one of {BACKENDS}")
    if plan.cuda_graphs and not cuda:
        raise UserError(f"cuda_graphs=True needs the pipeline on a CUDA device, it is on {device}: "
                        "leave cuda_graphs unset (or move the pipeline with pipe.to('cuda') first)")
    return plan


def cache_dir() -> Path:
    """Where ``optimize()`` keeps compile artefacts between processes: ``$LATENTSD_COMPILE_CACHE`` or
    ``~/.cache/latentsd/compile``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "latentsd" / "compile").expanduser()


def is_optimized(pipe) -> bool:
    return isinstance(pipe.__dict__.get("denoise_step"), CompiledStep)


# ---- cache of compile artefacts (mega-cache) ----------------------------------------------------------------
class ArtifactStore:
    """Compile artefacts of earlier processes: one file per process that compiled something.

    ``load()`` hands every file to ``torch.compiler.load_cache_artifacts`` (which fills inductor's local caches);
    ``save()`` (re)writes this process' file with everything it compiled so far (``save_cache_artifacts`` is
    cumulative), atomically: a reader never sees half a file. Delete the folder to start afresh.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder

    loaded: set[tuple[str, int]] = set()  # (file, mtime) already loaded by this process

    def load(self) -> int:
        """Load the files this process has not loaded yet; returns how many loaded."""
        if self.folder is None or not self.folder.is_dir():
            return 0
        count = 0
        for file in sorted(self.folder.glob("*.bin")):
            key = (str(file.resolve()), file.stat().st_mtime_ns)
            if key in self.loaded or file.name == f"{PROCESS}.bin":
                continue
            try:
                count += torch.compiler.load_cache_artifacts(file.read_bytes()) is not None
                self.loaded.add(key)
            except Exception as err:  # noqa: BLE001 - a stale or foreign file only costs a recompile
                logger.debug("skipped compile artefacts %s: %s", file, err)
        return count

    def save(self) -> Path | None:
        saved = None if self.folder is None else torch.compiler.save_cache_artifacts()
        if saved is None:
            return None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return write_bytes_atomically(self.folder / f"{PROCESS}.bin", saved[0])
        except OSError as err:  # a read-only or full cache folder must not stop generation
            logger.warning(f"could not save compile artefacts to {self.folder} ({err}): the next process compiles "
                           f"again; set {CACHE_ENV} to a writable folder")
            return None


def _compiles() -> int:
    """How many graphs dynamo compiled so far in this process (a cache hit counts too)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class Compiled:
    """A ``torch.compile``d callable that saves the artefact cache after a call that compiled something."""

    def __init__(self, fn, plan: FastPlan, store: ArtifactStore):
        self.fn, self.plan, self.store = fn, plan, store
        self.compiled = torch.compile(fn, **plan.compile_kwargs())

    def run(self, *args, **kwargs):
        before = _compiles()
        if self.plan.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.compiled(*args, **kwargs)
        if self.plan.cuda_graphs:  # the graph's output buffer is overwritten by its next replay: keep a copy
            out = out.clone()
        if _compiles() != before:
            self.store.save()
        return out


def fuses_step(scheduler, extra_step_kwargs: dict) -> bool:
    """Whether the scheduler step can join the compiled graph: our DDIM without noise (eta = 0) keeps no Python
    state and reads no random generator. Other schedulers (diffusers' keep a step index; DDPM draws noise) would
    recompile at every step."""
    return isinstance(scheduler, DDIMScheduler) and not extra_step_kwargs.get("eta")


class CompiledStep:
    """``pipe.denoise_step`` as one compiled graph (UNet + guidance + DDIM step) where :func:`fuses_step`; else the
    eager step with the UNet's forward compiled (what a user of diffusers does by hand). Both compile lazily."""

    def __init__(self, pipe, plan: FastPlan, store: ArtifactStore):
        self.pipe = pipe
        self.step = Compiled(type(pipe).denoise_step, plan, store)
        self.unet = Compiled(type(pipe.unet).forward, plan, store)

    def __call__(self, state, t, cond, extra_step_kwargs, model_input=None):
        pipe = self.pipe
        if fuses_step(pipe.scheduler, extra_step_kwargs):
            return self.step.run(pipe, state, t, cond, extra_step_kwargs, model_input)
        unet = pipe.unet
        unet.forward = functools.partial(self.unet.run, unet)  # for this step only: the fused graph never sees it
        try:
            return type(pipe).denoise_step(pipe, state, t, cond, extra_step_kwargs, model_input)
        finally:
            del unet.forward


class CompiledDecoder(Compiled):
    """The VAE decoder's ``forward``, compiled (the module keeps its class, parameters and state-dict keys)."""

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)


# ---- optimize ----------------------------------------------------------------------------------------------
def check_pipeline(pipe) -> None:
    hooked = [name for name in ("unet", "vae", "text_encoder")
              if getattr(getattr(pipe, name, None), "_hf_hook", None) is not None]
    if hooked:
        raise UserError(f"optimize() cannot compile a pipeline with CPU offload hooks (on {', '.join(hooked)}): "
                        "use pipe.to(device) instead of enable_*_cpu_offload(), or skip optimize()")


def optimize(pipe, *, cache: str | Path | bool | None = None, **options):
    """Switch ``pipe`` to the fast mode and return it.

    ``options``: the fields of :class:`FastPlan` (``compile``, ``backend``, ``freezing``, ``cuda_graphs``,
    ``channels_last``, ``fuse_qkv``, ``compile_vae``, ``fullgraph``); unset ones follow :func:`plan_for` for the
    pipeline's device. ``cache``: a folder for compile artefacts, ``False`` for none, default :func:`cache_dir`.
    Compiling happens at the first call of each new shape (tens of seconds on CPU, less in a later process).
    Calling ``optimize()`` again replaces the compiled parts (fused QKV and channels_last stay)."""
    check_pipeline(pipe)
    pipe.unet.eval(), pipe.vae.eval()  # inference only (what from_pretrained gives; build_components trains)
    plan = plan_for(pipe.unet.device, **options)
    if plan.fuse_qkv and getattr(pipe.unet, "original_attn_processors", None) is None:
        pipe.fuse_qkv_projections()
    if plan.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    unoptimize_compiled(pipe)
    if plan.compile:
        store = ArtifactStore(None if cache is False or plan.backend != "inductor" else
                              Path(cache).expanduser() if cache not in (None, True) else cache_dir())
        store.load()
        pipe.denoise_step = CompiledStep(pipe, plan, store)
        if plan.compile_vae:
            pipe.vae.decoder.forward = CompiledDecoder(pipe.vae.decoder.forward, plan, store)
    pipe._fast_plan = plan
    return pipe


def unoptimize_compiled(pipe) -> None:
    """Back to the eager step and decoder (fused QKV and channels_last stay: they change no result)."""
    pipe.__dict__.pop("denoise_step", None)
    pipe.vae.decoder.__dict__.pop("forward", None)
