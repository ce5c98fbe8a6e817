"""A self-invalidating on-disk cache of VAE posteriors and text-encoder outputs.

What is cached
--------------
* **Latents**: the VAE posterior *parameters* ``vae.encode(x).latent_dist.parameters`` (mean and logvar
  concatenated on channels, ``[2C, h, w]``), stored as **float32** whatever the VAE's dtype (lossless for
  fp16/bf16/fp32 VAEs; the VAE's dtype is part of the key). Not a sample: the trainer still draws a fresh
  posterior sample every step with its own noise (:func:`sample_from_params`), so training from the cache
  gives the same loss as encoding on the fly. With ``data.random_flip`` both the plain and the mirrored
  image are cached (two entries per image). With aspect-ratio buckets (``data.buckets``) each image is cached
  at its bucket's size (set the bucket sizes on the dataset before precomputing: the trainer does). A random
  crop (``data.center_crop: false``) cannot be cached, nor can images with loss masks (the mask is read with
  the pixels): latents then fall back to on-the-fly encoding (:func:`latents_cacheable`, logged).
* **Text**: the hidden states ``[77, D]`` of ``PromptEncoder(tokenizer, text_encoder, max_chunks=1)`` with
  the given ``clip_skip``, one entry per distinct caption string (every string of a list caption after the
  caption template, and ``""``, the caption-dropout / unconditional prompt), stored as float32. Shuffled or
  dropped tags (:mod:`latentsd.data.captions`) cannot be cached: captions are then encoded on the fly (logged).

Keys
----
Every entry is named by a sha256 over everything that affects it, so a change invalidates exactly the
affected entries with no flag to remember, and entries with an unchanged key are reused across runs
(share ``cache.dir`` between runs):

* latents: the image's encoded file bytes (decoded pixels when no bytes exist), the resolution, the crop
  policy (center), the flip variant, the bucket size (non-square buckets only, so a square bucket shares the
  square's entries), the preprocessing version, a fingerprint of the VAE weights, the VAE
  config, the VAE dtype (+ tiling) and the stored dtype;
* text: the caption string, a tokenizer fingerprint (vocab, merges, added tokens, model_max_length,
  special ids), a fingerprint of the text-encoder weights, its config and dtype, ``clip_skip``, the stored
  dtype.

Weight fingerprints stream each tensor's bytes through hashlib once per process and are remembered in
memory (re-hashed only when a tensor is replaced or modified in place, see :func:`module_fingerprint`).
Image file hashes are remembered on disk by ``(path, size, mtime, ctime, inode)`` (like git's index), so
a later run, or another rank of this run, does not read every image again.

Layout (``cache_dir``)
----------------------
``latents/latents-r{rank}-{token}-{seq}.safetensors`` and ``text/text-...safetensors``: shards of up to
``shard_size`` entries, tensor name = key, each written once (atomically, :mod:`latentsd.io`) by exactly one
process (rank and a random token in the name), never rewritten. ``latents/index.json`` /
``text/index.json``: ``{shard: {"size", "keys"}}``, a listing written atomically by the main process;
it only saves reading shard headers: the shards on disk are the truth (a shard missing from the index
has its header read, an indexed shard that is gone is dropped), so concurrent writers never corrupt
anything. ``files/digests-*.json``: remembered image hashes and images that failed to decode.

Several processes
-----------------
:meth:`FeatureCache.precompute` on every process: rank ``r`` of ``w`` handles dataset rows ``r::w`` (their
image hashes and missing latents) and distinct captions ``r::w``. Ownership follows the (deterministic)
dataset order, not a per-process view of what is missing, so it needs no barrier before writing and
works even when ranks run at different times. Then a barrier, then every process :meth:`~FeatureCache.reload`
s and :meth:`~FeatureCache.wrap` s its dataset. :func:`build_cached_dataset` does the three.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .cached_dataset import (CachedCaptionDataset, _column, _recipe, _row_size, collate_cached,  # noqa: F401
                             latents_from_params, sample_from_params)
from .captions import CaptionRecipe
from .datasets import _cell_name, open_image
from .fingerprints import (CACHE_FORMAT, STORE_DTYPE, image_digest, latent_context, latent_key,  # noqa: F401
                           module_fingerprint, text_context, text_key, tokenizer_fingerprint)
from .shards import CacheMissingError, ShardStore, _FileDigests, _ShardWriter
from .transforms import ImageTransform

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "CacheMissingError",
    "latents_cacheable",
    "latents_uncacheable_reason",
    "cache_modes",
    "cache_plan",
    "resolve_cache_dir",
    "module_fingerprint",
    "tokenizer_fingerprint",
    "image_digest",
    "latent_context",
    "latent_key",
    "text_context",
    "text_key",
    "sample_from_params",
    "latents_from_params",
    "ShardStore",
    "PrecomputeStats",
    "FeatureCache",
    "precompute",
    "distinct_captions",
    "CachedCaptionDataset",
    "collate_cached",
    "build_cached_dataset",
]

# =========================================================================== what can be cached


def latents_uncacheable_reason(data_cfg: Any) -> Optional[str]:
    """Why latents of this data config cannot be cached (None if they can).

    Takes a :class:`~latentsd.config.DataConfig` or anything with its attributes (an ``ImageTransform``).
    """
    if getattr(data_cfg, "streaming", False):
        return "data.streaming=true: the cache needs a map-style dataset"
    if not getattr(data_cfg, "center_crop", True):
        return "data.center_crop=false: a random crop differs every step, so its latents cannot be precomputed"
    masks = getattr(data_cfg, "masks", None)  # a CaptionImageDataset's LossMasks
    if getattr(data_cfg, "mask_column", None) or getattr(data_cfg, "mask_from_alpha", False) or \
            (masks is not None and masks.enabled):
        return "loss masks (data.mask_column / data.mask_from_alpha) are read with the pixels"
    return None


def latents_cacheable(data_cfg: Any) -> bool:
    """True when every sample's pixels are one of a few fixed variants (center crop at the square or bucket
    size, optional flip)."""
    return latents_uncacheable_reason(data_cfg) is None


def cache_plan(cfg: Any) -> dict[str, tuple[bool, Optional[str]]]:
    """``{"latents": (used, why not), "text": (used, why not)}`` for a :class:`~latentsd.config.TrainConfig`, logging
    nothing. ``cache.*`` is ``true``, ``false`` or ``auto`` (the default: on wherever the part can be cached, i.e. the
    model part is frozen and the data allows it)."""
    reasons = {"latents": latents_uncacheable_reason(cfg.data), "text": _text_uncacheable_reason(cfg)}
    settings = {"latents": cfg.cache.latents, "text": cfg.cache.text}
    return {part: (settings[part] is not False and reasons[part] is None,
                   "cache.%s=false" % part if settings[part] is False else reasons[part]) for part in reasons}


def _text_uncacheable_reason(cfg: Any) -> Optional[str]:
    if cfg.text_encoder_trained():  # fully, LoRA or textual-inversion vectors
        return "the text encoder is trained"
    if cfg.data.streaming:
        return "data.streaming=true: the cache needs a map-style dataset"
    return CaptionRecipe.from_config(cfg.data).uncacheable_reason


def cache_modes(cfg: Any) -> tuple[bool, bool]:
    """``(cache latents, cache text)`` for a :class:`~latentsd.config.TrainConfig` (:func:`cache_plan`), logging why a
    part is not cached: a warning when it was asked for (``true``), information under ``auto``; that part is then
    computed on the fly, as without a cache."""
    plan = cache_plan(cfg)
    for part, what in (("latents", "latents are encoded"), ("text", "captions are encoded")):
        setting, (used, reason) = getattr(cfg.cache, part), plan[part]
        if setting is not False and not used:
            log = logger.warning if setting is True else logger.info
            log("cache.%s=%s but %s: %s on the fly", part, str(setting).lower(), reason, what)
    return plan["latents"][0], plan["text"][0]


def resolve_cache_dir(cfg: Any) -> Path:
    """``cache.dir``, or ``<output_dir>/cache`` when empty."""
    return Path(cfg.cache.dir).expanduser() if cfg.cache.dir.strip() else Path(cfg.output_dir) / "cache"



# =========================================================================== dataset access helpers


def _check_map_style(dataset: Any) -> None:
    for attr in ("ds", "image_column", "caption_column", "transform", "caption_dropout", "seed"):
        if not hasattr(dataset, attr) or not hasattr(dataset, "__len__"):
            raise TypeError("the feature cache needs a map-style CaptionImageDataset "
                            f"(streaming datasets are not cached), got {type(dataset).__name__}")


def _process(rank: Optional[int], world: Optional[int], accelerator: Any) -> tuple[int, int, bool]:
    if accelerator is not None:  # Accelerator or PartialState
        return int(accelerator.process_index), int(accelerator.num_processes), bool(accelerator.is_local_main_process)
    rank, world = int(rank or 0), int(world or 1)
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return rank, world, int(os.environ.get("LOCAL_RANK", rank)) == 0


def _pixels(transform: ImageTransform, image, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """The unflipped center-crop pixels CaptionImageDataset makes of this image at ``size`` (an aspect bucket's;
    None: the square resolution); crop draws are ignored."""
    plain = ImageTransform(transform.resolution, center_crop=True, random_flip=False)
    pixels, _ = plain(image, torch.Generator().manual_seed(0), size=size)  # a private generator: leave the global RNG be
    return pixels


# =========================================================================== the cache


@dataclass
class PrecomputeStats:
    """What one :meth:`FeatureCache.precompute` call did on this process."""

    rank: int = 0
    world: int = 1
    latents_total: int = 0    # latent entries this process is responsible for (present or not)
    latents_encoded: int = 0  # of which it encoded now
    text_total: int = 0
    text_encoded: int = 0
    skipped_images: int = 0   # own rows whose image could not be read or decoded
    files_hashed: int = 0     # image files read to hash them (the rest were remembered)
    shards: list[str] = field(default_factory=list)


class FeatureCache:
    """Front door: fingerprints the models, precomputes missing entries, wraps datasets.

    ``vae=None`` caches no latents; ``text_encoder=None`` (or ``tokenizer=None``) caches no text. If the
    dataset's transform makes latents uncacheable (random crop) latents fall back to on-the-fly encoding.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, vae: Any = None, tokenizer: Any = None,
                 text_encoder: Any = None, clip_skip: Optional[int] = None, shard_size: int = 1024,
                 store_dtype: torch.dtype = STORE_DTYPE):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if (tokenizer is None) != (text_encoder is None):
            raise ValueError("text caching needs both tokenizer and text_encoder (or neither)")
        self.dir = Path(cache_dir)
        self.vae, self.tokenizer, self.text_encoder = vae, tokenizer, text_encoder
        self.clip_skip, self.shard_size, self.store_dtype = clip_skip, int(shard_size), store_dtype
        self.latents = ShardStore(self.dir / "latents", "latents") if vae is not None else None
        self.text = ShardStore(self.dir / "text", "text") if text_encoder is not None else None

    # ---- helpers
    def caches_latents_for(self, dataset: Any) -> bool:
        if self.vae is None:
            return False
        reason = latents_uncacheable_reason(dataset.transform) or latents_uncacheable_reason(dataset)
        if reason:
            logger.warning("latents are not cached (%s): they are encoded on the fly", reason)
        return reason is None

    def caches_text_for(self, dataset: Any) -> bool:
        if self.text is None:
            return False
        reason = _recipe(dataset).uncacheable_reason
        if reason:
            logger.warning("text is not cached (%s): captions are encoded on the fly", reason)
        return reason is None

    def reload(self) -> None:
        """Re-list the shards (after other processes wrote theirs)."""
        for store in (self.latents, self.text):
            if store is not None:
                store.reload()

    def write_index(self) -> None:
        """Refresh index.json files (main process, after a barrier)."""
        for store in (self.latents, self.text):
            if store is not None:
                store.write_index()

    # ---- precompute
    @torch.no_grad()
    def precompute(self, dataset: Any, *, batch_size: int = 8, rank: Optional[int] = None,
                   world: Optional[int] = None, accelerator: Any = None,
                   progress: Optional[bool] = None) -> PrecomputeStats:
        """Encode this process's share of the missing entries and write them as new shards.

        Rank ``r`` of ``w`` (from ``accelerator`` — an ``Accelerator`` or ``PartialState`` — or the
        arguments) handles rows ``r::w`` for latents and distinct captions ``r::w`` for text. Call it on
        every process, then wait for all of them before :meth:`reload` / :meth:`wrap`.
        """
        _check_map_style(dataset)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rank, world, local_main = _process(rank, world, accelerator)
        show = local_main if progress is None else progress
        stats = PrecomputeStats(rank=rank, world=world)
        self.reload()
        n = len(dataset)
        own_rows = list(range(rank, n, world))

        jobs: list[tuple[int, str, Optional[tuple], list[tuple[str, bool]]]] = []  # (row, digest, size, [(key, flip)])
        text_jobs: list[tuple[str, str]] = []
        digests = _FileDigests(self.dir / "files") if self.caches_latents_for(dataset) else None
        if digests is not None:
            lat_ctx = latent_context(self.vae, dataset.transform.resolution, self.store_dtype)
            flips = (False, True) if dataset.transform.random_flip else (False,)
            queued: set[str] = set()
            for row, cell in zip(own_rows, _column(dataset.ds, dataset.image_column, own_rows)):
                digest = digests.digest(cell)
                if digest is None:
                    stats.skipped_images += 1
                    logger.warning("cache: skipping unreadable image at row %d (%s)", row, _cell_name(cell))
                    continue
                missing = []
                size = _row_size(dataset, row)
                for flip in flips:
                    key = latent_key(lat_ctx, digest, flip, size)
                    stats.latents_total += 1
                    if key not in self.latents and key not in queued:
                        queued.add(key)
                        missing.append((key, flip))
                if missing:
                    jobs.append((row, digest, size, missing))
        if self.caches_text_for(dataset):
            context = text_context(self.tokenizer, self.text_encoder, self.clip_skip, self.store_dtype)
            unique = distinct_captions(dataset)
            for caption in unique[rank::world]:
                stats.text_total += 1
                key = text_key(context, caption)
                if key not in self.text:
                    text_jobs.append((key, caption))

        from tqdm.auto import tqdm

        total = sum(len(m) for *_, m in jobs) + len(text_jobs)
        bar = tqdm(total=total, desc=f"caching (rank {rank})" if world > 1 else "caching", disable=not show or not total)
        try:
            if jobs:
                writer = _ShardWriter(self.latents, self.shard_size, rank, self.store_dtype)
                stats.latents_encoded, bad = self._encode_latents(dataset, jobs, writer, digests, batch_size, bar,
                                                                  lat_ctx, queued)
                writer.flush()
                stats.skipped_images += bad
                stats.shards += writer.written
            if text_jobs:
                writer = _ShardWriter(self.text, self.shard_size, rank, self.store_dtype)
                stats.text_encoded = self._encode_text(text_jobs, writer, batch_size, bar)
                writer.flush()
                stats.shards += writer.written
        finally:
            bar.close()
            if digests is not None:
                stats.files_hashed = digests.hashed
                digests.save(rank)
        logger.info("cache rank %d/%d: latents %d encoded of %d, text %d encoded of %d, %d unreadable images",
                    rank, world, stats.latents_encoded, stats.latents_total, stats.text_encoded,
                    stats.text_total, stats.skipped_images)
        self.reload()
        return stats

    def _encode_latents(self, dataset, jobs, writer, digests, batch_size, bar, context, queued) -> tuple[int, int]:
        vae, encoded, bad = self.vae, 0, 0
        pending: dict[Optional[tuple], tuple[list[str], list[torch.Tensor]]] = {}  # a batch per output size

        def run(size):
            nonlocal encoded
            keys, pixels = pending.pop(size)
            x = torch.stack(pixels).to(device=vae.device, dtype=vae.dtype)
            params = vae.encode(x).latent_dist.parameters
            for key, p in zip(keys, params):
                writer.add(key, p)
            encoded += len(keys)
            bar.update(len(keys))

        def add(image, size, missing):
            plain = _pixels(dataset.transform, image, size)
            keys, pixels = pending.setdefault(size, ([], []))
            for key, flip in missing:
                keys.append(key)
                pixels.append(torch.flip(plain, dims=[2]) if flip else plain)
            if len(keys) >= batch_size:
                run(size)

        for row, digest, size, missing in jobs:
            cell = dataset.ds[row][dataset.image_column]
            try:
                image = open_image(cell)
            except Exception as err:  # never crash on a bad file: skip it (the dataset will too)
                bad += 1
                digests.mark_undecodable(digest)
                bar.update(len(missing))
                logger.warning("cache: skipping undecodable image at row %d (%s: %s: %s)", row,
                               _cell_name(cell), type(err).__name__, err)
                if size is not None:  # the dataset serves the next readable row instead, at this row's bucket size
                    image, missing = self._replacement(dataset, row, size, digests, context, queued)
                    if image is not None and missing:
                        bar.total += len(missing)
                        add(image, size, missing)
                continue
            add(image, size, missing)
        for size in list(pending):
            run(size)
        return encoded, bad

    def _replacement(self, dataset, row, size, digests, context, queued) -> tuple[Any, list[tuple[str, bool]]]:
        """(image, missing [(key, flip)]) of the row the dataset reads instead of undecodable ``row`` (the next
        readable one, as :class:`~latentsd.data.datasets.CaptionImageDataset` does), keyed at ``size``."""
        n = len(dataset)
        flips = (False, True) if dataset.transform.random_flip else (False,)
        for step in range(1, min(n, getattr(dataset, "max_tries", 100))):
            cell = dataset.ds[(row + step) % n][dataset.image_column]
            digest = digests.digest(cell)
            if digest is None or digest in digests.undecodable:
                continue
            try:
                image = open_image(cell)
            except Exception:
                continue
            keys = [(latent_key(context, digest, flip, size), flip) for flip in flips]
            missing = [(key, flip) for key, flip in keys if key not in self.latents and key not in queued]
            queued.update(key for key, _ in missing)
            return image, missing
        return None, []

    def _encode_text(self, jobs, writer, batch_size, bar) -> int:
        from ..text import PromptEncoder

        encoder = PromptEncoder(self.tokenizer, self.text_encoder, max_chunks=1)
        for start in range(0, len(jobs), batch_size):
            part = jobs[start:start + batch_size]
            embeds = encoder([c for _, c in part], clip_skip=self.clip_skip, num_chunks=1)
            for (key, _), e in zip(part, embeds):
                writer.add(key, e)
            bar.update(len(part))
        return len(jobs)

    # ---- reading
    def wrap(self, dataset: Any, strict: bool = True) -> CachedCaptionDataset:
        """A :class:`CachedCaptionDataset` over ``dataset`` reading this cache (call after precompute on
        all processes and a barrier). ``strict`` raises :class:`CacheMissingError` if entries are missing."""
        _check_map_style(dataset)
        self.reload()
        row_digests = latents = text = None
        lat_ctx = txt_ctx = None
        n_bad = 0
        if self.caches_latents_for(dataset):
            latents = self.latents
            digests = _FileDigests(self.dir / "files")
            lat_ctx = latent_context(self.vae, dataset.transform.resolution, self.store_dtype)
            flips = (False, True) if dataset.transform.random_flip else (False,)
            row_digests, missing = [], 0
            for row, cell in enumerate(_column(dataset.ds, dataset.image_column)):
                digest = digests.digest(cell)
                if digest is None or digest in digests.undecodable:
                    row_digests.append(None)
                    n_bad += 1
                    continue
                size = _row_size(dataset, row)
                missing += sum(latent_key(lat_ctx, digest, f, size) not in latents for f in flips)
                row_digests.append(digest)
            if missing and strict:
                raise CacheMissingError(
                    f"{missing} latent entries of {len(dataset)} rows are not in the cache at {self.dir}: run "
                    "precompute on every process and wait for all of them before wrapping the dataset")
            if n_bad and n_bad == len(dataset):  # nothing to train on: name the first files, as the dataset does
                from .validate import unreadable_error

                rows = range(min(n_bad, 5))
                failed = [(r, _cell_name(dataset.ds[r][dataset.image_column]), ValueError("not a readable image"))
                          for r in rows]
                raise unreadable_error(getattr(dataset, "source", "?"), failed, n_bad, n_bad)
            if n_bad:
                logger.warning("%d of %d images are unreadable: those rows are skipped (the next row is used)",
                               n_bad, len(dataset))
        if self.caches_text_for(dataset):
            text = self.text
            txt_ctx = text_context(self.tokenizer, self.text_encoder, self.clip_skip, self.store_dtype)
            missing = sum(text_key(txt_ctx, c) not in text for c in distinct_captions(dataset))
            if missing and strict:
                raise CacheMissingError(
                    f"{missing} caption entries are not in the cache at {self.dir}: run precompute on every "
                    "process and wait for all of them before wrapping the dataset")
        else:
            logger.info("text is not cached: captions are encoded by the trainer")
        return CachedCaptionDataset(dataset, latents=latents, row_digests=row_digests, latent_context=lat_ctx,
                                    text=text, text_context=txt_ctx)


