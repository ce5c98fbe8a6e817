"""diffusers' Stable Diffusion fast tests, ported to ``LatentDiffusionPipeline``.

Each compares our pipeline with diffusers' ``StableDiffusionPipeline`` on the same tiny components, scheduler
and seed (≤1e-4, fp32 CPU), where diffusers' own test compared with hard-coded slices or with itself.
"""

import copy
import inspect
import logging

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.models.attention_processor import IPAdapterAttnProcessor
from diffusers.models.embeddings import ImageProjection
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from latentsd import DDIMScheduler, DDPMScheduler, LatentDiffusionPipeline, PromptEncoder
from latentsd.models import build_components, load_model_config

PROMPT = "a red circle on the left"
ATOL = 1e-4


@pytest.fixture(scope="module")
def base():
    """Module-own tiny components: tests that change a part copy them first."""
    return build_components("tiny", seed=0)


def _parts(base, **unet_config):
    """A deep copy of ``base``, or fresh parts whose UNet config has ``unet_config`` changed."""
    if not unet_config:
        return copy.deepcopy(base).as_dict()
    cfg = load_model_config("tiny")
    cfg["unet"].update(unet_config)
    return build_components(cfg, seed=0).as_dict()


def _pair(parts, scheduler=None, **optional):
    """Our pipeline and diffusers' over the same component objects."""
    parts = {**parts, "scheduler": scheduler or parts["scheduler"]}
    optional = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False, **optional}
    ours = LatentDiffusionPipeline(**parts, **optional)
    ref = diffusers.StableDiffusionPipeline(**parts, **optional)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def _run(pipe, **kw):
    kw = {"prompt": PROMPT, "num_inference_steps": 3, "guidance_scale": 6.0, "output_type": "np", **kw}
    return pipe(generator=torch.Generator().manual_seed(0), **kw)


def _same(ours, ref, **kw):
    a, b = _run(ours, **kw).images, _run(ref, **kw).images
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
    return a


