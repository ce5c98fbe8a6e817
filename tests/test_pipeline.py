import json

import diffusers
import numpy as np
import pytest
import torch

from latentsd import DDIMScheduler, DDPMScheduler, LatentDiffusionPipeline

PROMPTS = ["a red circle on the left", "a blue square at the top"]


def _pipes(tiny, scheduler):
    parts = {**tiny.as_dict(), "scheduler": scheduler}
    ours = LatentDiffusionPipeline(**parts)
    ref = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def _run(pipe, **kw):
    kw = {"prompt": PROMPTS, "num_inference_steps": 6, "output_type": "np", **kw}
    return pipe(generator=torch.Generator().manual_seed(0), **kw).images


SCHEDULERS = {
    "ours-ddpm": lambda cfg: DDPMScheduler.from_config(cfg),
    "ours-ddim": lambda cfg: DDIMScheduler.from_config(cfg),
    "diffusers-pndm": lambda cfg: diffusers.PNDMScheduler.from_config(cfg, skip_prk_steps=True),
    "diffusers-euler": lambda cfg: diffusers.EulerDiscreteScheduler.from_config(cfg),
}
CALLS = [
    {},
    {"guidance_scale": 1.0, "num_images_per_prompt": 2},
    {"negative_prompt": ["blurry", "dark"], "guidance_rescale": 0.5},
    {"negative_prompt": ["blurry", "blurry"], "eta": 0.7, "height": 48, "width": 80},
]


@pytest.mark.parametrize("call", CALLS, ids=range(len(CALLS)))
@pytest.mark.parametrize("sched", SCHEDULERS)
def test_images_equal_diffusers_stable_diffusion_pipeline(tiny, sched, call):
    ours, ref = _pipes(tiny, SCHEDULERS[sched](tiny.scheduler.config))
    a, b = _run(ours, **call), _run(ref, **call)
    n = len(PROMPTS) * call.get("num_images_per_prompt", 1)
    assert a.shape == (n, call.get("height", 64), call.get("width", 64), 3)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_prompt_embeds_and_latents_inputs(tiny):
    pipe, _ = _pipes(tiny, DDIMScheduler.from_config(tiny.scheduler.config))
    embeds, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True)  # diffusers' signature
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    by_text = pipe(PROMPTS, latents=latents, num_inference_steps=4, output_type="np").images
    by_embeds = pipe(prompt_embeds=embeds, negative_prompt_embeds=neg, latents=latents, num_inference_steps=4,
                     output_type="np").images
    np.testing.assert_allclose(by_text, by_embeds, atol=1e-6)


def test_one_negative_string_applies_to_every_prompt(tiny):
    pipe, _ = _pipes(tiny, DDIMScheduler.from_config(tiny.scheduler.config))
    np.testing.assert_array_equal(_run(pipe, negative_prompt="blurry"), _run(pipe, negative_prompt=["blurry"] * 2))


def test_callback_sees_every_step_and_can_edit_latents(tiny):
    pipe, _ = _pipes(tiny, DDIMScheduler.from_config(tiny.scheduler.config))
    seen = []

    def zero_latents(p, i, t, kw):
        seen.append(int(t))
        return {"latents": torch.zeros_like(kw["latents"])}

    out = pipe("a circle", num_inference_steps=5, callback_on_step_end=zero_latents, output_type="latent").images
    assert seen == pipe.scheduler.timesteps.tolist() and not out.any()


NO_SYNC_CALLS = {
    "plain": {"prompt": "a red circle"},
    "long-prompts-masked": {"prompt": ["a red circle", "a blue square " * 30], "long_prompts": True,
                            "negative_prompt": "blurry", "guidance_rescale": 0.5},
}


