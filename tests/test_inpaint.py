"""``LatentDiffusionInpaintPipeline`` against diffusers' ``StableDiffusionInpaintPipeline``: same components,
scheduler and seed → the same images (≤1e-4, fp32 CPU), with a plain 4-channel UNet (latent blending) and a
9-channel inpainting UNet. diffusers' inpaint fast tests are ported here too."""

import copy
import inspect

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers.callbacks import SDCFGCutoffCallback

from latentsd import LatentDiffusionInpaintPipeline, LatentDiffusionPipeline
from latentsd.models import build_components, load_model_config
from latentsd.samplers import make_scheduler

PROMPTS = ["a red circle on the left", "a blue square at the top"]
ATOL = 1e-4
SCHEDULERS = ["DDIM", "DDPM", "Euler", "DPM++ 2M", "Heun"]  # ours, ours, then diffusers' (Heun: order 2)


def _components(in_channels):
    cfg = load_model_config("tiny")
    cfg["unet"]["in_channels"] = in_channels
    return build_components(cfg, seed=0)


@pytest.fixture(scope="module")
def unets():
    """Tiny parts with a plain (4) and an inpainting (9 input channels) UNet."""
    return {4: _components(4), 9: _components(9)}


def _image(seed=0, size=(64, 64)) -> np.ndarray:
    return np.random.default_rng(seed).random((*size, 3)).astype(np.float32)


def _pil(seed=0, size=(64, 64)) -> PIL.Image.Image:
    return PIL.Image.fromarray((_image(seed, size) * 255).round().astype(np.uint8))


def _mask_array(size=(64, 64), box=(16, 48, 8, 40)) -> np.ndarray:
    """1 (repaint) inside ``box`` = (top, bottom, left, right), 0 elsewhere, ``[H, W]``."""
    mask = np.zeros(size, np.float32)
    mask[box[0]:box[1], box[2]:box[3]] = 1
    return mask


def _mask(**kw) -> PIL.Image.Image:
    return PIL.Image.fromarray((_mask_array(**kw) * 255).astype(np.uint8))


def _pair(parts, scheduler="DDIM"):
    """Ours and diffusers' pipeline over the same components, each with its own scheduler of that name."""
    parts = copy.deepcopy(parts).as_dict()
    kw = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipes = [cls(**{**parts, "scheduler": make_scheduler(scheduler, parts["scheduler"].config)}, **kw)
             for cls in (LatentDiffusionInpaintPipeline, diffusers.StableDiffusionInpaintPipeline)]
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    return pipes


def _run(pipe, seed=0, **kw):
    kw = {"prompt": PROMPTS[0], "image": _pil(), "mask_image": _mask(), "num_inference_steps": 6,
          "guidance_scale": 3.0, "output_type": "np", **kw}
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


def _same(ours, ref, **kw):
    a, b = _run(ours, **kw), _run(ref, **kw)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    return a


# ---- image for image equal to diffusers ------------------------------------------------------------------
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("channels", [4, 9])
def test_images_equal_diffusers_inpaint(unets, channels, scheduler, strength):
    ours, ref = _pair(unets[channels], scheduler)
    images = _same(ours, ref, prompt=PROMPTS, strength=strength, num_images_per_prompt=2)
    assert images.shape == (4, 64, 64, 3) and ours.num_timesteps == ref.num_timesteps


INPUTS = {
    "pil-rgb-mask": lambda: (_pil(), _mask().convert("RGB")),
    "np": lambda: (_image(), _mask_array()),
    "np-batch": lambda: (_image()[None], _mask_array()[None, :, :, None]),
    "tensor": lambda: (torch.from_numpy(_image()).permute(2, 0, 1), torch.from_numpy(_mask_array())[None]),
    "tensor-batch": lambda: (torch.from_numpy(_image()).permute(2, 0, 1)[None],
                             torch.from_numpy(_mask_array())[None, None]),
    "small-mask": lambda: (_pil(), _mask(size=(32, 32), box=(8, 24, 4, 20))),  # resized to the image, as diffusers
}


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("channels", [4, 9])
def test_every_image_and_mask_kind_equals_diffusers(unets, channels, kind, guidance):
    ours, ref = _pair(unets[channels])
    image, mask = INPUTS[kind]()
    _same(ours, ref, image=image, mask_image=mask, guidance_scale=guidance, strength=0.8)