# ---- the interface ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["__call__", "encode_prompt", "prepare_latents", "check_inputs", "__init__"])
def test_signatures_start_with_diffusers_arguments_in_diffusers_order(method):
    """Positional calls written for StableDiffusionPipeline mean the same here; our additions come after."""
    theirs = [p for p in inspect.signature(getattr(diffusers.StableDiffusionPipeline, method)).parameters.values()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    ours = list(inspect.signature(getattr(LatentDiffusionPipeline, method)).parameters)
    assert ours[:len(theirs)] == [p.name for p in theirs]


def test_every_public_diffusers_method_and_attribute_exists():
    deliberately_absent = {"decode_latents"}  # deprecated in diffusers (VaeImageProcessor.postprocess instead)
    missing = {name for name in dir(diffusers.StableDiffusionPipeline)
               if not name.startswith("__") and not hasattr(LatentDiffusionPipeline, name)}
    missing -= {"from_single_file", "_encode_prompt"}  # helper-owned single-file loader; diffusers' deprecated alias
    assert missing <= deliberately_absent, sorted(missing)
    assert LatentDiffusionPipeline._optional_components == diffusers.StableDiffusionPipeline._optional_components
    assert LatentDiffusionPipeline._callback_tensor_inputs == diffusers.StableDiffusionPipeline._callback_tensor_inputs


PROPERTIES = ["guidance_scale", "guidance_rescale", "clip_skip", "do_classifier_free_guidance",
              "cross_attention_kwargs", "num_timesteps", "interrupt"]


def test_properties_read_in_a_callback_equal_diffusers(base):
    ours, ref = _pair(_parts(base))
    seen = {}

    def record(pipe, i, t, kw):
        seen.setdefault(type(pipe).__name__, []).append({name: getattr(pipe, name) for name in PROPERTIES})
        return kw

    kw = {"guidance_scale": 3.5, "guidance_rescale": 0.3, "cross_attention_kwargs": {"scale": 1.0},
          "callback_on_step_end": record}
    _same(ours, ref, **kw)
    assert seen["LatentDiffusionPipeline"] == seen["StableDiffusionPipeline"]
    assert seen["StableDiffusionPipeline"][0]["num_timesteps"] == 3


def test_encode_prompt_has_diffusers_signature_and_return_value(base):
    ours, ref = _pair(_parts(base))
    for args in [(PROMPT, "cpu", 2, True, "blurry"), ([PROMPT, "a blue square"], "cpu", 1, True),
                 (PROMPT, "cpu", 3, False)]:
        got, expected = ours.encode_prompt(*args), ref.encode_prompt(*args)
        assert len(got) == 2
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        if args[3]:
            torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
        else:
            assert got[1] is None and expected[1] is None


def test_encode_prompt_output_fed_back_gives_the_same_images(base):
    """diffusers' test_encode_prompt_works_in_isolation."""
    ours, _ = _pair(_parts(base))
    embeds, negative = ours.encode_prompt(PROMPT, "cpu", 1, True, "blurry")
    expected = _run(ours, negative_prompt="blurry").images
    got = _run(ours, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative).images
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_prompts_over_77_tokens_are_truncated_with_diffusers_warning(base, caplog):
    ours, ref = _pair(_parts(base))
    long_prompt = "a red circle " + "and a blue square " * 30
    with caplog.at_level(logging.WARNING):
        _same(ours, ref, prompt=long_prompt, num_inference_steps=2)
    assert "The following part of your input was truncated because CLIP can only handle sequences up to 77" \
        in caplog.text


# ---- schedules ----------------------------------------------------------------------------------------
def test_ays_timesteps_and_sigmas_equal_diffusers(base):
    """diffusers' test_stable_diffusion_ays: custom AYS schedules through `timesteps=` and `sigmas=`."""
    from diffusers.schedulers import AysSchedules

    parts = _parts(base)
    ours, ref = _pair(parts, diffusers.EulerDiscreteScheduler.from_config(parts["scheduler"].config))
    by_steps = _same(ours, ref, num_inference_steps=10)
    by_ts = _same(ours, ref, num_inference_steps=None, timesteps=AysSchedules["StableDiffusionTimesteps"])
    by_sigmas = _same(ours, ref, num_inference_steps=None, sigmas=AysSchedules["StableDiffusionSigmas"])
    assert ours.num_timesteps == len(AysSchedules["StableDiffusionSigmas"]) - 1
    assert np.abs(by_ts - by_sigmas).max() < 1e-3  # the same schedule, two ways
    assert np.abs(by_steps - by_ts).max() > 1e-3


def test_custom_timesteps_with_our_scheduler_equal_diffusers(base):
    parts = _parts(base)
    ours, ref = _pair(parts, DDPMScheduler.from_config(parts["scheduler"].config))
    _same(ours, ref, num_inference_steps=None, timesteps=[901, 601, 301, 1])
    assert ours.scheduler.timesteps.tolist() == [901, 601, 301, 1]


@pytest.mark.parametrize("kw,message", [
    ({"timesteps": [900, 500], "sigmas": [10.0, 1.0, 0.0]}, "Only one of `timesteps` or `sigmas`"),
    ({"sigmas": [10.0, 1.0, 0.0]}, "does not support custom sigmas"),
    ({"num_inference_steps": None}, "num_inference_steps"),
])
def test_bad_schedules_say_what_to_change(base, kw, message):
    ours, _ = _pair(_parts(base), DDIMScheduler.from_config(base.scheduler.config))
    with pytest.raises(ValueError, match=message):
        _run(ours, **kw)


def test_lcm_unet_gets_the_guidance_embedding_as_diffusers(base):
    """diffusers' test_stable_diffusion_lcm(_custom_timesteps): a UNet with time_cond_proj_dim, no CFG batch."""
    parts = _parts(base, time_cond_proj_dim=16)
    ours, ref = _pair(parts, diffusers.LCMScheduler.from_config(parts["scheduler"].config))
    _same(ours, ref, num_inference_steps=2)
    _same(ours, ref, num_inference_steps=None, timesteps=[999, 499])
    assert not ours.do_classifier_free_guidance


# ---- callbacks and interruption -----------------------------------------------------------------------
def test_callback_gets_the_tensors_asked_for_and_its_edits_are_used(base):
    ours, ref = _pair(_parts(base))
    names = []

    def edit(pipe, i, t, kw):
        names.append(sorted(kw))
        if i == 1:  # prompt_embeds is what the UNet sees: cat([negative, cond])
            kw["prompt_embeds"] = kw["prompt_embeds"] * 0.5
            kw["latents"] = kw["latents"] * 0.9
        return kw

    inputs = {"callback_on_step_end": edit, "callback_on_step_end_tensor_inputs": ours._callback_tensor_inputs,
              "negative_prompt": "blurry"}
    edited = _same(ours, ref, **inputs)
    assert names[0] == sorted(ours._callback_tensor_inputs) and names[0] == names[3]
    assert np.abs(edited - _run(ours, negative_prompt="blurry").images).max() > 1e-3
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _run(ours, callback_on_step_end=edit, callback_on_step_end_tensor_inputs=["latents", "noise_pred"])


def test_callback_may_change_guidance_every_step(base):
    """diffusers' test_callback_cfg: the loop reads the guidance scale each step."""
    ours, ref = _pair(_parts(base))

    def increase(pipe, i, t, kw):
        pipe._guidance_scale += 1.0
        return kw

    _same(ours, ref, guidance_scale=2.0, callback_on_step_end=increase)
    assert ours.guidance_scale == 2.0 + ours.num_timesteps


def test_diffusers_cfg_cutoff_callback_equals_diffusers(base):
    ours, ref = _pair(_parts(base))
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=0.4)
    images = _same(ours, ref, num_inference_steps=5, callback_on_step_end=cutoff)
    assert ours.guidance_scale == 0.0 and np.abs(images - _run(ours, num_inference_steps=5).images).max() > 1e-3


