"""Any folder latentsd writes or ships, or diffusers writes, loads in any dtype and generates.

transformers 5 loads the text encoder in its saved dtype while diffusers loads the UNet and VAE in
fp32 unless told otherwise, so one pipeline can hold several dtypes: the conditioning and the
latents follow the UNet's.
"""

import diffusers
import numpy as np
import pytest
import torch

from latentsd import LatentDiffusionPipeline
from latentsd.models import build_components

SHIPPED = "latentsd/assets/shapes_base"  # fp16 on disk
DTYPES = {"none": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # CPU runs all


@pytest.fixture(scope="module")
def folders(tmp_path_factory, request):
    """The three kinds of folder: shipped, mixed dtypes (a bf16 run exported before the fix), diffusers-written."""
    root = tmp_path_factory.mktemp("dtype_folders")
    parts = build_components("tiny", seed=0)
    diffusers.StableDiffusionPipeline(**parts.as_dict(), safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(root / "diffusers")
    parts.text_encoder.half()  # text encoder fp16, UNet and VAE fp32
    LatentDiffusionPipeline(**parts.as_dict()).save_pretrained(root / "mixed")
    return {"shipped": request.config.rootpath / SHIPPED, "mixed": root / "mixed", "diffusers": root / "diffusers"}


def _generate(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on the left", negative_prompt="blurry", num_inference_steps=2, guidance_scale=2.0,
                height=32, width=32, generator=torch.Generator().manual_seed(0), **kw).images


@pytest.fixture(scope="module")
def fp32_images(folders):
    return {name: _generate(LatentDiffusionPipeline.from_pretrained(path, dtype=torch.float32), output_type="np")
            for name, path in folders.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("folder", ["shipped", "mixed", "diffusers"])
def test_every_folder_loads_in_every_dtype_and_generates(folders, fp32_images, folder, dtype):
    pipe = LatentDiffusionPipeline.from_pretrained(folders[folder], dtype=DTYPES[dtype])
    latents = _generate(pipe, output_type="latent")
    assert latents.dtype == pipe.unet.dtype and latents.shape == (1, 4, 4, 4)
    images = _generate(pipe, output_type="np")
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    # lower precision changes the numbers a little, not the picture
    diff = np.abs(images - fp32_images[folder])
    assert diff.mean() < 0.01 and diff.max() < 0.1, (diff.mean(), diff.max())
    if {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}:
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folders[folder], dtype=DTYPES[dtype])
        np.testing.assert_allclose(images, _generate(ref, output_type="np"), atol=1e-4, rtol=0)
