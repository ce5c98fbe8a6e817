"""``LatentDiffusionImg2ImgPipeline`` against diffusers' ``StableDiffusionImg2ImgPipeline``: same components,
scheduler and seed → the same images (≤1e-4, fp32 CPU). diffusers' img2img fast tests are ported here too."""

import copy
import re
import inspect

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

from latentsd import LatentDiffusionImg2ImgPipeline, LatentDiffusionPipeline
from latentsd.models import build_components
from latentsd.samplers import make_scheduler

PROMPTS = ["a red circle on the left", "a blue square at the top"]
ATOL = 1e-4
SCHEDULERS = ["DDIM", "DDPM", "Euler", "DPM++ 2M", "Heun"]  # ours, ours, then diffusers' (Heun: order 2)


@pytest.fixture(scope="module")
def base():
    return build_components("tiny", seed=0)


def _image(seed=0, size=(64, 64)) -> np.ndarray:
    """A random RGB image in [0, 1], ``[H, W, 3]``."""
    return np.random.default_rng(seed).random((*size, 3)).astype(np.float32)


def _pil(seed=0, size=(64, 64)) -> PIL.Image.Image:
    return PIL.Image.fromarray((_image(seed, size) * 255).round().astype(np.uint8))


def _pair(base, scheduler="DDIM"):
    """Ours and diffusers' pipeline over the same components, each with its own scheduler of that name."""
    parts = copy.deepcopy(base).as_dict()
    kw = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipes = [cls(**{**parts, "scheduler": make_scheduler(scheduler, parts["scheduler"].config)}, **kw)
             for cls in (LatentDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline)]
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    return pipes


def _run(pipe, seed=0, **kw):
    kw = {"prompt": PROMPTS[0], "image": _pil(), "num_inference_steps": 6, "guidance_scale": 3.0,
          "output_type": "np", **kw}
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


def _same(ours, ref, **kw):
    a, b = _run(ours, **kw), _run(ref, **kw)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    return a


# ---- image for image equal to diffusers ------------------------------------------------------------------
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_images_equal_diffusers_img2img(base, scheduler, strength):
    ours, ref = _pair(base, scheduler)
    images = _same(ours, ref, prompt=PROMPTS, strength=strength, num_images_per_prompt=2)
    assert images.shape == (4, 64, 64, 3)
    assert ours.num_timesteps == ref.num_timesteps  # the length of the cut schedule, as diffusers


IMAGES = {
    "pil": lambda: _pil(),
    "np-hwc": lambda: _image(),
    "np-batch": lambda: _image()[None],
    "tensor-chw": lambda: torch.from_numpy(_image()).permute(2, 0, 1),
    "tensor-batch": lambda: torch.from_numpy(_image()).permute(2, 0, 1)[None],
    "pil-list": lambda: [_pil(0), _pil(1)],
    "odd-size-pil": lambda: _pil(size=(52, 75)),  # rounded down to multiples of 8, as diffusers
}


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("kind", IMAGES)
def test_every_image_input_kind_equals_diffusers(base, kind, guidance):
    ours, ref = _pair(base)
    n = 2 if kind == "pil-list" else 1
    _same(ours, ref, prompt=PROMPTS[:n], image=IMAGES[kind](), guidance_scale=guidance, strength=0.6)


def test_latents_as_image_equal_diffusers(base):
    """A 4-channel tensor is taken as init latents, not encoded (diffusers' rule)."""
    ours, ref = _pair(base)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a = _same(ours, ref, image=latents, strength=0.5)
    assert a.shape == (1, 64, 64, 3)


def test_generator_list_and_negative_prompt_equal_diffusers(base):
    ours, ref = _pair(base, "DDPM")  # DDPM draws from the generators every step
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    kw = {"prompt": PROMPTS, "image": _pil(), "negative_prompt": ["blurry", "dark"], "num_inference_steps": 4,
          "strength": 0.7, "output_type": "np"}
    np.testing.assert_allclose(ours(generator=gens(), **kw).images, ref(generator=gens(), **kw).images,
                               atol=ATOL, rtol=0)


def test_prompt_embeds_and_custom_timesteps_equal_diffusers(base):
    ours, ref = _pair(base)
    embeds, negative = ours.encode_prompt(PROMPTS[0], "cpu", 1, True)
    _same(ours, ref, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative, strength=0.5)
    _same(ours, ref, num_inference_steps=None, timesteps=[901, 701, 501, 301, 101], strength=0.6)