def test_interrupt_stops_at_the_step_it_is_set(base):
    """diffusers' test_pipeline_interrupt: the interrupted output is the full run's latents at that step."""
    ours, _ = _pair(_parts(base))
    states = []

    def keep(pipe, i, t, kw):
        states.append(kw["latents"].clone())
        return kw

    def stop(pipe, i, t, kw):
        pipe._interrupt = i == 1
        return kw

    _run(ours, output_type="latent", callback_on_step_end=keep)
    interrupted = _run(ours, output_type="latent", callback_on_step_end=stop).images
    torch.testing.assert_close(interrupted, states[1], rtol=0, atol=1e-6)


def test_deprecated_callback_argument_names_its_replacement(base):
    ours, _ = _pair(_parts(base))
    with pytest.raises(TypeError, match="callback_on_step_end"):
        _run(ours, callback=lambda *a: None, callback_steps=1)


# ---- LoRA, textual inversion, IP-Adapter --------------------------------------------------------------
def _add_random_lora(parts):
    from peft import LoraConfig

    torch.manual_seed(1)
    parts["unet"].add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    parts["text_encoder"].add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))


def test_lora_scale_in_cross_attention_kwargs_equals_diffusers(base):
    """The scale reaches the UNet's and the text encoder's LoRA layers (and is undone after the call)."""
    plain = _run(_pair(_parts(base))[0]).images
    parts = _parts(base)
    _add_random_lora(parts)
    ours, ref = _pair(parts)
    half = _same(ours, ref, cross_attention_kwargs={"scale": 0.5})
    full = _same(ours, ref)
    np.testing.assert_allclose(_run(ours, cross_attention_kwargs={"scale": 0.0}).images, plain, atol=1e-5, rtol=0)
    assert np.abs(half - full).max() > 1e-3 and np.abs(half - plain).max() > 1e-3
    np.testing.assert_allclose(_run(ours).images, full, atol=0, rtol=0)  # the scale did not stick


def test_textual_inversion_embedding_equals_diffusers(base):
    parts = _parts(base)
    ours, ref = _pair(parts)
    vectors = torch.randn(2, parts["text_encoder"].config.hidden_size, generator=torch.Generator().manual_seed(2))
    ours.load_textual_inversion({"<star>": vectors}, token="<star>")  # shared tokenizer/text encoder: both see it
    assert ours.maybe_convert_prompt("a <star>", ours.tokenizer) == "a <star> <star>_1"
    _same(ours, ref, prompt="a <star> on the left", negative_prompt="a <star>")