@pytest.mark.parametrize("channels", [4, 9])
def test_size_latents_prompt_embeds_and_generator_lists_equal_diffusers(unets, channels):
    ours, ref = _pair(unets[channels], "DDPM")  # DDPM draws from the generators every step
    _same(ours, ref, height=48, width=80, negative_prompt="blurry")
    _same(ours, ref, latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)), strength=0.5)
    embeds, negative = ours.encode_prompt(PROMPTS, "cpu", 1, True)
    _same(ours, ref, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
    kw = {"prompt": PROMPTS, "image": _pil(), "mask_image": _mask(), "num_inference_steps": 4, "strength": 0.7,
          "output_type": "np"}
    np.testing.assert_allclose(ours(generator=gens(), **kw).images, ref(generator=gens(), **kw).images,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("channels", [4, 9])
def test_padding_mask_crop_equals_diffusers(unets, channels):
    ours, ref = _pair(unets[channels])
    kw = {"prompt": PROMPTS[0], "image": _pil(), "mask_image": _mask(box=(20, 36, 12, 28)),
          "padding_mask_crop": 4, "num_inference_steps": 4}
    a, b = (np.asarray(p(generator=torch.Generator().manual_seed(0), **kw).images[0], dtype=np.int16)
            for p in (ours, ref))
    assert a.shape == (64, 64, 3) and np.abs(a - b).max() <= 1  # uint8 PIL: 1e-4 may round across a level


def test_masked_image_latents_equal_diffusers_and_encoding_them_here(unets):
    """diffusers' test_stable_diffusion_inpaint_mask_latents: latents for the image and the masked image, drawn
    from the generator in the pipeline's own order, give the pipeline's own image."""
    ours, ref = _pair(unets[9])
    image = ours.image_processor.preprocess(_pil())
    mask = ours.mask_processor.preprocess(_mask())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        image_latents = ours.vae.encode(image).latent_dist.sample(generator) * ours.vae.config.scaling_factor
        after_image = generator.get_state()
        torch.randn(1, 4, 8, 8, generator=generator)  # the pipeline's noise draw
        masked = ours.vae.encode(image * (mask < 0.5)).latent_dist.sample(generator) * ours.vae.config.scaling_factor
    plain = _run(ours, strength=0.9)
    by_latents = {"image": image_latents, "mask_image": mask, "masked_image_latents": masked, "strength": 0.9,
                  "output_type": "np", "num_inference_steps": 6, "guidance_scale": 3.0}
    a = ours(PROMPTS[0], generator=torch.Generator().set_state(after_image), **by_latents).images
    b = ref(PROMPTS[0], generator=torch.Generator().set_state(after_image), **by_latents).images
    np.testing.assert_allclose(a, plain, atol=ATOL, rtol=0)
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def test_plain_unet_keeps_the_image_latents_outside_the_mask(unets):
    """Blending: after the last step, outside the (latent-size) mask the latents are the init image's (the first
    draw of the generator), inside they are the model's."""
    ours, _ = _pair(unets[4])
    latents = _run(ours, output_type="latent", strength=1.0)
    with torch.no_grad():
        image = ours.image_processor.preprocess(_pil())
        init = ours.vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(0)) * 0.18215
    keep = F.interpolate(ours.mask_processor.preprocess(_mask()), size=(8, 8)) < 0.5
    keep = keep.expand_as(latents)
    torch.testing.assert_close(latents[keep], init[keep], rtol=0, atol=1e-6)
    assert (latents[~keep] - init[~keep]).abs().mean() > 0.1


@pytest.mark.parametrize("channels", [4, 9])
def test_callback_gets_mask_and_masked_image_latents_and_its_edits_count(unets, channels):
    ours, ref = _pair(unets[channels])
    shapes = []

    def edit(pipe, i, t, kw):
        shapes.append((tuple(kw["mask"].shape), tuple(kw["masked_image_latents"].shape)))
        return {"mask": kw["mask"].flip(-1), "masked_image_latents": kw["masked_image_latents"] * 0} if i == 1 else kw

    images = _same(ours, ref, callback_on_step_end=edit,
                   callback_on_step_end_tensor_inputs=["latents", "mask", "masked_image_latents"])
    assert shapes[0] == ((2, 1, 8, 8), (2, 4, 8, 8))  # doubled under guidance, as diffusers
    assert np.abs(images - _run(ours)).max() > 1e-3


def test_cfg_cutoff_callback_with_an_inpainting_unet_equals_the_unguided_rest(unets):
    """diffusers' SDCFGCutoffCallback halves the batch mid-call (diffusers' own inpaint pipeline then fails on
    its doubled mask): the steps after the cutoff equal an unguided run of the rest of the schedule from the
    latents at the cutoff."""
    ours, _ = _pair(unets[9])
    masked = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # no random draw but the noise
    kw = {"masked_image_latents": masked, "output_type": "np"}
    saved = []

    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=3)

    def keep_then_cut(pipe, i, t, tensors):
        if i == 3:
            saved.append(tensors["latents"].clone())
        return cutoff(pipe, i, t, tensors)

    images = _run(ours, callback_on_step_end=keep_then_cut,
                  callback_on_step_end_tensor_inputs=["latents", *cutoff.tensor_inputs], **kw)
    assert ours.guidance_scale == 0.0
    rest = ours.scheduler.timesteps[4:].tolist()
    unguided = _run(ours, latents=saved[0], num_inference_steps=None, timesteps=rest, guidance_scale=1.0, **kw)
    np.testing.assert_allclose(images, unguided, atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [4, 9])
