"""Fast generation: ``LatentDiffusionPipeline.optimize()`` and ``latentsd generate --fast``.

What it applies, chosen for the device at hand (:func:`plan_for`, from measurements in ``benchmarks/RESULTS.md``)
and overridable one by one (:class:`FastPlan`):

* **the denoising step as one compiled graph**: ``torch.compile`` (inductor, static shapes) of the pipeline's
  ``denoise_step``: UNet, guidance combine and our DDIM step together; the sampling loop, callbacks and hooks stay
  as they are. Schedulers that keep Python state (diffusers' Euler, DPM++, ...: a step index; our DDPM and DDIM with
  ``eta > 0``: random draws) keep their eager step and get the UNet compiled, so no step recompiles.
* on CPU: inductor's weight **freezing** (the weights become constants: oneDNN convolutions and MKL linears with
  prepacked weights and fused bias/activation) and its **C++ wrapper** (the graph's kernels called from generated
  C++, not Python): 1.14× and 1.08× on the shapes model. channels_last, fused QKV, a compiled VAE decoder and bf16
  gained nothing measurable there.
* on CUDA: **CUDA graphs** for the step (inductor's ``reduce-overhead``), **channels_last**, **fused QKV**
  projections (diffusers' ``fuse_qkv_projections``) and the **compiled VAE decoder**.
* **compile artefacts cached between processes**: inductor's on-disk caches go to ``$LATENTSD_COMPILE_CACHE``
  (default ``~/.cache/latentsd/compile``) unless the user set ``TORCHINDUCTOR_CACHE_DIR``. Without freezing a later
  process loads the compiled graphs (FX graph and AOT autograd caches); with freezing inductor cannot store the graph
  (prepacked weights do not pickle), so a later process lowers it again but reuses every built kernel and, since
  frozen constants are named by content (:func:`content_keyed_constants`), the C++ wrapper: the shapes model's
  warm-up goes from ≈ 39 s to ≈ 21 s.

Compiling happens at the first call of each new shape (batch, image size) or guidance scale. Frozen weights are
checked once per call (a checksum of every tensor): LoRA, embeddings, ``load_state_dict`` or in-place edits after
``optimize()`` make the next call compile again (tens of seconds on CPU). Without freezing the compiled code reads
the weights at every call. Images equal the default mode's within float rounding (``tests/test_fast.py``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import os
import types
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import UserError
from .schedulers import DDIMScheduler

__all__ = ["FastPlan", "cache_dir", "cache_location", "is_optimized", "optimize", "plan_for"]
CACHE_ENV = "LATENTSD_COMPILE_CACHE"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
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
    freezing: bool = False  # inductor keeps the weights as constants (prepacked for oneDNN); changes recompile
    cpp_wrapper: bool = False  # inductor calls its kernels from generated C++, not Python
    fullgraph: bool = False  # a graph break is an error (tests: proves the step has no host sync)

    def compile_kwargs(self) -> dict:
        kw: dict = {"backend": self.backend, "dynamic": False, "fullgraph": self.fullgraph}
        if self.backend == "inductor" and self.cuda_graphs:  # reduce-overhead = cudagraphs
            kw["options"] = {"triton.cudagraphs": True}
        return kw  # freezing: see Compiled.__call__


def plan_for(device: torch.device | str, **overrides) -> FastPlan:
    """The plan that pays on ``device`` (measured on the shapes model, ``benchmarks/RESULTS.md``), with
    ``overrides`` (``None`` values are ignored)."""
    cuda = torch.device(device).type == "cuda"
    plan = FastPlan(cuda_graphs=cuda, channels_last=cuda, fuse_qkv=cuda, compile_vae=cuda, freezing=not cuda,
                    cpp_wrapper=not cuda)
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


def user_inductor_cache() -> str | None:
    """``TORCHINDUCTOR_CACHE_DIR`` as the user set it; ``None`` when it holds inductor's default (inductor writes
    that into the environment itself, e.g. when diffusers is imported)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    value = os.environ.get(INDUCTOR_CACHE_ENV)
    return None if value is None or os.path.abspath(value) == os.path.abspath(default_cache_dir()) else value


def cache_location() -> Path:
    """The folder the next default ``optimize()`` compiles into: ``TORCHINDUCTOR_CACHE_DIR`` when the user set it,
    else :func:`cache_dir`."""
    return Path(user_inductor_cache() or cache_dir())


def use_cache(cache: str | Path | bool | None) -> Path | None:
    """Point inductor's on-disk caches at ``cache`` (a folder), or at :func:`cache_location` when ``None``;
    ``False`` leaves inductor's setting alone. The setting is process-wide: later compiles share the folder."""
    if cache is False:
        return None
    folder = cache_location() if cache in (None, True) else Path(cache).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the compile cache folder {folder} ({err}): set {CACHE_ENV} to a writable "
                        "folder, or pass optimize(cache=False)") from None
    os.environ[INDUCTOR_CACHE_ENV] = str(folder)
    return folder