def _ip_adapter_state_dict(unet):
    """A random IP-Adapter for ``unet`` (as diffusers' create_ip_adapter_state_dict builds one)."""
    torch.manual_seed(3)
    dim, adapter, key = unet.config.cross_attention_dim, {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else -1
        channels = unet.config.block_out_channels
        hidden = channels[-1] if block < 0 else (channels[::-1] if name.startswith("up") else channels)[block]
        sd = IPAdapterAttnProcessor(hidden_size=hidden, cross_attention_dim=dim, scale=1.0).state_dict()
        adapter.update({f"{key}.to_k_ip.weight": sd["to_k_ip.0.weight"], f"{key}.to_v_ip.weight": sd["to_v_ip.0.weight"]})
        key += 2
    proj = ImageProjection(cross_attention_dim=dim, image_embed_dim=dim, num_image_text_embeds=4).state_dict()
    image_proj = {"proj.weight": proj["image_embeds.weight"], "proj.bias": proj["image_embeds.bias"],
                  "norm.weight": proj["norm.weight"], "norm.bias": proj["norm.bias"]}
    return {"image_proj": image_proj, "ip_adapter": adapter}


def _image_encoder(dim):
    torch.manual_seed(4)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=dim)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config).eval(), processor


def test_ip_adapter_image_and_image_embeds_equal_diffusers(base):
    parts = _parts(base)
    dim = parts["unet"].config.cross_attention_dim
    encoder, processor = _image_encoder(dim)
    ours, ref = _pair(parts, image_encoder=encoder, feature_extractor=processor)
    ours.unet._load_ip_adapter_weights([_ip_adapter_state_dict(ours.unet)])
    ours.set_ip_adapter_scale(1.0)
    embeds = torch.randn(2, 1, dim, generator=torch.Generator().manual_seed(5))  # [negative; image] under CFG
    with_embeds = _same(ours, ref, ip_adapter_image_embeds=[embeds])
    ours.set_ip_adapter_scale(0.0)
    assert np.abs(with_embeds - _run(ours, ip_adapter_image_embeds=[embeds]).images).max() > 1e-3
    ours.set_ip_adapter_scale(1.0)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    _same(ours, ref, ip_adapter_image=image, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="not both"):
        _run(ours, ip_adapter_image=image, ip_adapter_image_embeds=[embeds])


# ---- diffusers' StableDiffusionMixin and the VAE ------------------------------------------------------
def test_freeu_on_differs_and_off_restores_equal_diffusers(base):
    ours, ref = _pair(_parts(base))
    plain = _run(ours).images
    ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    freeu = _same(ours, ref)
    assert np.abs(freeu - plain).max() > 1e-3
    ours.disable_freeu()
    np.testing.assert_allclose(_run(ours).images, plain, atol=1e-6, rtol=0)


def test_fused_qkv_projections_equal_unfused(base):
    ours, ref = _pair(_parts(base))
    plain = _run(ours).images
    ours.fuse_qkv_projections()
    np.testing.assert_allclose(_same(ours, ref), plain, atol=ATOL, rtol=0)
    ours.unfuse_qkv_projections()
    np.testing.assert_allclose(_run(ours).images, plain, atol=ATOL, rtol=0)


def test_vae_slicing_and_tiling_equal_diffusers(base):
    ours, ref = _pair(_parts(base))
    four = {"prompt": [PROMPT] * 4, "num_inference_steps": 2}
    whole = _run(ours, **four).images
    ours.vae.enable_slicing()
    np.testing.assert_allclose(_same(ours, ref, **four), whole, atol=3e-3, rtol=0)
    ours.vae.disable_slicing()
    ours.vae.enable_tiling()  # tiles of 64 px (the VAE's sample_size): a 128 px image is decoded in tiles
    tiled = _same(ours, ref, height=128, width=128, num_inference_steps=2)
    ours.vae.disable_tiling()
    assert np.abs(tiled - _run(ours, height=128, width=128, num_inference_steps=2).images).max() > 0


