"""DreamBooth with prior preservation (``dreambooth.*``): instance images learn an identifier while class images
that the base model generated keep the class prompt's meaning.

The trainer calls three small pieces and never branches on the config (:func:`make_dreambooth` gives a no-op
object when ``dreambooth.enabled`` is false):

- at start, before anything is trained or cast, :func:`ensure_class_images` makes ``num_class_images`` images of the
  class prompt(s) with the base model (our pipeline, DDIM), once: they are cached in ``class_data_dir/<key>/``, the
  key a hash of the base model's weights (:mod:`latentsd.data.fingerprints`), the prompts and the generation
  settings, so another run with the same model and prompt reuses them and a changed model or prompt gets its own
  folder. Image ``i`` has its own generator (``class_seed * 1_000_003 + i``), so asking for more images generates
  only the new ones;
- :meth:`DreamBooth.instance_dataset`: ``data.dataset``, captioned ``instance_prompt`` when that is set;
- :meth:`DreamBooth.add_class_images`: each instance sample ``i`` is paired with class sample
  ``(i + epoch * n_instance) % n_class`` (a pure function of the epoch and the index: exact resume), and
  :class:`PairCollate` puts the instance half then the class half into one batch, with per-sample loss weights
  (:func:`prior_loss_weights`) that make the batch loss ``instance MSE + prior_loss_weight x class MSE``, both
  halves in one UNet call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from ..io import write_file_atomically, write_json_atomically, write_text_atomically

logger = logging.getLogger(__name__)

CLASS_IMAGES_FORMAT = 1  # bump when the generation code changes what the images are
PROMPT_COLUMN = "dreambooth_prompt"
SEED_STRIDE = 1_000_003


# ---- class images ---------------------------------------------------------------------------------
def class_image_name(i: int) -> str:
    return f"{i:06d}.png"


def class_image_seed(class_seed: int, i: int) -> int:
    return class_seed * SEED_STRIDE + i


def class_image_key(parts, db_cfg, resolution: int) -> str:
    """sha256 of everything a class image depends on: the base model's weights and configs, the prompts (in
    order), steps, guidance, seed and resolution. Not ``num_class_images``: image ``i`` does not depend on it."""
    from ..data.fingerprints import _config_dict, module_fingerprint, tokenizer_fingerprint

    payload = {
        "format": CLASS_IMAGES_FORMAT, "prompts": db_cfg.class_prompts, "steps": db_cfg.class_steps,
        "guidance": db_cfg.class_guidance, "seed": db_cfg.class_seed, "resolution": resolution,
        "unet": module_fingerprint(parts.unet), "vae": module_fingerprint(parts.vae),
        "text_encoder": module_fingerprint(parts.text_encoder), "tokenizer": tokenizer_fingerprint(parts.tokenizer),
        "configs": [_config_dict(m) for m in (parts.unet, parts.vae, parts.text_encoder, parts.scheduler)],
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def class_pipeline(parts, device):
    """The base model as a pipeline sampling with DDIM (the trainer's validation sampler) on ``device``."""
    from ..pipeline import LatentDiffusionPipeline
    from ..schedulers import DDIMScheduler

    pipe = LatentDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=DDIMScheduler.from_config(parts.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate_class_images(pipe, db_cfg, indices: list[int], resolution: int):
    """Yield ``(i, PIL image)`` for each index: class prompt ``i % len(prompts)``, its own seeded generator."""
    prompts, size = db_cfg.class_prompts, db_cfg.class_batch_size
    for start in range(0, len(indices), size):
        batch = indices[start:start + size]
        generators = [torch.Generator(pipe.device).manual_seed(class_image_seed(db_cfg.class_seed, i)) for i in batch]
        images = pipe([prompts[i % len(prompts)] for i in batch], height=resolution, width=resolution,
                      num_inference_steps=db_cfg.class_steps, guidance_scale=db_cfg.class_guidance,
                      generator=generators).images
        if pipe.nonfinite_images:  # they would be saved black and trained as the class
            raise ValueError(f"class images {[batch[i] for i in pipe.nonfinite_images]} came out NaN/inf: the base "
                             "model is broken or overflows in its dtype (load it in fp32)")
        yield from zip(batch, images)


def ensure_class_images(parts, db_cfg, resolution: int, root: str | Path, acc=None) -> tuple[Path, int]:
    """The folder holding class images ``0 .. num_class_images - 1`` for this base model, prompts and settings,
    generating (each process its share) only the missing ones; returns ``(folder, how many were generated)``."""
    folder = Path(root) / class_image_key(parts, db_cfg, resolution)[:16]
    n = db_cfg.num_class_images
    missing = [i for i in range(n) if not (folder / class_image_name(i)).is_file()]
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    mine = missing[rank::world]
    if mine:
        pipe = class_pipeline(parts, acc.device if acc is not None else parts.unet.device)
        for i, image in generate_class_images(pipe, db_cfg, mine, resolution):
            write_file_atomically(folder / class_image_name(i), lambda tmp, im=image: im.save(tmp, format="PNG"))
    if acc is not None:
        acc.wait_for_everyone()
    if rank == 0 and (missing or not (folder / "metadata.jsonl").is_file()):
        _write_listing(folder, db_cfg, resolution)
    if acc is not None:
        acc.wait_for_everyone()
    return folder, len(missing)


def _write_listing(folder: Path, db_cfg, resolution: int) -> None:
    """``metadata.jsonl`` (an imagefolder listing, for people and other tools) and ``class_images.json``."""
    prompts = db_cfg.class_prompts
    count = 0
    while (folder / class_image_name(count)).is_file():
        count += 1
    lines = [json.dumps({"file_name": class_image_name(i), "text": prompts[i % len(prompts)]}) for i in range(count)]
    write_text_atomically(folder / "metadata.jsonl", "\n".join(lines) + "\n")
    write_json_atomically(folder / "class_images.json", {
        "prompts": prompts, "steps": db_cfg.class_steps, "guidance": db_cfg.class_guidance,
        "seed": db_cfg.class_seed, "seed_of_image_i": f"{db_cfg.class_seed} * {SEED_STRIDE} + i",
        "resolution": resolution, "sampler": "DDIM", "images": count}, indent=2)


# ---- datasets and batches ---------------------------------------------------------------------------
def _data_cfg(data_cfg, **changes):
    """``data_cfg`` with ``changes`` applied to the fields it has (caption tools and masks may not exist)."""
    return dataclasses.replace(data_cfg, **{k: v for k, v in changes.items() if hasattr(data_cfg, k)})


def prompted_dataset(hf_dataset, data_cfg, prompt: str, seed: int):
    """A caption dataset over ``hf_dataset``'s images, every caption ``prompt`` (its own captions, if any, unused)."""
    from ..data.datasets import make_caption_dataset

    hf_dataset = hf_dataset.add_column(PROMPT_COLUMN, [prompt] * len(hf_dataset))
    return make_caption_dataset(hf_dataset, _data_cfg(data_cfg, caption_column=PROMPT_COLUMN), seed)


def class_dataset(folder: Path, db_cfg, data_cfg, seed: int):
    """The first ``num_class_images`` class images with their prompts, augmented like the instance images, with
    their own randomness (seed + 1). Caption templates, tag tools and loss masks do not apply to them."""
    from datasets import Dataset, Image

    from ..data.datasets import CaptionImageDataset

    prompts, n = db_cfg.class_prompts, db_cfg.num_class_images
    hf = Dataset.from_dict({"image": [str(folder / class_image_name(i)) for i in range(n)],
                            "text": [prompts[i % len(prompts)] for i in range(n)]}).cast_column("image", Image())
    plain = _data_cfg(data_cfg, dataset=str(folder), image_column="image", caption_column="text", max_samples=None,
                      caption_template="{caption}", shuffle_tags=False, tag_dropout=0.0, mask_column=None,
                      mask_from_alpha=False)
    return CaptionImageDataset(hf, plain, seed + 1)


class PriorPairs(torch.utils.data.Dataset):
    """Instance sample ``i`` with class sample ``(i + epoch * len(instance)) % len(klass)``: over the epochs every
    class image is used, and which one pairs with ``i`` depends only on the epoch and ``i``."""

    def __init__(self, instance, klass):
        self.instance, self.klass, self.epoch = instance, klass, 0

    def __len__(self) -> int:
        return len(self.instance)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.instance.set_epoch(epoch)
        self.klass.set_epoch(epoch)

    def class_index(self, i: int) -> int:
        return (i + self.epoch * len(self.instance)) % len(self.klass)

    def __getitem__(self, i: int):
        return self.instance[i], self.klass[self.class_index(i)]

    @property
    def data_issues(self) -> dict:
        """The instance data's issues (the class images are ours)."""
        return getattr(getattr(self.instance, "base", self.instance), "data_issues", {})


class PairCollate:
    """``collate(instance samples + class samples)`` plus ``loss_weight``: 2 for the instance half and
    ``2 * prior_loss_weight`` for the class half, so the mean over the batch is ``instance MSE + w x class MSE``."""

    def __init__(self, collate, prior_loss_weight: float):
        self.collate, self.weight = collate, float(prior_loss_weight)

    def __call__(self, pairs) -> dict:
        pairs = list(pairs)
        batch = self.collate([a for a, _ in pairs] + [b for _, b in pairs])
        n = len(pairs)
        batch["loss_weight"] = torch.cat([torch.full((n,), 2.0), torch.full((n,), 2.0 * self.weight)])
        return batch


def prior_loss_weights(batch: dict, like: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights of a batch (:class:`PairCollate`'s; 1 for batches without prior preservation)."""
    weights = batch.get("loss_weight")
    return torch.ones_like(like) if weights is None else weights.to(like.device, like.dtype)


# ---- what the trainer holds -------------------------------------------------------------------------
class DreamBooth:
    """``dreambooth.enabled``: the instance data with its prompt and, with prior preservation, the class images
    (made by :func:`ensure_class_images` when this is built: pass the base model before it is trained or cast)."""

    def __init__(self, cfg, parts, acc=None):
        from ..data.cache import resolve_cache_dir

        self.cfg, self.db = cfg, cfg.dreambooth
        self.class_dir, self.generated = None, 0
        if self.db.prior_preservation:
            root = Path(self.db.class_data_dir).expanduser() if self.db.class_data_dir.strip() \
                else resolve_cache_dir(cfg) / "class_images"
            self.class_dir, self.generated = ensure_class_images(parts, self.db, cfg.data.resolution, root, acc)
            (acc.print if acc is not None else logger.info)(
                f"dreambooth: {self.db.num_class_images} class images in {self.class_dir} "
                f"({self.generated} generated now)")

    def instance_dataset(self, data_cfg, seed: int):
        from ..data.datasets import build_train_dataset, load_caption_dataset

        if not self.db.instance_prompt.strip():
            return build_train_dataset(data_cfg, seed=seed)
        return prompted_dataset(load_caption_dataset(data_cfg), data_cfg, self.db.instance_prompt, seed)

    def add_class_images(self, dataset, loader_args: dict, cached):
        """``dataset`` paired with the class images (through ``cached``, the trainer's feature cache, when the
        config asks for one); ``loader_args["collate_fn"]`` becomes a :class:`PairCollate`."""
        if self.class_dir is None:
            return dataset
        klass = cached(class_dataset(self.class_dir, self.db, self.cfg.data, self.cfg.seed), loader_args)
        loader_args["collate_fn"] = PairCollate(loader_args["collate_fn"], self.db.prior_loss_weight)
        return PriorPairs(dataset, klass)


class NoDreamBooth:
    """``dreambooth.enabled`` false: ``data.dataset`` as it is, no class images."""

    class_dir, generated = None, 0

    def instance_dataset(self, data_cfg, seed: int):
        from ..data.datasets import build_train_dataset

        return build_train_dataset(data_cfg, seed=seed)

    def add_class_images(self, dataset, loader_args: dict, cached):
        return dataset


def make_dreambooth(cfg, parts, acc=None) -> DreamBooth | NoDreamBooth:
    return DreamBooth(cfg, parts, acc) if cfg.dreambooth.enabled else NoDreamBooth()