def test_one_image_and_mask_per_prompt_stay_with_their_prompt(unets, channels):
    """As in img2img: each prompt's images equal the prompt run alone with its image and mask (diffusers tiles
    the batch and pairs prompt 1 with image 2 when both counts exceed 1: our deliberate difference). Latents in,
    so that no random draw depends on the batch."""
    ours, _ = _pair(unets[channels])
    draw = lambda n, seed: torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    noise, image = draw(4, 0), draw(2, 1)
    masks = [_mask(), _mask(box=(0, 32, 0, 64))]
    kw = {"num_inference_steps": 4, "output_type": "np", "num_images_per_prompt": 2}

    def run(prompt, rows, per_image):
        return ours(prompt, image=image[rows], mask_image=masks[rows] if per_image else masks[rows.start],
                    masked_image_latents=image[rows] * 0.5, latents=noise[2 * rows.start:2 * rows.stop], **kw).images

    batch = run(PROMPTS, slice(0, 2), True)
    alone = [run(PROMPTS[i], slice(i, i + 1), False) for i in (0, 1)]
    np.testing.assert_allclose(batch, np.concatenate(alone), atol=ATOL, rtol=0)


# ---- diffusers' fast tests, ported ---------------------------------------------------------------------
def test_diffusers_inpaint_default_and_return_dict_false(unets):
    ours, ref = _pair(unets[9], "PLMS")
    images = _same(ours, ref, guidance_scale=6.0, num_inference_steps=2)
    as_tuple = ours(PROMPTS[0], image=_pil(), mask_image=_mask(), guidance_scale=6.0, num_inference_steps=2,
                    output_type="np", generator=torch.Generator().manual_seed(0), return_dict=False)[0]
    np.testing.assert_array_equal(images, as_tuple)


@pytest.mark.parametrize("prompts,per_prompt", [(1, 2), (2, 2)])
def test_diffusers_num_images_per_prompt_shapes(unets, prompts, per_prompt):
    ours, _ = _pair(unets[9])
    images = _run(ours, prompt=PROMPTS[:prompts], num_images_per_prompt=per_prompt, num_inference_steps=2)
    assert images.shape == (prompts * per_prompt, 64, 64, 3)


def test_diffusers_interrupt_stops_at_the_step_it_is_set(unets):
    ours, _ = _pair(unets[4])
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
    ours = list(inspect.signature(LatentDiffusionInpaintPipeline.__call__).parameters)
    theirs = [p for p in inspect.signature(diffusers.StableDiffusionInpaintPipeline.__call__).parameters
              if p != "kwargs"]
    assert ours[:len(theirs)] == theirs
    assert LatentDiffusionInpaintPipeline._callback_tensor_inputs == \
        diffusers.StableDiffusionInpaintPipeline._callback_tensor_inputs


# ---- loading ------------------------------------------------------------------------------------------
def test_a_text_to_image_folder_loads_and_equals_diffusers(tiny_model_dir):
    ours = LatentDiffusionInpaintPipeline.from_pretrained(tiny_model_dir)
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                                   requires_safety_checker=False)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    _same(ours, ref, strength=0.7)


def test_an_inpainting_folder_round_trips_with_diffusers(unets, tmp_path):
    ours, _ = _pair(unets[9])
    ours.save_pretrained(tmp_path)
    ref = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(ref) is diffusers.StableDiffusionInpaintPipeline and ref.unet.config.in_channels == 9
    ref.set_progress_bar_config(disable=True)
    _same(ours, ref)
    again = LatentDiffusionInpaintPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    _same(again, ref)