# ---- optional components: safety checker, save / load -------------------------------------------------
def _safety_checker(flag_everything: bool):
    torch.manual_seed(6)
    config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 99},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    threshold = -1.0 if flag_everything else 2.0  # a cosine is always > -1 and never > 2
    checker.concept_embeds_weights.data.fill_(threshold)
    checker.special_care_embeds_weights.data.fill_(2.0)
    return checker, CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.mark.parametrize("flag_everything", [True, False], ids=["flagged", "clean"])
def test_a_folder_with_a_safety_checker_loads_and_runs_it_as_diffusers(base, tmp_path, flag_everything):
    checker, processor = _safety_checker(flag_everything)
    ours, _ = _pair(_parts(base), safety_checker=checker, feature_extractor=processor, requires_safety_checker=True)
    ours.save_pretrained(tmp_path)
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.safety_checker) is StableDiffusionSafetyChecker and loaded.config.requires_safety_checker
    for p in (loaded, ref):
        p.set_progress_bar_config(disable=True)
    kw = {"prompt": [PROMPT, "a blue square"]}
    got, expected = _run(loaded, **kw), _run(ref, **kw)
    assert got.nsfw_content_detected == expected.nsfw_content_detected == [flag_everything] * 2
    np.testing.assert_allclose(got.images, expected.images, atol=ATOL, rtol=0)
    assert (got.images == 0).all() == flag_everything  # flagged images are black
    assert _run(loaded, **kw, output_type="latent").nsfw_content_detected is None


def test_optional_components_set_to_none_survive_save_and_load(base, tmp_path):
    """diffusers' test_save_load_optional_components."""
    checker, processor = _safety_checker(False)
    ours, _ = _pair(_parts(base), safety_checker=checker, feature_extractor=processor)
    for name in ours._optional_components:
        setattr(ours, name, None)
    expected = _run(ours)
    ours.save_pretrained(tmp_path)
    for cls in (LatentDiffusionPipeline, diffusers.StableDiffusionPipeline):
        loaded = cls.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert all(getattr(loaded, name) is None for name in ours._optional_components)
        got = _run(loaded)
        assert got.nsfw_content_detected is None
        np.testing.assert_allclose(got.images, expected.images, atol=ATOL, rtol=0)


def test_a_safety_checker_without_its_feature_extractor_is_refused(base):
    with pytest.raises(ValueError, match="feature_extractor"):
        LatentDiffusionPipeline(**_parts(base), safety_checker=_safety_checker(False)[0])


# ---- latentsd's additions: long prompts (masked padding chunks), prompt weighting ---------------------
def test_long_prompts_image_is_the_same_alone_or_batched_with_a_longer_prompt(base):
    ours, _ = _pair(_parts(base), DDIMScheduler.from_config(base.scheduler.config))  # no noise drawn per step
    short, longer = PROMPT, "a blue square at the top " + "with a green border " * 20
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    batched = _run(ours, prompt=[short, longer], latents=latents, long_prompts=True).images
    alone = _run(ours, prompt=short, latents=latents[:1], long_prompts=True).images
    np.testing.assert_allclose(batched[:1], alone, atol=1e-5, rtol=0)
    truncated = _run(ours, prompt=[short, longer], latents=latents).images
    assert np.abs(batched[1] - truncated[1]).max() > 1e-3  # the words past 77 tokens count


def test_prompt_weighting_uses_the_weighted_encoding(base):
    ours, _ = _pair(_parts(base))
    encoder = PromptEncoder(ours.tokenizer, ours.text_encoder)
    weighted = "a (red:1.5) circle on the [left]"
    (embeds, _), (negative, _) = encoder.encode(weighted, weighting=True), encoder.encode("")
    got = _run(ours, prompt=weighted, prompt_weighting=True).images
    np.testing.assert_allclose(got, _run(ours, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
                               .images, atol=1e-6, rtol=0)
    assert np.abs(got - _run(ours, prompt=weighted).images).max() > 1e-3
