"""Load LoRA adapters into a pipeline (generation side: the trainer's exports, diffusers/PEFT or kohya files).

LoRA files (either layout) and DoRA in the PEFT layout go through diffusers' ``load_lora_weights``; DoRA in the
kohya/LyCORIS layout (``dora_scale``, which diffusers drops), LoHa and LoKr through peft
(:func:`latentsd.adapter_formats.load_adapter_file`). Either way the adapter is a peft adapter of the UNet (and
text encoder), so ``set_adapters``, ``fuse_lora`` and ``unfuse_lora`` work on it.
"""

from __future__ import annotations

from pathlib import Path

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


def resolve_lora_path(path: str | Path) -> tuple[Path, str]:
    """(folder, weight file name) for ``load_lora_weights``: a folder holding pytorch_lora_weights.safetensors
    (an ``export_lora`` folder), or a single ``.safetensors`` file (kohya/A1111 or diffusers format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA weights {path} do not exist: pass a folder with {DIFFUSERS_WEIGHT_NAME} "
                                "(a training run's lora/ folder) or a .safetensors LoRA file")
    if path.is_dir():
        if (path / DIFFUSERS_WEIGHT_NAME).is_file():
            return path, DIFFUSERS_WEIGHT_NAME
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if len(found) == 1:  # a folder with one LoRA file, e.g. just a kohya export
            return path, found[0]
        raise FileNotFoundError(f"{path} has no {DIFFUSERS_WEIGHT_NAME}" + (
            f" and several .safetensors files {found}: pass the file itself" if found else " and no .safetensors file"))
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a LoRA file: expected a .safetensors file or a folder with "
                         f"{DIFFUSERS_WEIGHT_NAME}")
    return path.parent, path.name


def load_lora_into_pipeline(pipe, path: str | Path, fuse: bool = False, scale: float = 1.0,
                            adapter_name: str | None = None) -> str:
    """Load an exported LoRA / DoRA / LoHa / LoKr (either layout) into a pipeline; returns the adapter name.

    ``fuse=True`` merges it into the base weights (``fuse_lora(lora_scale=scale)``): no adapter cost at
    inference, undo with ``pipe.unfuse_lora()``. Otherwise ``scale`` is set as the adapter weight.
    Works for our ``LatentDiffusionPipeline`` and diffusers' ``StableDiffusionPipeline``.
    """
    from diffusers.utils.peft_utils import get_adapter_name

    from .adapter_formats import diffusers_loads, load_adapter_file, read_adapter_file

    folder, weight_name = resolve_lora_path(path)
    adapter_name = adapter_name or get_adapter_name(pipe.unet)
    tensors, _ = read_adapter_file(folder / weight_name)
    if diffusers_loads(tensors):
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter_name)
    else:
        load_adapter_file(pipe, folder / weight_name, adapter_name)
    if fuse:
        pipe.fuse_lora(lora_scale=scale, adapter_names=[adapter_name])
    elif scale != 1.0:
        pipe.set_adapters([adapter_name], adapter_weights=[scale])
    return adapter_name