def test_callback_sees_the_cut_schedule_and_its_edits_count(base):
    ours, ref = _pair(base)
    seen = {}

    def halve(pipe, i, t, kw):
        seen.setdefault(type(pipe).__name__, []).append(int(t))
        return {"latents": kw["latents"] * 0.5} if i == 1 else kw

    _same(ours, ref, strength=0.5, callback_on_step_end=halve)
    theirs = seen["StableDiffusionImg2ImgPipeline"]
    assert seen["LatentDiffusionImg2ImgPipeline"] == theirs == ours.scheduler.timesteps[3:].tolist()


def test_a_small_strength_stays_closer_to_the_image_than_a_large_one(base):
    ours, _ = _pair(base)
    with torch.no_grad():
        pixels = ours.image_processor.preprocess(_pil(0))
        target = ours.image_processor.postprocess(  # the image as the VAE reconstructs it
            ours.vae.decode(ours.vae.encode(pixels).latent_dist.mean).sample, output_type="np")
    near, far = (_run(ours, image=_pil(0), strength=s, num_inference_steps=10) for s in (0.2, 0.9))
    assert np.abs(near - target).mean() < np.abs(far - target).mean()


def test_one_image_per_prompt_stays_with_its_prompt(base):
    """Two prompts, one image each, two images per prompt: each prompt's images are those of the prompt alone
    (diffusers tiles the images instead and pairs prompt 1 with image 2: our deliberate difference)."""
    ours, _ = _pair(base)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    kw = {"num_inference_steps": 4, "strength": 0.8, "output_type": "np", "num_images_per_prompt": 2}
    batch = ours(PROMPTS, image=[_pil(0), _pil(1)], generator=gens([0, 1, 2, 3]), **kw).images
    first = ours(PROMPTS[0], image=_pil(0), generator=gens([0, 1]), **kw).images
    second = ours(PROMPTS[1], image=_pil(1), generator=gens([2, 3]), **kw).images
    np.testing.assert_allclose(batch, np.concatenate([first, second]), atol=ATOL, rtol=0)


# ---- diffusers' fast tests, ported ---------------------------------------------------------------------
def test_diffusers_default_and_return_dict_false(base):
    ours, ref = _pair(base, "PLMS")
    images = _same(ours, ref, guidance_scale=6.0, num_inference_steps=2, strength=0.8)
    as_tuple = ours(PROMPTS[0], image=_pil(), num_inference_steps=2, guidance_scale=6.0, output_type="np",
                    generator=torch.Generator().manual_seed(0), return_dict=False)[0]
    np.testing.assert_array_equal(images, as_tuple)


def test_diffusers_multiple_init_images_and_k_lms(base):
    ours, ref = _pair(base, "LMS")
    _same(ours, ref, prompt=PROMPTS, image=torch.from_numpy(_image()).permute(2, 0, 1)[None].repeat(2, 1, 1, 1))


@pytest.mark.parametrize("prompts,per_prompt", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_diffusers_num_images_per_prompt_shapes(base, prompts, per_prompt):
    ours, _ = _pair(base)
    images = _run(ours, prompt=PROMPTS[:prompts], num_images_per_prompt=per_prompt, num_inference_steps=2)
    assert images.shape == (prompts * per_prompt, 64, 64, 3)


def test_diffusers_interrupt_stops_at_the_step_it_is_set(base):
    ours, _ = _pair(base)
    states = []

    def keep(pipe, i, t, kw):
        states.append(kw["latents"].clone())
        return kw

    def stop(pipe, i, t, kw):
        pipe._interrupt = i == 1
        return kw

    _run(ours, output_type="latent", callback_on_step_end=keep)
    interrupted = _run(ours, output_type="latent", callback_on_step_end=stop)
    torch.testing.assert_close(interrupted, states[1], rtol=0, atol=1e-6)


def test_call_signature_starts_with_diffusers_arguments_in_order():
    ours = list(inspect.signature(LatentDiffusionImg2ImgPipeline.__call__).parameters)
    theirs = [p for p in inspect.signature(diffusers.StableDiffusionImg2ImgPipeline.__call__).parameters
              if p != "kwargs"]
    assert ours[:len(theirs)] == theirs


# ---- loading ------------------------------------------------------------------------------------------
def test_a_text_to_image_folder_loads_and_equals_diffusers(tiny_model_dir):
    ours = LatentDiffusionImg2ImgPipeline.from_pretrained(tiny_model_dir)
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                                   requires_safety_checker=False)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    assert type(ours.scheduler).__module__.startswith("latentsd")  # the folder's DDPM became ours
    _same(ours, ref, strength=0.7)


