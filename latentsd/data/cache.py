"""A self-invalidating on-disk cache of VAE posteriors and text-encoder outputs.

What is cached
--------------
* **Latents**: the VAE posterior *parameters* ``vae.encode(x).latent_dist.parameters`` (mean and logvar
  concatenated on channels, ``[2C, h, w]``), stored as **float32** whatever the VAE's dtype (lossless for
  fp16/bf16/fp32 VAEs; the VAE's dtype is part of the key). Not a sample: the trainer still draws a fresh
  posterior sample every step with its own noise (:func:`sample_from_params`), so training from the cache
  gives the same loss as encoding on the fly. With ``data.random_flip`` both the plain and the mirrored
  image are cached (two entries per image). A random crop (``data.center_crop: false``) cannot be cached:
  latents then fall back to on-the-fly encoding (:func:`latents_cacheable`, logged).
* **Text**: the hidden states ``[77, D]`` of ``PromptEncoder(tokenizer, text_encoder, max_chunks=1)`` with
  the given ``clip_skip``, one entry per distinct caption string (every string of a list caption, and
  ``""``, the caption-dropout / unconditional prompt), stored as float32.

Keys
----
Every entry is named by a sha256 over everything that affects it, so a change invalidates exactly the
affected entries with no flag to remember, and entries with an unchanged key are reused across runs
(share ``cache.dir`` between runs):

* latents: the image's encoded file bytes (decoded pixels when no bytes exist), the resolution, the crop
  policy (center), the flip variant, the preprocessing version, a fingerprint of the VAE weights, the VAE
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
``shard_size`` entries, tensor name = key, each written once (temp file + ``os.replace``) by exactly one
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
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from .datasets import _cell_name, choose_caption, open_image, sample_generator
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
    if getattr(data_cfg, "buckets", False):
        return "data.buckets=true: aspect-ratio buckets are not cached yet"
    return None


def latents_cacheable(data_cfg: Any) -> bool:
    """True when every sample's pixels are one of a few fixed variants (center crop, optional flip)."""
    return latents_uncacheable_reason(data_cfg) is None


def cache_modes(cfg: Any) -> tuple[bool, bool]:
    """``(cache latents, cache text)`` for a :class:`~latentsd.config.TrainConfig`, logging why a requested
    cache is not used (that part is then computed on the fly, as without a cache)."""
    want_latents, want_text = bool(cfg.cache.latents), bool(cfg.cache.text)
    latents = text = False
    if want_latents:
        reason = latents_uncacheable_reason(cfg.data)
        if reason:
            logger.warning("cache.latents=true but %s: latents are encoded on the fly", reason)
        else:
            latents = True
    if want_text:
        lora = getattr(cfg, "lora", None)
        if cfg.model.train_text_encoder or (lora is not None and lora.enabled and lora.text_encoder):
            logger.warning("cache.text=true but the text encoder is trained: captions are encoded on the fly")
        elif cfg.data.streaming:
            logger.warning("cache.text=true but data.streaming=true: the cache needs a map-style dataset; "
                           "captions are encoded on the fly")
        else:
            text = True
    return latents, text


def resolve_cache_dir(cfg: Any) -> Path:
    """``cache.dir``, or ``<output_dir>/cache`` when empty."""
    return Path(cfg.cache.dir).expanduser() if cfg.cache.dir.strip() else Path(cfg.output_dir) / "cache"


# =========================================================================== sampling


def sample_from_params(params: torch.Tensor, noise: Optional[torch.Tensor], scaling_factor: float,
                       shift_factor: float = 0.0) -> torch.Tensor:
    """Posterior parameters ``[..., 2C, h, w]`` and noise ``[..., C, h, w]`` → scaled latents.

    ``(mean + exp(0.5 * clamp(logvar, -30, 20)) * noise - shift) * scale``: the same operations as diffusers'
    ``DiagonalGaussianDistribution`` and :func:`latentsd.latents.encode` with ``noise=``, so the same params
    and noise give the same latents. ``noise=None`` takes the posterior mode (the mean).
    """
    mean, logvar = torch.chunk(params, 2, dim=-3)
    if noise is None:
        z = mean
    else:
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        z = mean + std * noise.to(mean)
    return (z - shift_factor) * scaling_factor