def is_optimized(pipe) -> bool:
    """Whether ``pipe`` runs the compiled step (``optimize()`` with ``compile=True``)."""
    return isinstance(pipe.__dict__.get("denoise_step"), CompiledStep)


class Compiled:
    """``torch.compile(fn)`` with the plan's settings; under CUDA graphs each call is a new graph step whose output
    is copied out (the next replay overwrites the graph's own buffer).

    With ``freezing`` inductor keeps ``weights()`` as constants. Then this compile gets a code object of its own
    (dynamo caches compiled code per code object and would serve one pipeline's frozen weights to another), and
    :meth:`check_weights` compiles again when the weights changed (a LoRA fused in, ``load_state_dict``, a training
    step), found by comparing a checksum of every tensor."""

    def __init__(self, fn, plan: FastPlan, weights=None):
        self.fn, self.plan = fn, plan
        self.weights = weights if plan.freezing and plan.backend == "inductor" else None
        self._compile()

    def _compile(self) -> None:
        self.checksum = None  # of the weights the next compile freezes: taken at the next check_weights()
        self.compiled = torch.compile(own_code(self.fn) if self.weights is not None else self.fn,
                                      **self.plan.compile_kwargs())

    def check_weights(self) -> None:
        """Before a call: compile again (lazily, at the call) when the frozen weights changed since they were first
        checked for this compile. One host sync."""
        if self.weights is None:
            return
        now = checksum(self.weights())
        if self.checksum is not None and not torch.equal(now, self.checksum):
            logger.info("the weights changed since the fast mode froze them: compiling again")
            self._compile()
        self.checksum = now

    def __call__(self, *args, **kwargs):
        if self.plan.backend != "inductor":
            return self._run(*args, **kwargs)
        # set around the call, where compiling happens (lazily): through torch.compile(options=) nothing froze
        # size_asserts off: inductor's checks of extern kernels' outputs, whose messages hold function addresses
        # (a new C++ wrapper source in every process)
        with torch._inductor.config.patch(freezing=self.plan.freezing, cpp_wrapper=self.plan.cpp_wrapper,
                                          size_asserts=not self.plan.cpp_wrapper), \
                content_keyed_constants(self.plan.freezing and self.plan.cpp_wrapper):
            return self._run(*args, **kwargs)

    def _run(self, *args, **kwargs):
        if not self.plan.cuda_graphs:
            return self.compiled(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs).clone()


class CompiledDecoder(Compiled):
    """The VAE decoder's ``forward`` (one call per image batch: the weights are checked at each)."""

    def __call__(self, *args, **kwargs):
        self.check_weights()
        return super().__call__(*args, **kwargs)


@contextlib.contextmanager
def content_keyed_constants(enabled: bool):
    """Inductor keys a compiled C++ wrapper by its source, whose header names each frozen constant by its object id,
    so every process built the same wrapper again (12 s of g++ for the shapes UNet). The constants reach the wrapper
    as inputs, not in its code: naming them by content lets a later process reuse the build. Inductor also shares
    one loaded module (and sets its constants on it) between graphs of equal source, so within a process the name
    adds which tensor object of that content it is: the first pipeline of each process names its constants alike.
    A constant that cannot be hashed keeps its id (only the reuse is lost)."""
    if not enabled:
        yield
        return
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    from torch._inductor.virtualized import V

    original = CppWrapperCpu.write_constant

    def write_constant(self, name, hashed):
        try:
            hashed = f"{hashed.rsplit(' ', 1)[0]} {content_key(V.graph.constants[name])}"
        except Exception:  # noqa: BLE001 - keep inductor's id: correct, only not reused by a later process
            pass
        return original(self, name, hashed)

    CppWrapperCpu.write_constant = write_constant
    try:
        yield
    finally:
        CppWrapperCpu.write_constant = original


_SEEN: dict[str, list] = {}  # content digest -> weak references to the tensors of that content named so far


