"""latentsd: a small, fast, readable toolkit for Stable-Diffusion-style text-to-image latent diffusion."""

__version__ = "0.1.0"

# Lazy exports: `import latentsd` stays cheap (the CLI's --help does not import torch or diffusers).
_EXPORTS = {
    "DDPMScheduler": "latentsd.schedulers",
    "DDIMScheduler": "latentsd.schedulers",
    "LatentDiffusionPipeline": "latentsd.pipeline",
    "LatentDiffusionImg2ImgPipeline": "latentsd.img2img",
    "LatentDiffusionInpaintPipeline": "latentsd.inpaint",
    "PromptEncoder": "latentsd.text",
    "build_components": "latentsd.models",
    "load_components": "latentsd.models",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'latentsd' has no attribute {name!r}")