def distinct_captions(dataset: Any) -> list[str]:
    """Every caption string the dataset can yield (after its caption template), ``""`` first, then in order of
    first appearance. Raises ``ValueError`` for captions with shuffled or dropped tags (too many strings)."""
    recipe, seen = _recipe(dataset), {"": None}
    for cell in _column(dataset.ds, dataset.caption_column):
        for c in recipe.variants(cell):
            seen.setdefault(c, None)
    return list(seen)


def precompute(dataset: Any, cache_dir: str | os.PathLike, *, vae: Any = None, tokenizer: Any = None,
               text_encoder: Any = None, clip_skip: Optional[int] = None, shard_size: int = 1024,
               batch_size: int = 8, rank: Optional[int] = None, world: Optional[int] = None,
               accelerator: Any = None, progress: Optional[bool] = None) -> PrecomputeStats:
    """One-call :meth:`FeatureCache.precompute`."""
    cache = FeatureCache(cache_dir, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder,
                         clip_skip=clip_skip, shard_size=shard_size)
    return cache.precompute(dataset, batch_size=batch_size, rank=rank, world=world,
                            accelerator=accelerator, progress=progress)


def build_cached_dataset(dataset: Any, cache_dir: str | os.PathLike, *, vae: Any = None, tokenizer: Any = None,
                         text_encoder: Any = None, clip_skip: Optional[int] = None, shard_size: int = 1024,
                         batch_size: int = 8, accelerator: Any = None, rank: Optional[int] = None,
                         world: Optional[int] = None, barrier: Optional[Callable[[], None]] = None,
                         progress: Optional[bool] = None) -> CachedCaptionDataset:
    """Precompute this process's share, wait for everyone (``accelerator.wait_for_everyone()`` or
    ``barrier()``), refresh the index (main process) and wrap ``dataset``. ``.stats`` holds what this
    process encoded."""
    cache = FeatureCache(cache_dir, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder,
                         clip_skip=clip_skip, shard_size=shard_size)
    stats = cache.precompute(dataset, batch_size=batch_size, rank=rank, world=world,
                             accelerator=accelerator, progress=progress)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    elif barrier is not None:
        barrier()
    cache.reload()
    if stats.rank == 0:
        cache.write_index()
    wrapped = cache.wrap(dataset)
    wrapped.stats = stats
    return wrapped