def _run_guarded(pipe, monkeypatch, **call) -> list[int]:
    """Call ``pipe`` with a callback that, from the first step's end on, fails the test on any host sync."""
    calls = []

    def guard(p, i, t, kw):
        if not calls:
            monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() in sampling loop"))
            monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("bool(tensor) in loop"))
        calls.append(i)
        return {}

    pipe(**call, callback_on_step_end=guard, output_type="latent", generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    return calls


@pytest.mark.parametrize("call", NO_SYNC_CALLS)
def test_sampling_loop_never_syncs_with_the_host(tiny, monkeypatch, call):
    """No .item() / tensor truthiness inside the loop: the loop can be compiled or graph-captured."""
    pipe, _ = _pipes(tiny, DDPMScheduler.from_config(tiny.scheduler.config))
    pipe.scheduler.set_timesteps(4)
    assert _run_guarded(pipe, monkeypatch, **NO_SYNC_CALLS[call], num_inference_steps=4) == [0, 1, 2, 3]


@pytest.mark.parametrize("scheduler", ["DDPM", "DDIM", "DPM++ 2M"])  # DPM++ 2M: a diffusers scheduler with no syncs
@pytest.mark.parametrize("kind", ["img2img", "inpaint-4ch", "inpaint-9ch"])
def test_image_to_image_and_inpainting_loops_never_sync_with_the_host(tiny, monkeypatch, kind, scheduler):
    """The same for the strength-cut schedule, inpainting's latent blending and its 9-channel UNet input."""
    from latentsd import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline
    from latentsd.models import build_components, load_model_config
    from latentsd.samplers import make_scheduler

    parts = tiny
    if kind == "inpaint-9ch":
        cfg = load_model_config("tiny")
        cfg["unet"]["in_channels"] = 9
        parts = build_components(cfg, seed=0)
    cls = LatentDiffusionImg2ImgPipeline if kind == "img2img" else LatentDiffusionInpaintPipeline
    pipe = cls(**{**parts.as_dict(), "scheduler": make_scheduler(scheduler, parts.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = {} if kind == "img2img" else {"mask_image": (torch.arange(64) < 32).float().expand(1, 1, 64, 64)}
    calls = _run_guarded(pipe, monkeypatch, prompt="a red circle", image=image, strength=0.75, num_inference_steps=8,
                         **mask)
    assert calls == list(range(6))


BAD_CALLS = [
    ({"height": 60}, "divisible by 8"),
    ({"width": 30}, "divisible by 8"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"negative_prompt": ["a", "b", "c"]}, "negative prompts for 2 prompts"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"output_type": "jpeg"}, "output_type"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
]


@pytest.mark.parametrize("kw,message", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_bad_arguments_raise_value_error_saying_what_to_change(tiny, kw, message):
    pipe, _ = _pipes(tiny, DDPMScheduler.from_config(tiny.scheduler.config))
    with pytest.raises(ValueError, match=message):
        pipe(PROMPTS, num_inference_steps=kw.pop("num_inference_steps", 2), **kw)


def test_saved_folder_loads_in_diffusers_unchanged(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert list((tiny_model_dir / "unet").glob("*.safetensors"))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    ours = LatentDiffusionPipeline.from_pretrained(tiny_model_dir)
    assert type(ours.scheduler) is DDPMScheduler and type(ref.scheduler) is diffusers.DDPMScheduler
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(ours), _run(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("sched", ["PNDMScheduler", "DDIMScheduler"])
def test_loads_folders_written_by_diffusers(tiny, tmp_path, sched):
    scheduler = getattr(diffusers, sched).from_config(tiny.scheduler.config)
    _, ref = _pipes(tiny, scheduler)
    ref.save_pretrained(tmp_path)
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    # diffusers' DDIM becomes ours (same numbers); a scheduler we do not have (PNDM) is used as it is
    expected = DDIMScheduler if sched == "DDIMScheduler" else diffusers.PNDMScheduler
    assert type(pipe.scheduler) is expected
    np.testing.assert_allclose(_run(pipe), _run(ref), atol=1e-4, rtol=0)


EMBEDS_CALLS = [
    {"negative_prompt": ["blurry", "dark"]},
    {},
    {"negative_prompt": ["blurry", "dark"], "num_images_per_prompt": 2},
]


@pytest.mark.parametrize("call", EMBEDS_CALLS, ids=["negative_prompt", "alone", "negative_prompt-2-per-prompt"])
def test_prompt_embeds_with_or_without_negative_prompt_equal_diffusers(tiny, call):
    """diffusers encodes `negative_prompt` also when `prompt_embeds` are passed (once ignored here)."""
    ours, ref = _pipes(tiny, DDIMScheduler.from_config(tiny.scheduler.config))
    embeds = ref.encode_prompt(PROMPTS, "cpu", 1, False)[0]  # diffusers' own encoding of the prompts
    kw = {"prompt": None, "prompt_embeds": embeds, **call}
    np.testing.assert_allclose(_run(ours, **kw), _run(ref, **kw), atol=1e-4, rtol=0)


def test_a_negative_string_with_prompt_embeds_equals_diffusers(tiny):
    ours, ref = _pipes(tiny, DDPMScheduler.from_config(tiny.scheduler.config))
    embeds = ref.encode_prompt(PROMPTS[:1], "cpu", 1, False)[0]
    kw = {"prompt": None, "prompt_embeds": embeds, "negative_prompt": "blurry"}
    np.testing.assert_allclose(_run(ours, **kw), _run(ref, **kw), atol=1e-4, rtol=0)


def test_prompt_embeds_of_an_odd_length_need_negative_prompt_embeds(tiny):
    pipe, _ = _pipes(tiny, DDIMScheduler.from_config(tiny.scheduler.config))
    with pytest.raises(ValueError, match="not a multiple of the text encoder's 77: pass `negative_prompt_embeds`"):
        pipe(prompt_embeds=torch.zeros(1, 70, 32), num_inference_steps=2)
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        pipe(prompt_embeds=torch.zeros(2, 77, 32), negative_prompt=["x"], num_inference_steps=2)


def _fresh_pipe(model_dir):
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)  # its own modules: offloading rewires them
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sequential_offload_to_cpu(pipe):
    """What `enable_sequential_cpu_offload` does, with the CPU itself as the execution device.

    diffusers' method itself cannot run on a CPU-only machine: it executes on "cpu:0", and with torch
    2.13 accelerate's hooks then turn parameters into plain tensors (`Parameter.to("cpu:0")` copies).
    """
    from accelerate import cpu_offload

    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            cpu_offload(module, torch.device("cpu"), offload_buffers=len(module._parameters) > 0)


def test_sequential_cpu_offload_equals_the_plain_pipeline(tiny_model_dir):
    """Parameters sit on `meta` until each layer runs: token ids must go to the execution device."""
    expected = _run(_fresh_pipe(tiny_model_dir), negative_prompt=["blurry", "dark"])
    pipe = _fresh_pipe(tiny_model_dir)
    _sequential_offload_to_cpu(pipe)
    assert next(pipe.text_encoder.parameters()).is_meta and pipe._execution_device == torch.device("cpu")
    np.testing.assert_allclose(_run(pipe, negative_prompt=["blurry", "dark"]), expected, atol=1e-6, rtol=0)


def test_model_cpu_offload_equals_the_plain_pipeline(tiny_model_dir):
    expected = _run(_fresh_pipe(tiny_model_dir))
    pipe = _fresh_pipe(tiny_model_dir)
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):  # the hooks are re-armed after each call
        np.testing.assert_allclose(_run(pipe), expected, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["enable_model_cpu_offload", "enable_sequential_cpu_offload"])
def test_cpu_offload_on_cuda_equals_the_pipeline_on_cuda(tiny_model_dir, offload):
    def run(pipe):
        return pipe(PROMPTS, negative_prompt=["blurry", "dark"], num_inference_steps=4, output_type="np",
                    generator=torch.Generator("cuda").manual_seed(0)).images

    expected = run(_fresh_pipe(tiny_model_dir).to("cuda"))
    pipe = _fresh_pipe(tiny_model_dir)
    getattr(pipe, offload)(device="cuda")
    assert pipe._execution_device.type == "cuda"
    np.testing.assert_allclose(run(pipe), expected, atol=1e-4, rtol=0)