def test_from_pipe_shares_the_components_of_a_text_to_image_pipeline(unets):
    t2i = LatentDiffusionPipeline(**copy.deepcopy(unets[4]).as_dict())
    inpaint = LatentDiffusionInpaintPipeline.from_pipe(t2i)
    assert all(getattr(inpaint, k) is getattr(t2i, k) for k in ("unet", "vae", "text_encoder", "scheduler"))


# ---- bad input ----------------------------------------------------------------------------------------
BAD_CALLS = [
    ({"strength": 1.2}, ValueError, r"`strength` must be in \[0, 1\]"),
    ({"strength": 0.1, "num_inference_steps": 5}, ValueError, "leaves no denoising step"),
    ({"image": None}, ValueError, "`image` is required"),
    ({"mask_image": None}, ValueError, "`mask_image` is required"),
    ({"prompt": PROMPTS, "mask_image": [_mask()] * 3}, ValueError, "got 3 masks for 2 images"),
    ({"masked_image_latents": torch.zeros(1, 4, 4, 4)}, ValueError, "`masked_image_latents` are"),
    ({"image": _image(), "padding_mask_crop": 4}, ValueError, "`padding_mask_crop` needs"),
    ({"padding_mask_crop": 4, "output_type": "np"}, ValueError, "output_type='pil'"),
    ({"height": 60}, ValueError, "divisible by 8"),
    ({"latents": torch.zeros(1, 4, 4, 4)}, ValueError, "`latents` has shape"),
    ({"callback_steps": 1}, TypeError, "callback_on_step_end"),
]


@pytest.mark.parametrize("kw,error,message", BAD_CALLS, ids=[m for *_, m in BAD_CALLS])
def test_bad_input_is_an_error_that_says_what_to_change(unets, kw, error, message):
    ours, _ = _pair(unets[9])
    kw = {"prompt": PROMPTS[0], "image": _pil(), "mask_image": _mask(), "num_inference_steps": 2,
          "output_type": "np", **kw}
    with pytest.raises(error, match=message):
        ours(**kw)


def test_a_unet_with_other_input_channels_is_refused(unets):
    ours, _ = _pair(_components(5))
    with pytest.raises(ValueError, match="5 input channels: inpainting needs a plain UNet"):
        _run(ours)


# ---- the command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [4, 9])
def test_cli_init_image_and_mask_equal_the_library_and_diffusers(unets, tiny_model_dir, tmp_path, channels):
    from latentsd.cli import main

    model = tiny_model_dir
    if channels == 9:
        model = tmp_path / "inpainting-model"
        _pair(unets[9])[0].save_pretrained(model)
    init, mask = _pil(size=(48, 80)), _mask(size=(48, 80), box=(8, 40, 16, 56))
    init.save(tmp_path / "init.png")
    mask.convert("RGB").save(tmp_path / "mask.png")  # any mode: read as grayscale
    out = tmp_path / "cli.png"
    assert main(["generate", PROMPTS[0], "--model", str(model), "--steps", "4", "--guidance", "2", "--seed", "0",
                 "--device", "cpu", "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                 "--strength", "0.9", "--out", str(out)]) == 0
    pixels = np.asarray(PIL.Image.open(out), dtype=np.int16)
    assert pixels.shape == (48, 80, 3)  # the init image's size
    call = {"image": init, "mask_image": mask, "height": 48, "width": 80, "strength": 0.9, "num_inference_steps": 4,
            "guidance_scale": 2.0}
    ours = LatentDiffusionInpaintPipeline.from_pretrained(model)
    ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(model, safety_checker=None,
                                                                   requires_safety_checker=False)
    for pipe in (ours, ref):
        image = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **call).images[0]
        assert np.abs(np.asarray(image, dtype=np.int16) - pixels).max() <= 1  # uint8 rounding


def test_cli_missing_mask_exits_2_before_the_model_loads(tmp_path, capsys):
    from latentsd.cli import main

    _pil().save(tmp_path / "init.png")
    code = main(["generate", "x", "--model", str(tmp_path / "never-read"), "--init-image", str(tmp_path / "init.png"),
                 "--mask", str(tmp_path / "mask.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--mask" in err and "mask.png does not exist" in err and "Traceback" not in err
