"""Load a model folder and generate images to a file: what `latentsd generate` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MODEL_SCHEDULER = "model"  # --scheduler default: the folder's own scheduler; else a name from samplers.SAMPLERS


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model: str, scheduler: str = "model", device: str | None = None,
                  dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """A ``LatentDiffusionPipeline`` from a diffusers-layout folder / hub id, with the chosen scheduler.

    ``scheduler``: ``"model"`` (the folder's own) or a sampler name (``"Euler a"``, ``"DPM++ 2M Karras"``, ``"ddim"``
    ...: ``latentsd.samplers``), built from the folder's scheduler config.
    ``model`` may also be an LDM single file (``.safetensors``; pickles only with ``allow_pickle``). Folders are
    read from safetensors too; ``allow_pickle`` also admits their ``.bin`` weights (``weights_only=True``).
    """
    from .paths import expand
    from .pipeline import LatentDiffusionPipeline
    from .samplers import check_requirements, make_scheduler
    from .single_file import is_single_file

    own = scheduler.lower() == MODEL_SCHEDULER
    if not own:
        check_requirements(scheduler)  # an unknown name or a missing package fails before the model loads
    model = expand(model)
    if is_single_file(model):
        pipe = LatentDiffusionPipeline.from_single_file(model, dtype=dtype, allow_pickle=allow_pickle)
    else:
        pipe = LatentDiffusionPipeline.from_pretrained(model, dtype=dtype, allow_pickle=allow_pickle)
    if not own:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe.to(device or default_device())


def add_lora_and_embeddings(pipe, lora: str | None = None, lora_scale: float = 1.0,
                            embeddings: list[str] = (), embedding_tokens: list[str] = ()) -> list[str]:
    """Load a LoRA at ``lora_scale`` and textual-inversion embeddings into ``pipe``; returns the new tokens.

    ``lora``: a diffusers/PEFT folder or file, or a kohya/A1111 ``.safetensors`` (``load_lora_weights``); the
    scale is the adapter weight (``set_adapters``), which equals diffusers' ``cross_attention_kwargs={"scale": s}``.
    ``embedding_tokens``: none (each file names its token) or one per embedding.
    """
    if lora is None and lora_scale != 1.0:
        raise ValueError("--lora-scale needs --lora PATH")
    if embedding_tokens and len(embedding_tokens) != len(embeddings):
        raise ValueError(f"got {len(embedding_tokens)} --embedding-token for {len(embeddings)} --embedding: "
                         "pass none (each file names its token) or one per embedding")
    if lora is not None:
        from .loaders import load_lora_into_pipeline

        load_lora_into_pipeline(pipe, lora, scale=lora_scale)
    return [load_embedding(pipe, path, token) for path, token in
            zip(embeddings, list(embedding_tokens) or [None] * len(embeddings))]


def load_embedding(pipe, path: str | Path, token: str | None = None) -> str:
    """Add a textual-inversion embedding (one or more vectors) to ``pipe``'s tokenizer and text encoder.

    Formats: diffusers (``{"<token>": [n, D]}`` in a ``.safetensors`` / ``.bin`` file, or a folder with
    ``learned_embeds.safetensors``) and A1111 (``emb_params`` in a ``.safetensors``, whose token is the file
    name as in A1111; ``string_to_param`` in a ``.pt``). ``token`` overrides the file's. Returns the token.
    """
    path = Path(path)
    usage = "pass a textual-inversion .safetensors / .bin / .pt file or a folder with learned_embeds.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"embedding {path} does not exist: {usage}")
    if path.is_dir() and not any((path / f"learned_embeds.{ext}").is_file() for ext in ("safetensors", "bin")):
        raise FileNotFoundError(f"{path} has no learned_embeds.safetensors or learned_embeds.bin: {usage}")
    if path.is_file() and path.suffix not in (".safetensors", ".bin", ".pt"):
        raise ValueError(f"{path} is not an embedding file: {usage}")
    if token is None and path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            token = path.stem if list(f.keys()) == ["emb_params"] else None
    vocab = set(pipe.tokenizer.get_vocab())
    pipe.load_textual_inversion(str(path), token=token)
    added = sorted(set(pipe.tokenizer.get_vocab()) - vocab, key=pipe.tokenizer.convert_tokens_to_ids)
    return added[0]


def load_image(path: str | Path, what: str = "--init-image", mode: str = "RGB"):
    """A PIL image from a file, or an error naming the flag and the file."""
    import PIL.Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist: pass an image file (PNG, JPEG, WebP, ...)")
    try:
        with PIL.Image.open(path) as image:
            return image.convert(mode)
    except OSError as err:  # PIL.UnidentifiedImageError, truncated files
        raise ValueError(f"{what} {path} is not a readable image ({err}): pass a PNG, JPEG, WebP, ...") from None


def load_init_images(init_image: str | None = None, mask: str | None = None, strength: float | None = None) -> dict:
    """``generate_to_file``'s image arguments from ``--init-image`` / ``--mask`` / ``--strength``, checked and read
    before any model loads."""
    if init_image is None:
        if mask is not None or strength is not None:
            raise ValueError(f"{'--mask' if mask is not None else '--strength'} needs --init-image PATH")
        return {}
    return {"init_image": load_image(init_image), "strength": strength,
            "mask": None if mask is None else load_image(mask, "--mask", "L")}


def image_pipeline(pipe, init_image=None, mask=None, strength: float | None = None, height: int | None = None,
                   width: int | None = None) -> tuple[Any, dict]:
    """``pipe`` and its size arguments (no init image), or an image-to-image (init image) / inpainting (and a mask)
    pipeline over ``pipe``'s components (the same objects: LoRA and embeddings stay), with its image arguments.
    The output has the init image's size (rounded down to a multiple of 8) unless ``height`` / ``width`` say
    otherwise."""
    if init_image is None:
        return pipe, {"height": height, "width": width}
    from .img2img import LatentDiffusionImg2ImgPipeline
    from .inpaint import LatentDiffusionInpaintPipeline

    f = pipe.vae_scale_factor
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and value % f:
            lower = value - value % f
            raise ValueError(f"{name} {value} must be divisible by {f}: use {lower} or {lower + f}")
    kw = {} if strength is None else {"strength": strength}
    if mask is None:
        if (height or init_image.height, width or init_image.width) != (init_image.height, init_image.width):
            init_image = pipe.image_processor.resize(init_image, height or init_image.height, width or init_image.width)
        return LatentDiffusionImg2ImgPipeline(**pipe.components), {"image": init_image, **kw}
    height, width = pipe.image_processor.get_default_height_width(init_image, height, width)
    return LatentDiffusionInpaintPipeline(**pipe.components), {"image": init_image, "mask_image": mask,
                                                               "height": height, "width": width, **kw}


def generate_to_file(pipe, prompt: str, out: str | Path, negative_prompt: str | None = None,
                     steps: int = 50, guidance: float = 7.5, seed: int = 0, num_images: int = 1,
                     height: int | None = None, width: int | None = None, eta: float = 0.0,
                     long_prompts: bool = False, prompt_weighting: bool = False, init_image=None, mask=None,
                     strength: float | None = None, fast: bool = False) -> Path:
    """Generate ``num_images`` for one prompt with a seeded generator and save them (a grid when > 1).

    ``long_prompts``: 75-token chunks instead of diffusers' 77-token truncation; ``prompt_weighting``: A1111
    ``(word:1.3)`` weights (both: ``LatentDiffusionPipeline.__call__``). ``init_image`` (PIL) starts from that
    image (``strength``: default 0.8), ``mask`` (PIL, white = repaint) inpaints it (default strength 1): see
    :func:`image_pipeline`. ``fast``: ``pipe.optimize()`` first (:mod:`latentsd.fast`; after LoRA and embeddings)."""
    from .images import save_images
    from .samplers import check_steps

    check_steps(pipe.scheduler, steps)
    pipe, image_kw = image_pipeline(pipe, init_image, mask, strength, height, width)
    pipe = pipe.optimize() if fast else pipe
    generator = torch.Generator(pipe.device).manual_seed(seed)
    images = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                  num_images_per_prompt=num_images, generator=generator, eta=eta, long_prompts=long_prompts,
                  prompt_weighting=prompt_weighting, **image_kw).images
    check_finite_images(pipe, len(images), out)
    return save_images(images, [prompt] * len(images), out)


def check_finite_images(pipe, count: int, out: str | Path) -> None:
    """An error, before anything is saved, when the last call of ``pipe`` made images with NaN/inf pixels (they
    would be saved black), naming the components whose weights are NaN/inf."""
    bad = pipe.nonfinite_images
    if not bad:
        return
    broken = [name for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)
              and any(not torch.isfinite(p).all() for p in part.parameters())]
    why = (f"the {' and '.join(broken)} weights are NaN/inf: the model is broken (a diverged training run?), "
           "use another checkpoint" if broken else "the weights are finite, so the computation overflowed "
           "(fp16 weights? load them in fp32)")
    raise ValueError(f"{len(bad)} of {count} images have NaN/inf pixels (they would be black), so nothing was "
                     f"saved to {out}: {why}")
