"""The fast mode (``pipe.optimize()``, ``latentsd generate --fast``): images equal the default mode's, the step is one
graph with no host sync, schedulers with Python state never recompile per step, the compile is cached on disk.

Structure checks compile with ``backend="eager"`` (dynamo's tracing, no inductor: seconds); one test compiles with
inductor for real (tens of seconds on 2 cores, less when inductor's cache is warm)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate.hooks import remove_hook_from_module
from torch._dynamo.utils import counters

import latentsd.fast
from latentsd import LatentDiffusionInpaintPipeline, LatentDiffusionPipeline
from latentsd.cli import main
from latentsd.errors import UserError
from latentsd.fast import is_optimized
from latentsd.models import build_components, load_model_config
from latentsd.samplers import make_scheduler

PROMPTS = ["a red circle on the left", "a blue square at the top"]
EAGER_ATOL = 1e-5  # measured: <= 3e-6 (channels_last convolutions round differently)
INDUCTOR_ATOL = 1e-5  # measured: <= 2.5e-6 (tiny model, 3 steps; shapes model, 25 steps: 2.5e-6)


def fresh(parts, scheduler="DDIM", cls=LatentDiffusionPipeline):
    """A pipeline over copies of ``parts`` (optimize() changes the modules' memory format)."""
    parts = copy.deepcopy(parts).as_dict()
    pipe = cls(**{**parts, "scheduler": make_scheduler(scheduler, parts["scheduler"].config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, seed=0, **kw):
    kw = {"prompt": PROMPTS, "num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "np", **kw}
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


@pytest.fixture
def graphs():
    """Dynamo's counters, from an empty cache: ``graphs()`` = graphs compiled since, ``breaks()`` = graph breaks."""
    torch._dynamo.reset()
    counters.clear()
    yield type("Graphs", (), {"count": staticmethod(lambda: counters["stats"]["unique_graphs"]),
                              "breaks": staticmethod(lambda: dict(counters["graph_break"]))})
    torch._dynamo.reset()


def value_guards(fn) -> list[str]:
    """Guards of ``fn``'s compiled entries that read a tensor's value: dynamo turns a host read of a CPU scalar
    (``float(t)``, ``t.item()``) into such a guard, checked on the host before every call."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return [line.strip() for entry in _debug_get_cache_entry_list(fn.__code__)
            for line in str(entry.guard_manager).splitlines() if ".item()" in line or ".tolist()" in line]


def test_the_fast_step_is_one_graph_without_host_syncs(tiny, graphs):
    pipe = fresh(tiny)
    reference = [images(pipe), images(pipe, seed=1)]
    # fullgraph: a host sync inside the graph (.item(), .tolist(), a branch on a tensor value) is an error
    assert pipe.optimize(backend="eager", fullgraph=True, compile_vae=True) is pipe and is_optimized(pipe)
    np.testing.assert_allclose(images(pipe), reference[0], atol=EAGER_ATOL, rtol=0)
    assert graphs.count() == 2 and not graphs.breaks()  # the whole step (UNet + guidance + DDIM) and the decoder
    assert value_guards(LatentDiffusionPipeline.denoise_step) == []  # ... and none in front of it
    np.testing.assert_allclose(images(pipe, seed=1), reference[1], atol=EAGER_ATOL, rtol=0)
    assert graphs.count() == 2  # new latents, same shapes: no recompile


@pytest.mark.parametrize("scheduler,eta", [("DDIM", 0.7), ("DDPM", 0.0), ("Euler a", 0.0), ("DPM++ 2M", 0.0)])
def test_stateful_schedulers_compile_the_unet_once_and_match(tiny, graphs, scheduler, eta):
    """A scheduler with a step index, noise draws or a generator keeps its eager step: one UNet graph, no
    per-step recompile, the same images (the generator advances as in the default mode)."""
    pipe = fresh(tiny, scheduler)
    reference = images(pipe, eta=eta)
    pipe.optimize(backend="eager", fullgraph=True)
    np.testing.assert_allclose(images(pipe, eta=eta), reference, atol=EAGER_ATOL, rtol=0)
    assert graphs.count() == 1 and not graphs.breaks() and value_guards(type(pipe.unet).forward) == []


def test_inpainting_hooks_run_inside_the_compiled_step(graphs):
    cfg = load_model_config("tiny")
    cfg["unet"]["in_channels"] = 9  # an inpainting UNet: the mask and masked image join the UNet input (a hook)
    pipe = fresh(build_components(cfg, seed=0), "DDIM", LatentDiffusionInpaintPipeline)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    masks = [PIL.Image.fromarray(((rng.random((64, 64)) > 0.5) * 255).astype(np.uint8)) for _ in range(2)]
    call = {"prompt": PROMPTS[0], "image": image, "strength": 1.0}
    reference = [images(pipe, mask_image=mask, **call) for mask in masks]
    pipe.optimize(backend="eager", fullgraph=True)
    for mask, ref in zip(masks, reference):
        np.testing.assert_allclose(images(pipe, mask_image=mask, **call), ref, atol=EAGER_ATOL, rtol=0)
    assert graphs.count() == 1 and not graphs.breaks()  # a new mask is new data for the same graph


def test_inductor_matches_the_default_and_recompiles_when_frozen_weights_change(tiny, tmp_path, monkeypatch):
    """The real compile with the CPU plan (inductor, weights frozen as constants, the C++ wrapper). Its builds land in
    the latentsd cache folder. A pipeline with other weights gets its own compile and its own images; when its
    weights then become those of the first (in-place ``.data`` copies, which no version counter sees), the next call
    notices, compiles again and gets the first pipeline's images; the first pipeline keeps its own constants."""
    cache = tmp_path / "compile"
    monkeypatch.setenv("LATENTSD_COMPILE_CACHE", str(cache))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    pipe, other = fresh(tiny), fresh(build_components("tiny", seed=1))
    reference, other_reference = images(pipe), images(other)
    assert np.abs(other_reference - reference).max() > 0.1  # the two models really differ
    pipe.optimize()
    assert pipe._fast_plan.freezing and pipe._fast_plan.cpp_wrapper
    np.testing.assert_allclose(images(pipe), reference, atol=INDUCTOR_ATOL, rtol=0)
    wrappers = lambda: sorted(cache.rglob("*.main.so"))  # noqa: E731 - the C++ wrappers built so far
    assert len(wrappers()) == 1
    other.optimize()
    np.testing.assert_allclose(images(other), other_reference, atol=INDUCTOR_ATOL, rtol=0)
    assert len(wrappers()) == 2
    with torch.no_grad():
        for name in ("unet", "vae", "text_encoder"):
            for mine, theirs in zip(getattr(other, name).state_dict().values(), getattr(pipe, name).state_dict().values()):
                mine.data.copy_(theirs)
    np.testing.assert_allclose(images(other), reference, atol=INDUCTOR_ATOL, rtol=0)
    assert len(wrappers()) == 3  # equal constants, other tensors: not the first pipeline's module
    np.testing.assert_allclose(images(pipe), reference, atol=INDUCTOR_ATOL, rtol=0)  # still its own constants


SECOND_PROCESS = """
import sys, numpy as np, torch
from latentsd.models import build_components
sys.path.insert(0, {tests!r})
from test_fast import fresh, images
pipe = fresh(build_components("tiny", seed=0))
reference = images(pipe)
print(float(np.abs(images(pipe.optimize()) - reference).max()))
"""


def test_a_second_process_reuses_the_frozen_compile_builds(tmp_path):
    """Frozen constants are named by content in the C++ wrapper's source, so a second process with the same weights
    builds nothing new: kernels and wrapper come from the cache folder (the FX graph itself is never cached with
    freezing: inductor cannot pickle the prepacked oneDNN weights)."""
    env = {**os.environ, "LATENTSD_COMPILE_CACHE": str(tmp_path / "compile")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    builds = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", SECOND_PROCESS.format(tests=str(Path(__file__).parent))],
                             capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert float(run.stdout.split()[-1]) <= INDUCTOR_ATOL
        builds.append(sorted(p.name for p in (tmp_path / "compile").rglob("*.so")))
    assert builds[0] and builds[1] == builds[0]


def test_save_pretrained_after_optimize_writes_the_same_weights(tiny, tmp_path, graphs):
    pipe = fresh(tiny)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.optimize(backend="eager", compile_vae=True)
    images(pipe)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert loaded.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in before.items())
    assert set(loaded.vae.state_dict()) == set(tiny.vae.state_dict())


def test_cli_fast_is_optimize_also_for_image_to_image(tiny_model_dir, tmp_path, monkeypatch, graphs):
    """``--fast`` calls ``optimize()`` with its defaults on the pipeline that generates (img2img's too), after the
    model loaded; the image equals Python's ``optimize()`` + generate. (The spy compiles with backend "eager".)"""
    calls = []
    real = latentsd.fast.optimize

    def spy(pipe, **options):
        calls.append((type(pipe).__name__, options))
        return real(pipe, **{**options, "backend": "eager"})

    monkeypatch.setattr(latentsd.fast, "optimize", spy)
    args = ["generate", "a red circle", "--model", str(tiny_model_dir), "--steps", "3", "--guidance", "2",
            "--scheduler", "ddim", "--num-images", "2"]
    assert main([*args, "--fast", "--out", str(tmp_path / "fast.png")]) == 0
    assert calls == [("LatentDiffusionPipeline", {})]
    from latentsd.generate import generate_to_file, load_pipeline

    pipe = load_pipeline(str(tiny_model_dir), scheduler="ddim", device="cpu").optimize()
    generate_to_file(pipe, "a red circle", tmp_path / "python.png", steps=3, guidance=2, num_images=2)
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "fast.png")),
                          np.asarray(PIL.Image.open(tmp_path / "python.png")))
    assert main([*args, "--fast", "--init-image", str(tmp_path / "fast.png"), "--height", "64", "--width", "64",
                 "--num-images", "1", "--out", str(tmp_path / "i2i.png")]) == 0
    assert calls[-1] == ("LatentDiffusionImg2ImgPipeline", {})


def test_bad_options_are_errors_that_say_what_to_do(tiny):
    pipe = fresh(tiny)
    with pytest.raises(UserError, match=r"unknown option\(s\) \['mode'\]: use some of"):
        pipe.optimize(mode="max-autotune")
    with pytest.raises(UserError, match="backend 'tensorrt' unknown: use one of"):
        pipe.optimize(backend="tensorrt")
    with pytest.raises(UserError, match="cuda_graphs=True needs the pipeline on a CUDA device"):
        pipe.optimize(cuda_graphs=True)
    from accelerate import cpu_offload

    cpu_offload(pipe.unet, execution_device=torch.device("cpu"))
    try:
        with pytest.raises(UserError, match=r"CPU offload hooks \(on unet\): use pipe.to\(device\)"):
            pipe.optimize()
    finally:
        remove_hook_from_module(pipe.unet, recurse=True)
    assert not is_optimized(pipe)


@pytest.mark.gpu
def test_cuda_graphs_match_the_default_on_cuda(tiny):
    """On CUDA the plan adds CUDA graphs (reduce-overhead), fused QKV and the compiled VAE decoder."""
    pipe = fresh(tiny).to("cuda")
    call = {"prompt": PROMPTS, "num_inference_steps": 3, "guidance_scale": 2.0, "output_type": "np"}
    run = lambda seed: pipe(generator=torch.Generator("cuda").manual_seed(seed), **call).images  # noqa: E731
    reference = [run(0), run(1)]
    pipe.optimize(cache=False)
    assert pipe._fast_plan.cuda_graphs and pipe._fast_plan.fuse_qkv and pipe._fast_plan.compile_vae
    for seed in (0, 1, 0):  # replays must not hand back a buffer the next replay overwrote
        np.testing.assert_allclose(run(seed), reference[seed], atol=2e-3, rtol=0)