def test_from_pipe_shares_the_components_of_a_text_to_image_pipeline(base):
    t2i = LatentDiffusionPipeline(**copy.deepcopy(base).as_dict())
    i2i = LatentDiffusionImg2ImgPipeline.from_pipe(t2i)
    assert all(getattr(i2i, k) is getattr(t2i, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    back = LatentDiffusionPipeline.from_pipe(i2i)
    assert back.unet is t2i.unet and type(back) is LatentDiffusionPipeline


def test_saved_folder_names_diffusers_img2img_class(base, tmp_path):
    ours, _ = _pair(base)
    ours.save_pretrained(tmp_path)
    ref = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(ref) is diffusers.StableDiffusionImg2ImgPipeline
    ref.set_progress_bar_config(disable=True)
    _same(ours, ref)


# ---- bad input ----------------------------------------------------------------------------------------
BAD_CALLS = [
    ({"strength": -0.1}, ValueError, r"`strength` must be in \[0, 1\]"),
    ({"strength": 1.5}, ValueError, r"`strength` must be in \[0, 1\]"),
    ({"strength": 0.1, "num_inference_steps": 5}, ValueError, "leaves no denoising step"),
    ({"image": None}, ValueError, "`image` is required"),
    ({"image": "picture.png"}, ValueError, "incorrect format"),
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps"),
    ({"output_type": "jpeg"}, ValueError, "output_type"),
    ({"prompt": PROMPTS, "image": [_pil(0), _pil(1), _pil(2)]}, ValueError, "got 3 images for 2 images"),
    ({"generator": [torch.Generator()] * 3}, ValueError, "got 3 generators"),
    ({"callback_steps": 1}, TypeError, "callback_on_step_end"),
    ({"height": 64}, TypeError, "unexpected argument `height`"),
]


@pytest.mark.parametrize("kw,error,message", BAD_CALLS, ids=[m for *_, m in BAD_CALLS])
def test_bad_input_is_an_error_that_says_what_to_change(base, kw, error, message):
    ours, _ = _pair(base)
    kw = {"prompt": PROMPTS[0], "image": _pil(), "num_inference_steps": 2, "output_type": "np", **kw}
    with pytest.raises(error, match=message):
        ours(**kw)


# ---- the command line ---------------------------------------------------------------------------------
def _cli(tmp_path, model_dir, *extra):
    """`latentsd generate` with an init image; returns the exit code and the PNG as int16 pixels (or None)."""
    from latentsd.cli import main

    out = tmp_path / "cli.png"
    code = main(["generate", PROMPTS[0], "--model", str(model_dir), "--steps", "4", "--guidance", "2",
                 "--seed", "0", "--device", "cpu", *extra, "--out", str(out)])
    return code, np.asarray(PIL.Image.open(out), dtype=np.int16) if code == 0 else None


@pytest.mark.parametrize("size", [None, (48, 80)])  # the init image's size, or --height/--width
def test_cli_init_image_equals_the_library_and_diffusers(tiny_model_dir, tmp_path, size):
    init = _pil(size=(40, 56))
    init.save(tmp_path / "init.png")
    extra = ["--height", str(size[0]), "--width", str(size[1])] if size else []
    code, pixels = _cli(tmp_path, tiny_model_dir, "--init-image", str(tmp_path / "init.png"), "--strength", "0.6",
                        *extra)
    assert code == 0 and pixels.shape == (*(size or (40, 56)), 3)
    image = init if size is None else init.resize(size[::-1], PIL.Image.LANCZOS)  # diffusers' resize filter
    call = {"image": image, "strength": 0.6, "num_inference_steps": 4, "guidance_scale": 2.0}
    ours = LatentDiffusionImg2ImgPipeline.from_pretrained(tiny_model_dir)
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                                   requires_safety_checker=False)
    for pipe in (ours, ref):
        out = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **call).images[0]
        assert np.abs(np.asarray(out, dtype=np.int16) - pixels).max() <= 1  # uint8: 1e-4 may round across a level


def test_cli_bad_image_arguments_exit_2_with_the_reason(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    _pil().save(tmp_path / "ok.png")
    cases = [
        (["--init-image", str(tmp_path / "missing.png")], "--init-image .*missing.png does not exist"),
        (["--init-image", str(tmp_path / "notes.png")], "notes.png is not a readable image"),
        (["--strength", "0.5"], "--strength needs --init-image"),
        (["--mask", str(tmp_path / "ok.png")], "--mask needs --init-image"),
        (["--init-image", str(tmp_path / "ok.png"), "--strength", "1.5"], r"--strength: must be in \[0, 1\], got 1.5"),
        (["--init-image", str(tmp_path / "ok.png"), "--height", "60"], "--height 60 must be divisible by 8"),
    ]
    for extra, message in cases:
        model = tiny_model_dir if "60" in extra else tmp_path / "never-read"  # the image error comes first
        code, _ = _cli(tmp_path, model, *extra)
        err = capsys.readouterr().err
        assert code == 2 and re.search(message, err) and "Traceback" not in err, (extra, err)