def content_key(tensor: torch.Tensor) -> str:
    if 0 in tensor.stride():  # MKL's packed linear weight (opaque bytes, padding included): its source weight is
        digest = "packed"  # another constant of the graph, named by its content
    else:
        dense = (tensor.to_dense() if tensor.is_mkldnn else tensor).detach().cpu().contiguous()
        digest = hashlib.blake2b(dense.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    seen = _SEEN.setdefault(digest, [])
    index = next((i for i, ref in enumerate(seen) if ref() is tensor), None)
    if index is None:
        seen.append(weakref.ref(tensor))
        index = len(seen) - 1
    return f"{digest}-{index}"


def own_code(fn):
    """``fn`` (a function or bound method) with a copy of its code object: a separate dynamo cache."""
    if inspect.ismethod(fn):
        return types.MethodType(own_code(fn.__func__), fn.__self__)
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy


def checksum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per tensor its sum and its L2 norm, in float64 on the CPU (a changed weight changes one almost surely)."""
    floats = [t.detach() if t.is_floating_point() else t.detach().double() for t in tensors]
    if not floats:
        return torch.zeros(0, dtype=torch.float64)
    sums = [t.sum(dtype=torch.float64) for t in floats]
    norms = [n.double() for n in torch._foreach_norm(floats)]  # one dtype per stack: modules may mix dtypes
    return torch.stack(sums + norms).cpu()


def module_weights(module: torch.nn.Module):
    return lambda: [*module.parameters(), *module.buffers()]


def fuses_step(scheduler, extra_step_kwargs: dict) -> bool:
    """Whether the scheduler step can join the compiled graph: our DDIM without noise (eta = 0) keeps no Python
    state and reads no random generator. Other schedulers (diffusers' keep a step index; DDPM draws noise) would
    recompile at every step."""
    return isinstance(scheduler, DDIMScheduler) and not extra_step_kwargs.get("eta")


def unet_forward(pipe, *args, **kwargs):
    """The UNet's own forward, reached through the pipeline: dynamo then treats its weights as parameters (with the
    module itself as an argument they are plain inputs, and nothing freezes)."""
    return type(pipe.unet).forward(pipe.unet, *args, **kwargs)


class CompiledStep:
    """``pipe.denoise_step`` as one compiled graph (UNet + guidance + DDIM step) where :func:`fuses_step`; else the
    eager step with the UNet's forward compiled (what a user of diffusers does by hand). Both compile lazily. Frozen
    weights are checked once per sampling call (:meth:`begin`, called by the loop), not per step."""

    def __init__(self, pipe, plan: FastPlan):
        self.pipe = pipe
        self.step = Compiled(type(pipe).denoise_step, plan, module_weights(pipe.unet))
        self.unet = Compiled(unet_forward, plan, module_weights(pipe.unet))

    def begin(self, extra_step_kwargs: dict) -> None:
        """Before a sampling loop: recompile where the frozen weights changed."""
        (self.step if fuses_step(self.pipe.scheduler, extra_step_kwargs) else self.unet).check_weights()

    def __call__(self, state, t, cond, extra_step_kwargs, model_input=None):
        pipe = self.pipe
        if fuses_step(pipe.scheduler, extra_step_kwargs):
            return self.step(pipe, state, t, cond, extra_step_kwargs, model_input)
        unet = pipe.unet
        unet.forward = functools.partial(self.unet, pipe)  # for this step only: the fused graph never sees it
        try:
            return type(pipe).denoise_step(pipe, state, t, cond, extra_step_kwargs, model_input)
        finally:
            del unet.forward


# ---- optimize ----------------------------------------------------------------------------------------------
def check_pipeline(pipe) -> None:
    hooked = [name for name in ("unet", "vae", "text_encoder")
              if getattr(getattr(pipe, name, None), "_hf_hook", None) is not None]
    if hooked:
        raise UserError(f"optimize() cannot compile a pipeline with CPU offload hooks (on {', '.join(hooked)}): "
                        "use pipe.to(device) instead of enable_*_cpu_offload(), or skip optimize()")


def optimize(pipe, *, cache: str | Path | bool | None = None, **options):
    """Switch ``pipe`` to the fast mode and return it.

    ``options``: the fields of :class:`FastPlan` (``compile``, ``backend``, ``cuda_graphs``, ``channels_last``,
    ``fuse_qkv``, ``compile_vae``, ``freezing``, ``cpp_wrapper``, ``fullgraph``); unset ones follow
    :func:`plan_for` for the pipeline's device. ``cache``: the folder for compile artefacts (see :func:`use_cache`),
    ``False``: inductor's default. Compiling happens at the first call of each new shape (tens of seconds on CPU,
    about half that in a later process). Calling ``optimize()`` again replaces the compiled parts (fused QKV and channels_last stay)."""
    check_pipeline(pipe)
    pipe.unet.eval()  # inference only (from_pretrained gives eval modules; build_components gives training ones)
    pipe.vae.eval()
    plan = plan_for(pipe.unet.device, **options)
    if plan.fuse_qkv and getattr(pipe.unet, "original_attn_processors", None) is None:
        pipe.fuse_qkv_projections()
    if plan.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    unoptimize_compiled(pipe)
    if plan.compile:
        if plan.backend == "inductor":
            use_cache(cache)
        pipe.denoise_step = CompiledStep(pipe, plan)
        if plan.compile_vae:  # an instance attribute: the module keeps its class, parameters and state-dict keys
            pipe.vae.decoder.forward = CompiledDecoder(pipe.vae.decoder.forward, plan, module_weights(pipe.vae.decoder))
    pipe._fast_plan = plan
    return pipe


def unoptimize_compiled(pipe) -> None:
    """Back to the eager step and decoder (fused QKV and channels_last stay: they change no result)."""
    pipe.__dict__.pop("denoise_step", None)
    pipe.vae.decoder.__dict__.pop("forward", None)