def latents_from_params(vae: Any, params: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`sample_from_params` with this VAE's ``scaling_factor`` / ``shift_factor``."""
    from ..latents import _scale_shift

    scale, shift = _scale_shift(vae)
    return sample_from_params(params, noise, scale, shift)


# =========================================================================== dataset access helpers


def _check_map_style(dataset: Any) -> None:
    for attr in ("ds", "image_column", "caption_column", "transform", "caption_dropout", "seed"):
        if not hasattr(dataset, attr) or not hasattr(dataset, "__len__"):
            raise TypeError("the feature cache needs a map-style CaptionImageDataset "
                            f"(streaming datasets are not cached), got {type(dataset).__name__}")


def _column(ds: Any, column: str, rows: Optional[Sequence[int]] = None, chunk: int = 4096) -> Iterable:
    """Values of one column (for ``rows`` only if given), read in chunks."""
    part = ds.select_columns([column])
    if rows is not None:
        part = part.select(rows)
    for start in range(0, len(part), chunk):
        yield from part[start:start + chunk][column]


def _caption_options(caption: Any) -> list[str]:
    """Every string :func:`choose_caption` may return for this cell, except dropout's ``""``."""
    if isinstance(caption, (list, tuple)):
        return [c if isinstance(c, str) else "" for c in caption] or [""]
    return [caption if isinstance(caption, str) else ""]


def _process(rank: Optional[int], world: Optional[int], accelerator: Any) -> tuple[int, int, bool]:
    if accelerator is not None:  # Accelerator or PartialState
        return int(accelerator.process_index), int(accelerator.num_processes), bool(accelerator.is_local_main_process)
    rank, world = int(rank or 0), int(world or 1)
    if not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    return rank, world, int(os.environ.get("LOCAL_RANK", rank)) == 0


def _pixels(transform: ImageTransform, image) -> torch.Tensor:
    """The unflipped center-crop pixels CaptionImageDataset makes of this image (crop draws are ignored)."""
    plain = ImageTransform(transform.resolution, center_crop=True, random_flip=False)
    pixels, _ = plain(image, torch.Generator().manual_seed(0))  # a private generator: leave the global RNG be
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
        reason = latents_uncacheable_reason(dataset.transform)
        if reason is None and getattr(dataset, "target_sizes", None) is not None:
            reason = "aspect-ratio bucket sizes are set on the dataset (buckets are not cached yet)"
        if reason:
            logger.warning("latents are not cached (%s): they are encoded on the fly", reason)
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

        jobs: list[tuple[int, str, list[tuple[str, bool]]]] = []  # (row, digest, [(key, flip)]): no cells held
        text_jobs: list[tuple[str, str]] = []
        digests = _FileDigests(self.dir / "files") if self.caches_latents_for(dataset) else None
        if digests is not None:
            context = latent_context(self.vae, dataset.transform.resolution, self.store_dtype)
            flips = (False, True) if dataset.transform.random_flip else (False,)
            queued: set[str] = set()
            for row, cell in zip(own_rows, _column(dataset.ds, dataset.image_column, own_rows)):
                digest = digests.digest(cell)
                if digest is None:
                    stats.skipped_images += 1
                    logger.warning("cache: skipping unreadable image at row %d (%s)", row, _cell_name(cell))
                    continue
                missing = []
                for flip in flips:
                    key = latent_key(context, digest, flip)
                    stats.latents_total += 1
                    if key not in self.latents and key not in queued:
                        queued.add(key)
                        missing.append((key, flip))
                if missing:
                    jobs.append((row, digest, missing))
        if self.text is not None:
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
                stats.latents_encoded, bad = self._encode_latents(dataset, jobs, writer, digests, batch_size, bar)
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

    def _encode_latents(self, dataset, jobs, writer, digests, batch_size, bar) -> tuple[int, int]:
        vae, encoded, bad = self.vae, 0, 0
        keys: list[str] = []
        pixels: list[torch.Tensor] = []

        def run():
            nonlocal encoded
            x = torch.stack(pixels).to(device=vae.device, dtype=vae.dtype)
            params = vae.encode(x).latent_dist.parameters
            for key, p in zip(keys, params):
                writer.add(key, p)
            encoded += len(keys)
            bar.update(len(keys))
            keys.clear()
            pixels.clear()

        for row, digest, missing in jobs:
            cell = dataset.ds[row][dataset.image_column]
            try:
                plain = _pixels(dataset.transform, open_image(cell))
            except Exception as err:  # never crash on a bad file: skip it (the dataset will too)
                bad += 1
                digests.mark_undecodable(digest)
                bar.update(len(missing))
                logger.warning("cache: skipping undecodable image at row %d (%s: %s: %s)", row,
                               _cell_name(cell), type(err).__name__, err)
                continue
            for key, flip in missing:
                keys.append(key)
                pixels.append(torch.flip(plain, dims=[2]) if flip else plain)
                if len(keys) >= batch_size:
                    run()
        if keys:
            run()
        return encoded, bad

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
    def wrap(self, dataset: Any, strict: bool = True) -> "CachedCaptionDataset":
        """A :class:`CachedCaptionDataset` over ``dataset`` reading this cache (call after precompute on
        all processes and a barrier). ``strict`` raises :class:`CacheMissingError` if entries are missing."""
        _check_map_style(dataset)
        self.reload()
        row_keys = latents = text = None
        lat_ctx = txt_ctx = None
        n_bad = 0
        if self.caches_latents_for(dataset):
            latents = self.latents
            digests = _FileDigests(self.dir / "files")
            lat_ctx = latent_context(self.vae, dataset.transform.resolution, self.store_dtype)
            flips = (False, True) if dataset.transform.random_flip else (False,)
            row_keys, missing = [], 0
            for cell in _column(dataset.ds, dataset.image_column):
                digest = digests.digest(cell)
                if digest is None or digest in digests.undecodable:
                    row_keys.append(None)
                    n_bad += 1
                    continue
                keys = tuple(latent_key(lat_ctx, digest, f) for f in flips)
                missing += sum(k not in latents for k in keys)
                row_keys.append(keys)
            if missing and strict:
                raise CacheMissingError(
                    f"{missing} latent entries of {len(dataset)} rows are not in the cache at {self.dir}: run "
                    "precompute on every process and wait for all of them before wrapping the dataset")
            if n_bad:
                logger.warning("%d of %d images are unreadable: those rows are skipped (the next row is used)",
                               n_bad, len(dataset))
        if self.text is not None:
            text = self.text
            txt_ctx = text_context(self.tokenizer, self.text_encoder, self.clip_skip, self.store_dtype)
            missing = sum(text_key(txt_ctx, c) not in text for c in distinct_captions(dataset))
            if missing and strict:
                raise CacheMissingError(
                    f"{missing} caption entries are not in the cache at {self.dir}: run precompute on every "
                    "process and wait for all of them before wrapping the dataset")
        else:
            logger.info("text is not cached: captions are encoded by the trainer")
        return CachedCaptionDataset(dataset, latents=latents, row_keys=row_keys, text=text, text_context=txt_ctx)


def distinct_captions(dataset: Any) -> list[str]:
    """Every caption string the dataset can yield, ``""`` first, then in order of first appearance."""
    seen = {"": None}
    for cell in _column(dataset.ds, dataset.caption_column):
        for c in _caption_options(cell):
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


# =========================================================================== the dataset


class CachedCaptionDataset(torch.utils.data.Dataset):
    """Map-style dataset reading cached entries; per-sample randomness identical to ``CaptionImageDataset``.

    ``ds[i]`` draws from ``sample_generator(seed, epoch, i)``: the caption pick and dropout first
    (:func:`choose_caption`), then the transform's three draws (the third decides the flip), exactly like
    the wrapped dataset, and returns ``{"latent_params": FloatTensor[2C,h,w]`` (or ``"pixel_values"`` when
    latents are not cached), ``"prompt_embeds": FloatTensor[77,D]`` (only when text is cached),
    ``"caption": str`` (always: the chosen string), ``"index": i, "num_skipped": k}``. An unreadable image
    is skipped as the wrapped dataset does (the next row, same randomness), counted in ``num_skipped`` and in
    ``self.num_skipped`` / ``self.skipped_indices``. Build it with :meth:`FeatureCache.wrap`.
    """

    max_tries = 100

    def __init__(self, base: Any, *, latents: Optional[ShardStore], row_keys: Optional[list],
                 text: Optional[ShardStore], text_context: Optional[str]):
        self.base = base
        self.latents, self.row_keys = latents, row_keys
        self.text, self.text_context = text, text_context
        self.transform, self.caption_dropout = base.transform, base.caption_dropout
        self.seed, self.epoch = base.seed, base.epoch
        self.captions = list(_column(base.ds, base.caption_column)) if latents is not None else None

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.base.set_epoch(epoch)

    # the wrapped dataset's surface, for code written against it (buckets.image_sizes, skip counting)
    @property
    def ds(self):
        return self.base.ds

    @property
    def image_column(self) -> str:
        return self.base.image_column

    @property
    def caption_column(self) -> str:
        return self.base.caption_column

    def _record_skip(self, row: int, cell: Any, err: Exception) -> None:
        self.base._record_skip(row, cell, err)

    def set_bucket_sizes(self, sizes) -> None:
        """Aspect-ratio buckets (pixels on the fly only: cached latents are the square center crop)."""
        if self.latents is not None and sizes is not None:
            raise ValueError("aspect-ratio buckets need latents encoded on the fly: the cache holds square "
                             "center crops (set cache.latents=false or data.buckets=false)")
        self.base.set_bucket_sizes(sizes)

    def target_size(self, index: int):
        return self.base.target_size(index) if hasattr(self.base, "target_size") else None

    @property
    def num_skipped(self) -> int:
        return self.base.num_skipped

    @property
    def skipped_indices(self) -> set[int]:
        return self.base.skipped_indices

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for attempt in range(min(n, self.max_tries)):
            sample = self._sample((index + attempt) % n, index, attempt)
            if sample is not None:
                return sample
        raise RuntimeError(f"{min(n, self.max_tries)} consecutive unreadable images starting at row {index}: "
                           "check the dataset (see the warnings above)")

    def _skip(self, row: int, err: Exception) -> None:
        cell = self.base.ds[row][self.base.image_column]
        self.base._record_skip(row, cell, err)

    def _sample(self, row: int, index: int, attempt: int) -> Optional[dict]:
        if self.latents is None:  # pixels on the fly, exactly as the wrapped dataset makes them
            record = self.base.ds[row]
            cell = record[self.base.image_column]
            try:
                image = open_image(cell)
            except Exception as err:
                self.base._record_skip(row, cell, err)
                return None
            size = self.target_size(index)  # aspect-ratio bucket, if the wrapped dataset has one for i
            extra = () if size is None else (size,)
            made = self.base._make(image, record[self.base.caption_column], index, attempt, *extra)
            out = {"pixel_values": made["pixel_values"], "caption": made["caption"]}
        else:
            keys = self.row_keys[row]
            if keys is None:
                self._skip(row, ValueError("unreadable when the cache was built"))
                return None
            g = sample_generator(self.seed, self.epoch, index)
            caption = choose_caption(self.captions[row], g, self.caption_dropout)  # draws first: fixed order
            flip = self.transform.draw(g)[2]  # the same draw CaptionImageDataset's transform makes
            out = {"latent_params": self.latents.get(keys[1] if flip else keys[0]), "caption": caption}
        if self.text is not None:
            out["prompt_embeds"] = self.text.get(text_key(self.text_context, out["caption"]))
        out["index"], out["num_skipped"] = index, attempt
        return out


def collate_cached(batch: Iterable[dict]) -> dict:
    """Stack :class:`CachedCaptionDataset` samples: ``latent_params`` [B,2C,h,w] or ``pixel_values``
    [B,3,H,W], ``prompt_embeds`` [B,77,D] when cached, ``caption`` list[str], ``index`` LongTensor[B],
    ``num_skipped`` int (sum over the batch)."""
    batch = list(batch)
    if not batch:
        raise ValueError("collate_cached got an empty batch")
    out = {k: torch.stack([b[k] for b in batch]).contiguous()
           for k in ("latent_params", "pixel_values", "prompt_embeds") if k in batch[0]}
    out["caption"] = [b["caption"] for b in batch]
    out["index"] = torch.tensor([b["index"] for b in batch], dtype=torch.long)
    out["num_skipped"] = int(sum(b["num_skipped"] for b in batch))
    return out


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
